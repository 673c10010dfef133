"""Models with MLP layers: `load_model(cfg)` picks the back end named by `cfg.backend`."""

from __future__ import annotations

import torch

from ne.config import ModelConfig
from ne.errors import ConfigError
from ne.models.base import LayerOutput, MLPModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"model.device is {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {spec!r} but this machine has no CUDA GPU; use auto or cpu")
    return device


def load_model(cfg: ModelConfig) -> MLPModel:
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.backend == "hf":
        from ne.models.hf import load_hf

        return load_hf(cfg, device, dtype)
    from ne.models import tl

    loader = tl.load_by_name if cfg.backend == "transformer_lens" else tl.load_safetensors_model
    return loader(cfg, device, dtype)


__all__ = ["LayerOutput", "MLPModel", "load_model", "resolve_device", "DTYPES"]
