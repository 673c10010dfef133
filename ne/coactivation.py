"""Which feature clusters fire together: counts over held-out tokens, in two steps that never hold all pairs.

Every feature cluster of the run gets a dense id, in (layer, neuron, cluster) order (`FeatureIds`). Step 1, per
held-out part (`part_counts`): every pair of features occurring on the same token, counted (a sparse XᵀX), keyed
by `a × n_features + b` and written sorted by that key, with each occurrence's activation by feature. Step 2, per
range of features a (`merge_range`): the parts' rows of the range, read through their sorted keys, summed, cut
at `coactivation.min_count`, scored, and each feature's best `coactivation.partners` kept; and each feature's
occurrence count, density and activation quantiles. The ranges are cut so that one holds at most
`coactivation.memory_mb` of pair rows. A pair is stored in both orders, so one feature's partners are one read of
its rows (`CoActivation.partners`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ne import schema
from ne.compute.coactivation import FeatureIds, quantile, scores, strongest, sum_by_key, token_pairs
from ne.rundir.store import RunDir
from ne.rundir.weights import read_layer_weights

QUANTILES = (0.1, 0.5, 0.9)


def feature_ids(run: RunDir, layers: Sequence[int]) -> FeatureIds:
    """Every cluster of `centroids/` (outliers too), read without the vectors."""
    parts, starts, offset = [], {}, 0
    for layer in sorted(layers):
        table = run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer), columns=["neuron", "cluster"])
        table = table.sort_by([("neuron", "ascending"), ("cluster", "ascending")])
        neuron = table.column("neuron").to_numpy().astype(np.int64)
        d_mlp = read_layer_weights(run, layer, 0, 0).d_mlp
        starts[layer] = offset + np.searchsorted(neuron, np.arange(d_mlp + 1))
        parts.append(
            (
                np.full(len(neuron), layer, np.int16),
                neuron.astype(np.int32),
                table.column("cluster").to_numpy().astype(np.int32),
            )
        )
        offset += len(neuron)
    if not parts:
        return FeatureIds(np.zeros(0, np.int16), np.zeros(0, np.int32), np.zeros(0, np.int32), starts)
    layer_f, neuron_f, cluster_f = (np.concatenate(c) for c in zip(*parts))
    return FeatureIds(layer_f, neuron_f, cluster_f, starts)


# --- step 1: one held-out part ---------------------------------------------------------------------------

PAIRS = pa.schema([("key", pa.int64()), ("count", pa.int32())])
ACTS = pa.schema([("feature", pa.int32()), ("act", pa.float32())])


def part_counts(
    occurrences: Sequence[pa.Table],
    ids: FeatureIds,
    n_ctx: int,
    extremes: dict[int, np.ndarray],
    max_per_token: int | None = None,
) -> tuple[pa.Table, pa.Table, np.ndarray, np.ndarray]:
    """(pairs, acts, pair rows per feature, occurrences per feature) of one held-out part's occurrences (all its
    layers): PAIRS rows of every ordered pair of distinct features on a token, counted and sorted by key; ACTS rows
    sorted by feature; the two counts as arrays over all feature ids, for planning step 2. With `max_per_token`,
    only the strongest that many occurrences of a token (by act / its unit's maximum, `extremes` signed as the
    harvest's) pair up there."""
    feature, token, act, strength = [], [], [], []
    for table in occurrences:
        if table.num_rows == 0:
            continue
        layer = int(table.column("layer")[0].as_py())
        unit = table.column("unit").to_numpy().astype(np.int64)
        f = ids.ids(layer, unit, table.column("cluster").to_numpy())
        keep = f >= 0
        a = table.column("act").to_numpy()
        feature.append(f[keep])
        token.append(table.column("ctx_id").to_numpy()[keep] * n_ctx + table.column("pos").to_numpy()[keep])
        act.append(a[keep])
        strength.append(a[keep] / extremes[layer][unit[keep]])
    f = np.concatenate(feature) if feature else np.zeros(0, np.int64)
    t = np.concatenate(token) if token else np.zeros(0, np.int64)
    a = np.concatenate(act) if act else np.zeros(0, np.float32)
    by_feature = np.lexsort((a, f))
    acts = pa.table([pa.array(f[by_feature].astype(np.int32)), pa.array(a[by_feature].astype(np.float32))], schema=ACTS)
    paired = strongest(t, np.abs(np.concatenate(strength)) if strength else a, max_per_token)
    keys, counts = token_pairs(f[paired], t[paired], ids.n)
    pairs = pa.table([pa.array(keys), pa.array(counts.astype(np.int32))], schema=PAIRS)
    return pairs, acts, np.bincount(keys // max(ids.n, 1), minlength=ids.n), np.bincount(f, minlength=ids.n)


# --- step 2: one range of features -----------------------------------------------------------------------


def merge_pairs(tables: Sequence[pa.Table], min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) summed over parts, only those reaching `min_count`."""
    keys = np.concatenate([t.column("key").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    counts = np.concatenate([t.column("count").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    keys, counts = sum_by_key(keys, counts)
    keep = counts >= min_count
    return keys[keep], counts[keep]


def coactivation_tables(
    keys: np.ndarray,
    counts: np.ndarray,
    ids: FeatureIds,
    occurrences: np.ndarray,
    n_tokens: int,
    kind: str,
    partners: int | None = None,
) -> dict[int, pa.Table]:
    """COACTIVATION rows of merged pairs, by the first feature's layer, sorted by it then best first (score, then
    count, then the partner's id, which is its (layer, neuron, cluster) order); each feature's first `partners`."""
    a, b = keys // ids.n, keys % ids.n
    score = scores(kind, counts, occurrences[a], occurrences[b], n_tokens).astype(np.float32)
    # keys come sorted by (a, b), and lexsort is stable: b stays ascending among equals
    order = np.lexsort((-counts, a)) if kind == "count" else np.lexsort((-counts, -score, a))
    a, b, counts, score = a[order], b[order], counts[order], score[order]
    if partners is not None and len(a):
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
        keep = rank < partners
        a, b, counts, score = a[keep], b[keep], counts[keep], score[keep]
    out = {}
    for layer in np.unique(ids.layer[a]).tolist():
        rows = ids.layer[a] == layer
        ra, rb = a[rows], b[rows]
        out[layer] = pa.table(
            [
                pa.array(ids.layer[ra]),
                pa.array(ids.neuron[ra]),
                pa.array(ids.cluster[ra]),
                pa.array(ids.layer[rb]),
                pa.array(ids.neuron[rb]),
                pa.array(ids.cluster[rb]),
                pa.array(counts[rows].astype(np.int32)),
                pa.array(score[rows]),
            ],
            schema=schema.COACTIVATION,
        )
    return out


def feature_stats(acts: Sequence[pa.Table], lo: int, hi: int, ids: FeatureIds, n_tokens: int, sign: float) -> pa.Table:
    """FEATURES rows of features lo..hi-1: occurrences, density and activation quantiles (numpy's linear rule)."""
    f = np.concatenate([t.column("feature").to_numpy() for t in acts]) if acts else np.zeros(0, np.int32)
    x = np.concatenate([t.column("act").to_numpy() for t in acts]) if acts else np.zeros(0, np.float32)
    order = np.lexsort((x, f))
    f, x = f[order].astype(np.int64) - lo, x[order].astype(np.float64)
    n = np.bincount(f, minlength=hi - lo)[: hi - lo]
    start = np.cumsum(n) - n
    cols = []
    for q in QUANTILES:
        cols.append(quantile(x, start, n, q))
    peak = np.full(hi - lo, np.nan)
    has = n > 0
    peak[has] = x[start[has] + (n[has] - 1 if sign > 0 else 0)]
    return pa.table(
        [
            pa.array(ids.layer[lo:hi]),
            pa.array(ids.neuron[lo:hi]),
            pa.array(ids.cluster[lo:hi]),
            pa.array(n.astype(np.int64)),
            pa.array(n / max(n_tokens, 1)),
            *[pa.array(c.astype(np.float32)) for c in cols],
            pa.array(peak.astype(np.float32)),
        ],
        schema=schema.FEATURES,
    )


# --- reading ---------------------------------------------------------------------------------------------


@dataclass
class Partner:
    """A feature cluster that fires on the same held-out tokens as the one asked about."""

    layer: int
    neuron: int
    cluster: int
    count: int
    """Held-out tokens where both occur."""
    score: float
    """coactivation.score of the pair."""


class CoActivation:
    """The co-activation table and per-feature statistics of a run; `partners` reads one feature's rows."""

    def __init__(self, run_dir: str | RunDir):
        from ne.rundir.reader import RunData
        from ne.rundir.stages import require_done

        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        manifest = self.run.require_manifest()
        self.entry = require_done(self.run, "coactivation", manifest)
        self.data = RunData(self.run.url)
        self.score = self.data.config(manifest).coactivation.score  # as the stage that wrote the table ran
        self.n_tokens = int(self.entry["info"]["tokens"])
        self._features: pa.Table | None = None

    def features(self) -> pa.Table:
        """FEATURES rows of every feature cluster (one small row each), read once."""
        if self._features is None:
            self._features = self.run.read_parquet(schema.FEATURES_DIR)
        return self._features

    def stats(self, layer: int, neuron: int, cluster: int) -> dict | None:
        """The FEATURES row of one feature cluster, or None when the run has no such cluster."""
        rows = self.data.sorted_rows(schema.FEATURES_DIR, None, "neuron", [neuron]).to_pylist()
        found = [r for r in rows if r["layer"] == layer and r["cluster"] == cluster]
        return found[0] if found else None

    def partners(
        self,
        layer: int,
        neuron: int,
        cluster: int,
        k: int | None = None,
        exclude_same_neuron: bool = True,
        layers: Sequence[int] | None = None,
    ) -> list[Partner]:
        """Features that fire together with (layer, neuron, cluster), best score first (then most tokens
        together); `layers` keeps those of the layers given."""
        folder = schema.layer_dir(schema.COACTIVATION_DIR, layer)
        if not self.run.exists(folder):
            return []
        table = self.data.sorted_rows(schema.COACTIVATION_DIR, layer, "neuron", [neuron])
        if table.num_rows == 0:
            return []
        mask = pc.equal(table.column("cluster"), cluster)
        if exclude_same_neuron:
            mask = pc.and_(
                mask,
                pc.invert(
                    pc.and_(pc.equal(table.column("layer_b"), layer), pc.equal(table.column("neuron_b"), neuron))
                ),
            )
        if layers is not None:
            mask = pc.and_(mask, pc.is_in(table.column("layer_b"), pa.array(list(layers), pa.int16())))
        rows = table.filter(mask).to_pydict()
        out = [
            Partner(lb, nb, cb, c, s)
            for lb, nb, cb, c, s in zip(
                rows["layer_b"], rows["neuron_b"], rows["cluster_b"], rows["count"], rows["score"]
            )
        ]
        out.sort(key=lambda p: (-p.score, -p.count, p.layer, p.neuron, p.cluster))
        return out if k is None else out[:k]
