"""Feature clusters of one neuron: agglomerative clustering of its examples, cut at a distance threshold.

The threshold is either fixed (`cluster.cut: fixed`, every neuron at `cluster.threshold`) or chosen for each
neuron from its own dendrogram (`cluster.cut: silhouette`, `per_neuron_threshold`). Clusters are numbered by
size (0 is the largest; ties go to the cluster whose first member has the lower rank), so the numbering
depends only on the input, never on scipy's internal label order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Int
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from ne.config import ClusterConfig

METHODS = ("average", "single", "complete")
NAN = float("nan")


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
    threshold: float = NAN
    """The cut: merges at heights <= threshold are joined (`cut`). NaN with fewer than 2 examples."""

    @property
    def n_clusters(self) -> int:
        return len(self.central)


def linkage_of(dist_nn: Float[np.ndarray, "n n"], method: str = "average") -> Float[np.ndarray, "n_minus_1 4"]:
    """scipy's linkage of a square distance matrix (zero diagonal); empty with fewer than 2 examples."""
    if method not in METHODS:
        raise ValueError(f"linkage method {method!r}; choose one of {METHODS}")
    if len(dist_nn) < 2:
        return np.zeros((0, 4))
    return linkage(squareform(np.asarray(dist_nn, dtype=np.float64), checks=False), method=method)


def cluster_examples(
    dist_nn: Float[np.ndarray, "n n"],
    threshold: float,
    method: str = "average",
    min_cluster_size: int = 1,
    z: Float[np.ndarray, "n_minus_1 4"] | None = None,
) -> Clusters:
    """Cluster one neuron's examples given their pairwise cosine distances (square, zero diagonal), cutting
    the dendrogram at `threshold`. `z`: its linkage, when already computed."""
    dist_nn = np.asarray(dist_nn, dtype=np.float64)
    z = linkage_of(dist_nn, method) if z is None else z
    n = dist_nn.shape[0]
    if n < 2:
        return Clusters(
            labels=np.zeros(n, dtype=np.int32),
            central=np.zeros(min(n, 1), dtype=np.int64),
            outlier=np.full(n, min_cluster_size > 1),
            linkage=z,
        )
    labels = relabel_by_size(cut(z, threshold))
    sizes = np.bincount(labels)
    return Clusters(
        labels=labels,
        central=central_examples(dist_nn, labels),
        outlier=sizes[labels] < min_cluster_size,
        linkage=z,
        threshold=float(threshold),
    )


def cluster_neuron(dist_nn: Float[np.ndarray, "n n"], cfg: ClusterConfig) -> Clusters:
    """Cluster one neuron's examples as `cfg` says: its linkage method and its cut (`cfg.cut`)."""
    z = linkage_of(dist_nn, cfg.method)
    threshold = cfg.threshold if cfg.cut == "fixed" else per_neuron_threshold(dist_nn, z, cfg)
    return cluster_examples(dist_nn, threshold, cfg.method, cfg.min_cluster_size, z=z)


def cut_thresholds(
    dist_nn: Float[np.ndarray, "n n"], z: Float[np.ndarray, "n_minus_1 4"], cfg: ClusterConfig
) -> dict[str, float]:
    """Each cut rule's threshold for one neuron's dendrogram: `fixed` (`cfg.threshold`) and `silhouette`
    (`per_neuron_threshold`); NaN with fewer than 2 examples."""
    fixed = cfg.threshold if len(z) else NAN
    return {"fixed": fixed, "silhouette": per_neuron_threshold(dist_nn, z, cfg)}


def per_neuron_threshold(
    dist_nn: Float[np.ndarray, "n n"], z: Float[np.ndarray, "n_minus_1 4"], cfg: ClusterConfig
) -> float:
    """The cut of one neuron's dendrogram chosen by the silhouette of its clusters.

    Candidates are the cuts into k = 2..`cfg.max_clusters` clusters that some threshold gives (no tie
    between the heights of the merges kept and those undone) and that separate no two clusters closer than
    `cfg.min_separation` (the lowest undone merge is higher). Among them, the finest whose silhouette is
    within `cfg.silhouette_tolerance` of the best is taken: the silhouette favours coarse partitions, and a
    merged pair of behaviours is lost to the reader while a split one still shows as two clusters. No
    candidate, or a best silhouette below `cfg.min_silhouette`, means one cluster. The threshold returned
    lies halfway between the highest merge kept and the lowest undone, so the viewer's line sits in the gap.
    NaN with fewer than 2 examples.
    """
    n = len(z) + 1
    if n < 2:
        return NAN
    heights = z[:, 2]
    # Heights ascend, so the cuts that undo only merges above min_separation are those into at most
    # `separable` + 1 clusters: only they are scored.
    separable = int(np.count_nonzero(heights > cfg.min_separation))
    scores = silhouette_by_clusters(dist_nn, z, min(cfg.max_clusters, separable + 1))
    ks = np.arange(2, len(scores))
    ks = ks[np.isfinite(scores[ks]) & (heights[n - ks - 1] < heights[n - ks])]
    if not len(ks) or scores[ks].max() < cfg.min_silhouette:
        return float(heights[-1])
    k = int(ks[scores[ks] >= scores[ks].max() - cfg.silhouette_tolerance].max())
    kept, undone = float(heights[n - k - 1]), float(heights[n - k])
    threshold = kept + (undone - kept) / 2
    return threshold if kept <= threshold < undone else kept  # adjacent floats: the kept height still cuts


def silhouette_by_clusters(
    dist_nn: Float[np.ndarray, "n n"], z: Float[np.ndarray, "n_minus_1 4"], k_max: int
) -> Float[np.ndarray, " k_max_plus_1"]:
    """Mean silhouette of the dendrogram cut into k clusters (its first n - k merges joined), k = 0..k_max;
    NaN where undefined (k < 2 or k > n - 1).

    Every level at once: each example's summed distance to each of the k_max finest clusters is one matrix
    product, and each coarser level's sums are those columns added up by the clusters they have merged into
    (a second product); the merges themselves are followed on k_max cluster ids, in plain Python.
    """
    n = len(z) + 1
    out = np.full(k_max + 1, NAN)
    k_top = min(k_max, n - 1)
    if k_top < 2:
        return out
    roots, labels = np.unique(cut_into(z, k_top), return_inverse=True)  # cluster j is the subtree roots[j]
    cluster_of_node = dict(zip(roots.tolist(), range(k_top)))
    group = list(range(k_top))  # group[j]: what finest cluster j belongs to at this level, named by its lowest j
    groups = [group.copy()]
    for m, (a, b) in enumerate(z[n - k_top : n - 2, :2].astype(np.int64).tolist(), start=n - k_top):
        keep, gone = sorted((cluster_of_node[a], cluster_of_node[b]))
        group = [keep if g == gone else g for g in group]
        cluster_of_node[n + m] = keep
        groups.append(group)
    groups_lj = np.array(groups)  # level l has k_top - l clusters
    member_jlc = (groups_lj[None, :, :] == np.arange(k_top)[:, None, None]).transpose(2, 1, 0)
    member_jlc = member_jlc.astype(np.float64)  # [finest j, level, cluster]: j belongs to the cluster
    n_levels = len(groups_lj)
    sums_n_j = np.asarray(dist_nn, dtype=np.float64) @ one_hot(labels)
    sums_lcn = np.ascontiguousarray((sums_n_j @ member_jlc.reshape(k_top, -1)).T).reshape(n_levels, k_top, n)
    sizes_lc = (np.bincount(labels, minlength=k_top) @ member_jlc.reshape(k_top, -1)).reshape(n_levels, k_top)
    out[k_top - np.arange(n_levels)] = silhouettes(sums_lcn, sizes_lc, groups_lj[:, labels])
    return out


def silhouettes(
    sums_lcn: Float[np.ndarray, "L C n"], sizes_lc: Float[np.ndarray, "L C"], labels_ln: Int[np.ndarray, "L n"]
) -> Float[np.ndarray, " L"]:
    """Mean silhouette (scikit-learn's: a singleton scores 0) of L labellings of the same n examples, from each
    example's summed distance to each cluster (its own included); clusters of size 0 are absent. The caller
    ensures 2 <= clusters <= n - 1. Examples run along the last axis so that the minimum over clusters is
    taken across rows, which numpy vectorises, rather than along 20-element rows, which it does not."""
    lvl, ex = np.arange(labels_ln.shape[0])[:, None], np.arange(labels_ln.shape[1])[None, :]
    own_size = sizes_lc[lvl, labels_ln]
    a = sums_lcn[lvl, labels_ln, ex] / np.maximum(own_size - 1, 1)
    mean_to = sums_lcn / np.where(sizes_lc > 0, sizes_lc, 1.0)[:, :, None]
    mean_to += np.where(sizes_lc > 0, 0.0, np.inf)[:, :, None]
    mean_to[lvl, labels_ln, ex] = np.inf
    b = mean_to.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    s[own_size == 1] = 0.0
    return s.mean(axis=1)


def cut(z: Float[np.ndarray, "n_minus_1 4"], threshold: float) -> Int[np.ndarray, " n"]:
    """Flat clusters joining every merge at height <= threshold: scipy's `fcluster(z, t, 'distance')`.

    Equal to fcluster for the monotone linkages used here (average, single, complete), without its
    per-call validation, which costs more than the linkage itself at 100 examples. Labels are the index
    of each leaf's topmost joined node (arbitrary numbers; `relabel_by_size` makes them canonical).
    """
    return _join(z, np.flatnonzero(z[:, 2] <= threshold))


def cut_into(z: Float[np.ndarray, "n_minus_1 4"], k: int) -> Int[np.ndarray, " n"]:
    """The dendrogram cut into exactly k clusters (1 <= k <= n) by joining its first n - k merges: what a
    threshold gives unless merge heights tie (then `fcluster`'s 'maxclust' may give fewer). Labels as `cut`."""
    return _join(z, np.arange(len(z) + 1 - k))


def _join(z: Float[np.ndarray, "n_minus_1 4"], joined: Int[np.ndarray, " m"]) -> Int[np.ndarray, " n"]:
    n = len(z) + 1
    parent = np.arange(2 * n - 1)
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
