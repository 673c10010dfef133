"""Exact nearest neighbours by inner product as chunked matrix products in torch, on any device.

The GPU path of the index where `faiss-gpu` is not installed: vectors are unit length, so the inner product is
the cosine, and one [queries × chunk] product per chunk of the indexed vectors keeps memory bounded. In
float32 it returns what FAISS's exact (Flat) index returns; in float16 or bfloat16 the similarities are
rounded, so near-ties may swap places.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float

from ne.compute.device import resolve_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK = 65_536
"""Indexed vectors per matrix product: [queries × CHUNK] similarities at a time."""


def exact_search(
    x_nd: Float[np.ndarray, "n d"],
    queries_qd: Float[np.ndarray, "q d"],
    k: int,
    device: str = "auto",
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [q, k], rows [q, k]) of the k largest inner products, best first, as FAISS returns them
    (rows -1 and similarities -inf where the index holds fewer than k vectors)."""
    dev, dt = resolve_device(device, "index.device"), DTYPES[dtype]
    q = torch.as_tensor(np.ascontiguousarray(queries_qd), device=dev).to(dt)
    best_sims = torch.full((len(q), 0), float("-inf"), device=dev)
    best_rows = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
    for start in range(0, len(x_nd), CHUNK):
        chunk = torch.as_tensor(np.ascontiguousarray(x_nd[start : start + CHUNK]), device=dev).to(dt)
        sims = (q @ chunk.T).float()
        top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
        best_sims = torch.cat([best_sims, top.values], dim=1)
        best_rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = torch.topk(best_sims, min(k, best_sims.shape[1]), dim=1)
        best_sims, best_rows = keep.values, best_rows.gather(1, keep.indices)
    if best_sims.shape[1] < k:
        pad = k - best_sims.shape[1]
        best_sims = torch.cat([best_sims, torch.full((len(q), pad), float("-inf"), device=dev)], dim=1)
        best_rows = torch.cat([best_rows, torch.full((len(q), pad), -1, device=dev, dtype=torch.long)], dim=1)
    return best_sims.cpu().numpy(), best_rows.cpu().numpy()
