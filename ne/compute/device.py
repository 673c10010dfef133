"""Where tensors go: one rule for every stage."""

from __future__ import annotations

import torch

from ne.errors import ConfigError

CPU_CHUNK_BYTES = 4 * 2**20
"""Bytes of embeddings per batched product on a CPU: a few neurons' worth stays in cache, while a
batch-sized copy of h does not and makes the product about twice as slow (benchmarks/cluster.py)."""


def resolve_device(spec: str | torch.device | None = "auto", key: str = "model.device") -> torch.device:
    """`auto` (or None) is CUDA when present, else CPU; anything else must name a device this machine has
    (`key` names the setting in the error)."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{key} is {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {spec!r} but this machine has no CUDA GPU; use auto or cpu")
    return device
