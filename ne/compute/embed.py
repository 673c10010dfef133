"""Neuron embeddings and their cosine distances, for a whole batch of neurons at once.

The neuron embedding of an example for neuron j is `e = h ⊙ w_j`. The cosine of two embeddings of the
same neuron is `Σ h_a h_b w² / (‖h_a ⊙ w‖ ‖h_b ⊙ w‖)`: a Gram matrix of the rows of `h ⊙ w`, so one
batched matrix product (`torch.bmm`) serves every neuron of a batch. Neurons with fewer examples are
zero-padded; padded rows never touch the real block `[:n, :n]`, which is all a caller reads.

A gated neuron, act_fn(h·g_j + c_j)·(h·u_j + d_j), has two input vectors. `model.gated_embedding` says
which embedding it gets: `gate`, e = h ⊙ g_j, or `concat`, e = [h ⊙ g_j ; h ⊙ u_j].
`LayerWeights.parts` (below) is the one place that decides: it gives every neuron its weight
vectors (one part, or two), and every consumer (clusters, the index, explanations) embeds with those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args, overload

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ne.compute.device import CPU_CHUNK_BYTES, resolve_device
from ne.errors import ConfigError


def neuron_embeddings(h: Float[Tensor, "*batch n d_model"], w: Tensor) -> Float[Tensor, "*batch n e"]:
    """e = h ⊙ w: each example's pre-MLP embedding weighted by its neuron's input weights.

    `w` is [*batch, d_model], or [*batch, parts, d_model] from `LayerWeights.unit_weights`; with parts,
    e = [h ⊙ w_0 ; h ⊙ w_1 ; ...] (e = parts × d_model)."""
    if h.shape[-1] != w.shape[-1]:
        raise ValueError(f"h has d_model {h.shape[-1]} but w has {w.shape[-1]}")
    if w.dim() == h.dim():  # [*batch, parts, d]
        e = h.unsqueeze(-2) * w.unsqueeze(-3)
        return e.flatten(-2)
    return h * w.unsqueeze(-2)


def gram_weights(w: Tensor) -> Tensor:
    """One weight vector with the within-neuron cosines of `neuron_embeddings(h, w)` for every h.

    For parts w_p: e_a · e_b = Σ_p Σ_i h_a,i h_b,i w_p,i² = Σ_i h_a,i h_b,i (√Σ_p w_p,i²)², and the norms
    follow, so the concat embedding's distances need no copy twice the size of h (tests/compute/test_embed.py
    checks the identity against the explicit concatenation)."""
    return w.pow(2).sum(-2).sqrt() if w.dim() == 3 else w


def cosine_distances(
    h_bnd: Float[Tensor, "b n d_model"],
    w_bd: Float[Tensor, "b d_model"] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "auto",
) -> Float[Tensor, "b n n"]:
    """1 - cos(e_a, e_b) for every pair of examples of every neuron in the batch.

    `w_bd` is [b, d_model] or [b, parts, d_model] (`LayerWeights.unit_weights`); `w_bd=None` gives the
    distances of the raw pre-MLP embeddings (w = 1). Rows are normalised before
    the product, so float32 stays within 1e-6 of scipy's float64 `pdist(..., 'cosine')`. An all-zero
    embedding (padding, or a neuron whose weights vanish) has cosine 0 with everything: distance 1.
    """
    dev = resolve_device(device)
    e = h_bnd.to(device=dev, dtype=dtype)
    if w_bd is not None:
        e = neuron_embeddings(e, gram_weights(w_bd.to(device=dev, dtype=dtype)))
    unit = unit_rows(e)
    dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))
    dist.clamp_(0.0, 2.0)
    dist.diagonal(dim1=1, dim2=2).zero_()
    return dist


def neuron_distances(
    h_bnd: Float[Tensor, "b n d_model"], w_bd: Tensor | None = None, device: str | torch.device | None = "auto"
) -> Iterator[tuple[int, Float[np.ndarray, "chunk n n"]]]:
    """`cosine_distances` of a batch as float64 arrays, yielded with the index of their first neuron: on a CPU a
    few neurons at a time (`CPU_CHUNK_BYTES` of embeddings, which stay in cache), on a GPU the whole batch.
    float64 once here, because every consumer (linkage, cuts, metrics) computes in it."""
    dev = resolve_device(device)
    chunk = len(h_bnd) if dev.type == "cuda" else max(1, CPU_CHUNK_BYTES // max(4 * h_bnd[0].numel(), 1))
    for lo in range(0, len(h_bnd), chunk):
        w = None if w_bd is None else w_bd[lo : lo + chunk]
        yield lo, cosine_distances(h_bnd[lo : lo + chunk], w, device=dev).cpu().double().numpy()


@overload
def unit_rows(x: np.ndarray) -> np.ndarray: ...
@overload
def unit_rows(x: Tensor) -> Tensor: ...
def unit_rows(x):
    """Rows (the last axis) scaled to unit length; an all-zero row stays zero. Arrays come back as float32 (float64
    stays float64), tensors in their own dtype and device: the one normalisation of every cosine in `ne`."""
    if isinstance(x, Tensor):
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    x = np.ascontiguousarray(x, dtype=np.result_type(x, np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.finfo(x.dtype).tiny)


def cluster_means(unit_bne: Float[Tensor, "b n e"], labels: Sequence[np.ndarray]) -> list[Float[np.ndarray, "C e"]]:
    """Per neuron of a batch, the unit-length mean of each cluster's unit embeddings (`labels[i]`: the cluster of
    each of neuron i's examples, 0..C-1): the vectors `ne explain` assigns to."""
    n_clusters = max((int(lab.max()) + 1 for lab in labels if len(lab)), default=1)
    one_hot = torch.zeros(len(labels), n_clusters, unit_bne.shape[1], dtype=unit_bne.dtype)
    for i, lab in enumerate(labels):
        one_hot[i, torch.from_numpy(np.asarray(lab, np.int64)), torch.arange(len(lab))] = 1.0
    vectors = unit_rows(torch.bmm(one_hot, unit_bne))
    return [vectors[i, : int(lab.max()) + 1 if len(lab) else 0].numpy() for i, lab in enumerate(labels)]


def pad_rows(
    rows_nd: np.ndarray, index_lists: Sequence[np.ndarray]
) -> tuple[Float[Tensor, "b n_max d_model"], np.ndarray]:
    """Gather `rows_nd[idx]` for each neuron into one zero-padded tensor; returns it and the counts."""
    counts = np.array([len(ix) for ix in index_lists], dtype=np.int64)
    n_max = int(counts.max()) if len(counts) else 0
    out = np.zeros((len(index_lists), max(n_max, 1), rows_nd.shape[1]), dtype=np.float32)
    for b, ix in enumerate(index_lists):
        out[b, : len(ix)] = rows_nd[ix]
    return torch.from_numpy(out), counts


GatedEmbedding = Literal["concat", "gate"]
GATED_EMBEDDINGS: tuple[str, ...] = get_args(GatedEmbedding)


@dataclass(frozen=True)
class LayerWeights:
    """Input weights of neurons lo..lo + n - 1 of a layer (all of them unless read in part)."""

    gate: Float[np.ndarray, "n d_model"]
    """Row j - lo: w_j of a plain MLP, or the gate g_j of a gated one (the input of act_fn)."""
    up: Float[np.ndarray, "n d_model"] | None = None
    """Row j - lo: the up projection u_j of a gated MLP; None for a plain one."""
    lo: int = 0
    d_mlp: int = 0
    """Neurons in the whole layer."""

    @property
    def gated(self) -> bool:
        return self.up is not None

    def parts(self, gated_embedding: str) -> list[np.ndarray]:
        """The matrices a neuron's embedding multiplies h with: [W]; gated, [G] (`gate`) or [G, U] (`concat`).
        The one place where the gated embedding is chosen: an embedding is `len(parts)` × d_model wide."""
        if gated_embedding not in GATED_EMBEDDINGS:
            raise ConfigError(
                f"model.gated_embedding is {gated_embedding!r}; choose one of {', '.join(map(repr, GATED_EMBEDDINGS))}"
            )
        return [self.gate] if self.up is None or gated_embedding == "gate" else [self.gate, self.up]

    def unit_weights(self, neurons: np.ndarray, gated_embedding: str) -> Float[np.ndarray, "n parts d_model"]:
        """Per neuron, the vectors its embedding multiplies h with: [w_j]; gated, [g_j] (`gate`) or [g_j, u_j]
        (`concat`)."""
        rows = np.asarray(neurons, dtype=np.int64) - self.lo
        parts = self.parts(gated_embedding)
        return np.ascontiguousarray(np.stack([w[rows] for w in parts], axis=1), dtype=np.float32)

    def embed(self, h_nd: np.ndarray, neurons: np.ndarray, gated_embedding: str) -> Float[np.ndarray, "n e"]:
        """The neuron embedding of row i of `h_nd` for neuron `neurons[i]` (the index, explanations)."""
        w = torch.from_numpy(self.unit_weights(neurons, gated_embedding))
        return neuron_embeddings(torch.from_numpy(np.asarray(h_nd, np.float32))[:, None, :], w)[:, 0].numpy()
