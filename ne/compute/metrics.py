"""Polysemy metrics of a neuron, from the cosine distances of its examples and their feature clusters.

Conventions for degenerate cases (they are NaN, never a made-up number):
- `max_dist`, `mean_dist`: NaN with fewer than 2 examples (no pair).
- `intra_dist`: mean distance over pairs in the same cluster; NaN when every cluster is a singleton.
- `inter_dist`: mean distance over pairs in different clusters; NaN with a single cluster.
- `silhouette`: scikit-learn's definition (a singleton's own score is 0), defined only for
  2 <= clusters <= n - 1, like `sklearn.metrics.silhouette_score`; NaN otherwise.
- `n_clusters` counts the clusters that are not outliers (size >= `cluster.min_cluster_size`).
`raw_*` are the same metrics when the raw pre-MLP embeddings h are clustered the same way (w = 1).

The paper's Figure 4 compares the two spaces by silhouette, which depends on where each dendrogram is cut.
`figure4_metrics` measures it three ways (each space at its own per-neuron cut, both at the same number of
clusters, both at the fixed cut), and `neighbour_agreement` without any cut: how often an example's
nearest neighbour in a space has the same key token (and the same token before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ne.compute.cluster import (
    Clusters,
    cluster_examples,
    cut,
    cut_into,
    cut_thresholds,
    linkage_of,
    one_hot,
    silhouettes,
)
from ne.compute.embed import neuron_distances
from ne.config import ClusterConfig

NAN = float("nan")


def silhouette(dist_nn: Float[np.ndarray, "n n"], labels: Int[np.ndarray, " n"]) -> float:
    """Mean silhouette coefficient from a precomputed distance matrix (NaN unless 2 <= C <= n-1)."""
    dist_nn = np.asarray(dist_nn, dtype=np.float64)
    return _silhouette(dist_nn @ one_hot(labels), labels)


def _silhouette(sums_nc: Float[np.ndarray, "n C"], labels: Int[np.ndarray, " n"]) -> float:
    """Silhouette from each example's summed distance to each cluster (its own cluster includes itself)."""
    n, n_clusters = sums_nc.shape
    if not 2 <= n_clusters <= n - 1:
        return NAN
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    return float(silhouettes(sums_nc.T[None], sizes[None], np.asarray(labels)[None])[0])


def neuron_metrics(dist_nn: Float[np.ndarray, "n n"], clusters: Clusters) -> dict[str, float | int]:
    """n_examples, n_clusters, max/mean pairwise distance, mean intra/inter-cluster distance, silhouette.

    Pair counts and sums come from the cluster-block sums of the distance matrix, so nothing loops over
    pairs: intra = Σ_c (block c,c) / 2 over Σ_c s_c (s_c - 1) / 2 pairs; inter takes the rest.
    """
    n, labels = len(clusters.labels), clusters.labels
    out: dict[str, float | int] = {
        "n_examples": n,
        "n_clusters": int(np.count_nonzero(np.bincount(labels[~clusters.outlier]))),
        "max_dist": NAN,
        "mean_dist": NAN,
        "intra_dist": NAN,
        "inter_dist": NAN,
        "silhouette": NAN,
    }
    if n < 2:
        return out
    dist_nn = np.asarray(dist_nn, dtype=np.float64)
    sums = dist_nn @ one_hot(labels)
    sizes = np.bincount(labels)
    pairs, intra_pairs = n * (n - 1) / 2, float((sizes * (sizes - 1)).sum() / 2)
    total = sums.sum() / 2
    intra = sums[np.arange(n), labels].sum() / 2
    out["max_dist"] = float(dist_nn.max())
    out["mean_dist"] = float(total / pairs)
    if intra_pairs > 0:
        out["intra_dist"] = float(intra / intra_pairs)
    if intra_pairs < pairs:
        out["inter_dist"] = float((total - intra) / (pairs - intra_pairs))
    out["silhouette"] = _silhouette(sums, labels)
    return out


class KnownCut(NamedTuple):
    """Both spaces' clusters (labels 0..C-1) and silhouettes at cut `rule`, found before `figure4_metrics`."""

    rule: str
    labels_ne: Int[np.ndarray, " n"]
    labels_raw: Int[np.ndarray, " n"]
    silhouette_ne: float
    silhouette_raw: float


def figure4_metrics(
    dist_ne: Float[np.ndarray, "n n"],
    dist_raw: Float[np.ndarray, "n n"],
    z_ne: Float[np.ndarray, "n_minus_1 4"],
    z_raw: Float[np.ndarray, "n_minus_1 4"],
    cuts_ne: dict[str, float],
    cuts_raw: dict[str, float],
    min_cluster_size: int,
    known: KnownCut | None = None,
) -> dict[str, float | int]:
    """Silhouettes of both spaces (their distances, linkages and `cut_thresholds`) at three kinds of cut:

    - `*_per_neuron`: each space at its own per-neuron cut (its own number of clusters);
    - `silhouette_at_raw_k`, `raw_silhouette_at_ne_k`: one space's dendrogram cut into as many clusters
      (outliers included) as the other's per-neuron cut gave, so neither space chooses the count for both;
    - `*_fixed`: both at the fixed cut, `cluster.threshold`.
    `n_clusters_*` counts the neuron-embedding clusters that are not outliers, as `n_clusters` does.
    `known`: the clusters and silhouettes already found at one of the cuts, not computed again.
    """
    n = len(dist_ne)
    out: dict[str, float | int] = {}
    k = {}
    for rule, name in (("fixed", "fixed"), ("silhouette", "per_neuron")):
        if known is not None and known.rule == rule:
            ne, raw = known.labels_ne, known.labels_raw
            out[f"silhouette_{name}"], out[f"raw_silhouette_{name}"] = known.silhouette_ne, known.silhouette_raw
        else:
            ne, raw = _cut_labels(z_ne, cuts_ne[rule], n), _cut_labels(z_raw, cuts_raw[rule], n)
            out[f"silhouette_{name}"] = silhouette(dist_ne, ne)
            out[f"raw_silhouette_{name}"] = silhouette(dist_raw, raw)
        sizes = np.bincount(ne)
        out[f"n_clusters_{name}"] = int(np.count_nonzero(sizes >= min_cluster_size))
        k[name] = (len(sizes), int(raw.max()) + 1 if n else 0)
    k_ne, k_raw = k["per_neuron"]
    out["silhouette_at_raw_k"] = _silhouette_at_k(dist_ne, z_ne, k_raw)
    out["raw_silhouette_at_ne_k"] = _silhouette_at_k(dist_raw, z_raw, k_ne)
    return out


def _cut_labels(z: Float[np.ndarray, "n_minus_1 4"], threshold: float, n: int) -> Int[np.ndarray, " n"]:
    """Labels 0..C-1 of the cut at `threshold` (any order: silhouettes and counts do not depend on it)."""
    return np.unique(cut(z, threshold), return_inverse=True)[1] if n > 1 else np.zeros(n, np.int64)


def _silhouette_at_k(dist_nn: Float[np.ndarray, "n n"], z: Float[np.ndarray, "n_minus_1 4"], k: int) -> float:
    if not 2 <= k <= len(dist_nn) - 1:
        return NAN
    return silhouette(dist_nn, np.unique(cut_into(z, k), return_inverse=True)[1])


def neighbour_agreement(
    dist_nn: Float[np.ndarray, "n n"], tokens_n2: Int[np.ndarray, "n 2"], chance: bool = True
) -> dict[str, float]:
    """How often each example's nearest neighbour (ties: the lower rank) shares its key token (`same_token`),
    and also the token before it (`same_bigram`), against the rate for a random other example (`pair_*`).

    Needs no cut: a cut-free proxy for "the nearest example shows the same behaviour". `tokens_n2` holds each
    example's key token and the one before it (-1 at the first position). NaN with fewer than 2 examples,
    and for `pair_*` without `chance` (they depend on the tokens only, not on the space).
    """
    n = len(tokens_n2)
    if n < 2:
        return {"same_token": NAN, "same_bigram": NAN, "pair_same_token": NAN, "pair_same_bigram": NAN}
    masked = np.asarray(dist_nn, dtype=np.float64) + np.diag(np.full(n, np.inf))
    nearest = masked.argmin(axis=1)
    key, bigram = tokens_n2[:, 0], tokens_n2[:, 0] * (2**32) + (tokens_n2[:, 1] + 1)  # token ids are < 2**31
    return {
        "same_token": float((key == key[nearest]).mean()),
        "same_bigram": float((bigram == bigram[nearest]).mean()),
        "pair_same_token": _pair_rate(key) if chance else NAN,
        "pair_same_bigram": _pair_rate(bigram) if chance else NAN,
    }


def _pair_rate(keys_n: Int[np.ndarray, " n"]) -> float:
    """Share of ordered pairs of distinct examples with equal keys."""
    n = len(keys_n)
    counts = np.unique(keys_n, return_counts=True)[1].astype(np.float64)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


@dataclass
class NeuronResult:
    """Everything the cluster stage keeps for one neuron."""

    clusters: Clusters
    """Feature clusters of the neuron embeddings, at the run's cut (`cluster.cut`)."""
    metrics: dict[str, float | int]
    """Metrics of the neuron-embedding clusters, then `raw_*` for the pre-MLP clusters, then the Figure 4
    comparisons (`figure4_metrics`) and nearest-neighbour agreement (`neighbour_agreement`)."""


def analyse_neurons(
    h_bnd: Float[Tensor, "b n d_model"],
    counts: Int[np.ndarray, " b"],
    w_bd: Float[Tensor, "b d_model"],
    cfg: ClusterConfig,
    device: str | torch.device | None = "auto",
    tokens_bn2: Int[np.ndarray, "b n 2"] | None = None,
) -> list[NeuronResult]:
    """Cluster a batch of neurons (zero-padded examples, `counts` real ones each) and measure them.

    `tokens_bn2`: each example's key token and the token before it, for `neighbour_agreement` (NaN without)."""
    results = []
    spaces = zip(neuron_distances(h_bnd, w_bd, device), neuron_distances(h_bnd, None, device))
    for (lo, ne_dist), (_, raw_dist) in spaces:
        for b, n in enumerate(counts[lo : lo + len(ne_dist)]):
            d_ne, d_raw = np.ascontiguousarray(ne_dist[b, :n, :n]), np.ascontiguousarray(raw_dist[b, :n, :n])
            results.append(_analyse_neuron(d_ne, d_raw, cfg, None if tokens_bn2 is None else tokens_bn2[lo + b, :n]))
    return results


def _analyse_neuron(
    d_ne: Float[np.ndarray, "n n"],
    d_raw: Float[np.ndarray, "n n"],
    cfg: ClusterConfig,
    tokens_n2: Int[np.ndarray, "n 2"] | None,
) -> NeuronResult:
    z_ne, z_raw = linkage_of(d_ne, cfg.method), linkage_of(d_raw, cfg.method)
    cuts_ne, cuts_raw = cut_thresholds(d_ne, z_ne, cfg), cut_thresholds(d_raw, z_raw, cfg)
    ne = cluster_examples(d_ne, cuts_ne[cfg.cut], cfg.method, cfg.min_cluster_size, z=z_ne)
    raw = cluster_examples(d_raw, cuts_raw[cfg.cut], cfg.method, cfg.min_cluster_size, z=z_raw)
    metrics = neuron_metrics(d_ne, ne)
    metrics.update({f"raw_{k}": v for k, v in neuron_metrics(d_raw, raw).items() if k != "n_examples"})
    metrics["threshold"], metrics["raw_threshold"] = ne.threshold, raw.threshold
    known = KnownCut(cfg.cut, ne.labels, raw.labels, metrics["silhouette"], metrics["raw_silhouette"])
    metrics.update(figure4_metrics(d_ne, d_raw, z_ne, z_raw, cuts_ne, cuts_raw, cfg.min_cluster_size, known))
    metrics.update(_agreement_metrics(d_ne, d_raw, tokens_n2))
    return NeuronResult(ne, metrics)


def _agreement_metrics(
    d_ne: Float[np.ndarray, "n n"], d_raw: Float[np.ndarray, "n n"], tokens_n2: Int[np.ndarray, "n 2"] | None
) -> dict[str, float]:
    if tokens_n2 is None:
        return dict.fromkeys(AGREEMENT_COLUMNS, NAN)
    ne, raw = neighbour_agreement(d_ne, tokens_n2), neighbour_agreement(d_raw, tokens_n2, chance=False)
    return {
        "nn_same_token": ne["same_token"],
        "raw_nn_same_token": raw["same_token"],
        "nn_same_bigram": ne["same_bigram"],
        "raw_nn_same_bigram": raw["same_bigram"],
        "pair_same_token": ne["pair_same_token"],
        "pair_same_bigram": ne["pair_same_bigram"],
    }


AGREEMENT_COLUMNS = (
    "nn_same_token",
    "raw_nn_same_token",
    "nn_same_bigram",
    "raw_nn_same_bigram",
    "pair_same_token",
    "pair_same_bigram",
)
