"""Polysemy metrics of a neuron, from the cosine distances of its examples and their feature clusters.

Conventions for degenerate cases (they are NaN, never a made-up number):
- `max_dist`, `mean_dist`: NaN with fewer than 2 examples (no pair).
- `intra_dist`: mean distance over pairs in the same cluster; NaN when every cluster is a singleton.
- `inter_dist`: mean distance over pairs in different clusters; NaN with a single cluster.
- `silhouette`: scikit-learn's definition (a singleton's own score is 0), defined only for
  2 <= clusters <= n - 1, like `sklearn.metrics.silhouette_score`; NaN otherwise.
- `n_clusters` counts the clusters that are not outliers (size >= `cluster.min_cluster_size`).
`raw_*` are the same metrics when the raw pre-MLP embeddings h are clustered the same way (w = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ne.cluster import Clusters, cluster_examples, one_hot
from ne.config import ClusterConfig
from ne.embed import cosine_distances

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
    sizes = np.bincount(labels, minlength=n_clusters)
    own = sizes[labels]
    a = sums_nc[np.arange(n), labels] / np.maximum(own - 1, 1)
    mean_to = sums_nc / sizes
    mean_to[np.arange(n), labels] = np.inf
    b = mean_to.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    s[own == 1] = 0.0
    return float(s.mean())


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


@dataclass
class NeuronResult:
    """Everything the cluster stage keeps for one neuron."""

    clusters: Clusters
    """Feature clusters of the neuron embeddings."""
    metrics: dict[str, float | int]
    """Metrics of the neuron-embedding clusters, then `raw_*` for the pre-MLP clusters."""


def analyse_neurons(
    h_bnd: Float[Tensor, "b n d_model"],
    counts: Int[np.ndarray, " b"],
    w_bd: Float[Tensor, "b d_model"],
    cfg: ClusterConfig,
    device: str | torch.device | None = "auto",
) -> list[NeuronResult]:
    """Cluster a batch of neurons (zero-padded examples, `counts` real ones each) and measure them."""
    ne_dist = cosine_distances(h_bnd, w_bd, device=device).cpu().numpy()
    raw_dist = cosine_distances(h_bnd, None, device=device).cpu().numpy()
    results = []
    for b, n in enumerate(counts):
        d_ne, d_raw = ne_dist[b, :n, :n], raw_dist[b, :n, :n]
        clusters = cluster_examples(d_ne, cfg.threshold, cfg.method, cfg.min_cluster_size)
        raw = cluster_examples(d_raw, cfg.threshold, cfg.method, cfg.min_cluster_size)
        metrics = neuron_metrics(d_ne, clusters)
        metrics.update({f"raw_{k}": v for k, v in neuron_metrics(d_raw, raw).items() if k != "n_examples"})
        results.append(NeuronResult(clusters, metrics))
    return results
