"""Which feature clusters fire together, as arrays: dense feature ids, the pairs sharing a token (a sparse XᵀX),
their scores and the plan of merge ranges. `ne.coactivation` reads and writes the tables around it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ne.errors import ConfigError

SCORES = ("count", "jaccard", "pmi", "npmi", "cosine")
PAIR_ROW_BYTES = 48
"""Memory per pair row while a range is merged: key, count, the sort's copies and the output columns."""


@dataclass(frozen=True)
class FeatureIds:
    """Dense ids 0..n-1 of a run's feature clusters, in (layer, neuron, cluster) order."""

    layer: np.ndarray
    neuron: np.ndarray
    cluster: np.ndarray
    starts: dict[int, np.ndarray]
    """Per layer, the id of unit j's cluster 0 at [j]; [j + 1] - [j] clusters."""

    @property
    def n(self) -> int:
        return len(self.layer)

    def ids(self, layer: int, unit: np.ndarray, cluster: np.ndarray) -> np.ndarray:
        """The ids of (layer, unit, cluster) rows; -1 where cluster is -1 (a unit without clusters)."""
        start = self.starts[layer]
        out = start[unit] + cluster
        return np.where(cluster >= 0, out, -1)

    def id_of(self, layer: int, neuron: int, cluster: int) -> int | None:
        start = self.starts.get(layer)
        if start is None or not 0 <= neuron < len(start) - 1 or not 0 <= cluster < start[neuron + 1] - start[neuron]:
            return None
        return int(start[neuron] + cluster)


def strongest(token: np.ndarray, strength: np.ndarray, per_token: int | None) -> np.ndarray:
    """Indices of the rows that pair up: all, or the `per_token` strongest of each token (ties: the first)."""
    if per_token is None or not len(token):
        return np.arange(len(token))
    order = np.lexsort((-strength, token))
    t = token[order]
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    rank = np.arange(len(t)) - np.repeat(starts, np.diff(np.r_[starts, len(t)]))
    return np.sort(order[rank < per_token])


def token_pairs(feature: np.ndarray, token: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys a × n_features + b, counts) of every ordered pair a != b of features sharing a token, sorted by key:
    the off-diagonal of XᵀX for the token × feature incidence matrix X (a compiled sparse product)."""
    if not len(token):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.unique(token, return_inverse=True)[1]
    x = sp.csr_matrix((np.ones(len(feature), np.int32), (rows, feature)), shape=(int(rows.max()) + 1, n_features))
    c = x.T.tocsr() @ x
    c.sort_indices()  # row-major with sorted columns: the keys come out sorted
    a = np.repeat(np.arange(n_features, dtype=np.int64), np.diff(c.indptr))
    off = a != c.indices
    return a[off] * n_features + c.indices[off], c.data[off].astype(np.int64)


def sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, summed counts), sorted by key."""
    if not len(keys):
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts.astype(np.int64), starts)


def plan_ranges(pair_rows: np.ndarray, memory_mb: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of feature ids, consecutive, each with at most `memory_mb` of pair rows (a feature alone
    over it is its own range)."""
    budget = max(1, memory_mb * 2**20 // PAIR_ROW_BYTES)
    ranges, lo, used = [], 0, 0
    for f, rows in enumerate(pair_rows.tolist()):
        if used and used + rows > budget:
            ranges.append((lo, f))
            lo, used = f, 0
        used += rows
    ranges.append((lo, len(pair_rows)))
    return ranges


def scores(kind: str, count: np.ndarray, n_a: np.ndarray, n_b: np.ndarray, n_tokens: int) -> np.ndarray:
    """The co-activation score of pairs that fire together on `count` of `n_tokens` tokens, a on n_a, b on n_b."""
    c, na, nb = (np.asarray(x, np.float64) for x in (count, n_a, n_b))
    if kind == "count":
        return c
    if kind == "jaccard":
        return c / (na + nb - c)
    if kind == "cosine":
        return c / np.sqrt(na * nb)
    pmi = np.log(c * n_tokens / (na * nb))
    if kind == "pmi":
        return pmi
    if kind == "npmi":
        joint = -np.log(c / n_tokens)
        return np.where(joint > 0, pmi / np.where(joint > 0, joint, 1.0), 1.0)
    raise ConfigError(f"coactivation.score is {kind!r}; choose one of {', '.join(map(repr, SCORES))}")


def quantile(x: np.ndarray, start: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """Quantile q (numpy's linear rule) of each group of sorted x: x[start[i] : start[i] + n[i]]; NaN where empty."""
    out = np.full(len(n), np.nan)
    has = n > 0
    at = q * (n[has] - 1)
    below = np.floor(at).astype(np.int64)
    above = np.minimum(below + 1, n[has] - 1)
    lo_v, hi_v = x[start[has] + below], x[start[has] + above]
    out[has] = lo_v + (at - below) * (hi_v - lo_v)
    return out
