"""Feature clusters of one neuron: agglomerative clustering of its examples, cut at a distance threshold.

Clusters are numbered by size (0 is the largest; ties go to the cluster whose first member has the lower
rank), so the numbering depends only on the input, never on scipy's internal label order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Int
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

METHODS = ("average", "single", "complete")


@dataclass
class Clusters:
    """The feature clusters of one neuron's n examples."""

    labels: Int[np.ndarray, " n"]
    """Cluster of each example: 0..C-1, 0 the largest."""
    central: Int[np.ndarray, " C"]
    """Per cluster, the example with the highest mean cosine similarity to the other members."""
    outlier: Bool[np.ndarray, " n"]
    """The example's cluster is smaller than the minimum cluster size."""
    linkage: Float[np.ndarray, "n_minus_1 4"]
    """scipy's linkage matrix, for the dendrogram."""

    @property
    def n_clusters(self) -> int:
        return len(self.central)


def cluster_examples(
    dist_nn: Float[np.ndarray, "n n"], threshold: float, method: str = "average", min_cluster_size: int = 1
) -> Clusters:
    """Cluster one neuron's examples given their pairwise cosine distances (square, zero diagonal)."""
    if method not in METHODS:
        raise ValueError(f"linkage method {method!r}; choose one of {METHODS}")
    dist_nn = np.asarray(dist_nn, dtype=np.float64)
    n = dist_nn.shape[0]
    if n < 2:
        return Clusters(
            labels=np.zeros(n, dtype=np.int32),
            central=np.zeros(min(n, 1), dtype=np.int64),
            outlier=np.full(n, min_cluster_size > 1),
            linkage=np.zeros((0, 4)),
        )
    z = linkage(squareform(dist_nn, checks=False), method=method)
    labels = relabel_by_size(cut(z, threshold))
    sizes = np.bincount(labels)
    return Clusters(
        labels=labels,
        central=central_examples(dist_nn, labels),
        outlier=sizes[labels] < min_cluster_size,
        linkage=z,
    )


def cut(z: Float[np.ndarray, "n_minus_1 4"], threshold: float) -> Int[np.ndarray, " n"]:
    """Flat clusters joining every merge at height <= threshold: scipy's `fcluster(z, t, 'distance')`.

    Equal to fcluster for the monotone linkages used here (average, single, complete), without its
    per-call validation, which costs more than the linkage itself at 100 examples. Labels are the index
    of each leaf's topmost joined node (arbitrary numbers; `relabel_by_size` makes them canonical).
    """
    n = len(z) + 1
    parent = np.arange(2 * n - 1)
    joined = np.flatnonzero(z[:, 2] <= threshold)
    parent[z[joined, 0].astype(np.int64)] = n + joined
    parent[z[joined, 1].astype(np.int64)] = n + joined
    while True:  # pointer jumping: every leaf reaches its root in log(depth) steps
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent[:n]
        parent = nxt


def relabel_by_size(raw: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
    """Renumber arbitrary cluster labels 0..C-1 by decreasing size, ties by first member."""
    uniq, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # last key sorts first
    new_of_old = np.empty(len(uniq), dtype=np.int32)
    new_of_old[order] = np.arange(len(uniq), dtype=np.int32)
    return new_of_old[inverse]


def central_examples(dist_nn: Float[np.ndarray, "n n"], labels: Int[np.ndarray, " n"]) -> Int[np.ndarray, " C"]:
    """Per cluster, the member with the lowest mean distance (highest mean similarity) to the others.

    The diagonal is zero, so a member's row sum over its cluster is its total distance to the others;
    the lowest rank wins ties, and a singleton is its own central example.
    """
    n = len(labels)
    to_own = (dist_nn @ one_hot(labels))[np.arange(n), labels]
    order = np.lexsort((np.arange(n), to_own, labels))  # by cluster, then distance, then rank
    return order[np.searchsorted(labels[order], np.arange(int(labels.max()) + 1))]


def one_hot(labels: Int[np.ndarray, " n"]) -> Float[np.ndarray, "n C"]:
    out = np.zeros((len(labels), int(labels.max()) + 1 if len(labels) else 0))
    out[np.arange(len(labels)), labels] = 1.0
    return out
