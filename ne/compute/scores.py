"""Scores of what a feature is said to be, on text its clusters were not built from.

- **Label detection**: a label is a rule (`ne.compute.label.Rule`), so it can be run over tokens. Its precision is
  the share of the held-out tokens it matches where its cluster fires; its recall, the share of its cluster's held-out
  firings it matches. Firings come from the `occurrence` stage's table (every held-out token where a unit fires, as
  which cluster: `occurrence_detection`, given its rows), or from held-out examples with the tokens around them where
  the unit stays below its threshold (`label_detection`, `below_threshold`).
- **Embedding score**, the measure of delphi's example-embedding scorer: embed each example's text with a sentence
  encoder (all-MiniLM-L6-v2, which the demo ships); a held-out example should lie closer, on average, to its own
  cluster's examples than to the neuron's other clusters' (`embedding_deltas`, `embedding_score`). For a whole run,
  windows come from encoder states summed per token (`window_embeddings`) and clusters are kept as sums of their
  examples' embeddings (`ClusterSums`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from ne.compute.embed import unit_rows
from ne.compute.label import NONE, OFFSETS, Rule


@dataclass
class Counts:
    """How a rule did on held-out tokens: matched firings (tp), matched other tokens (fp), missed firings (fn)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else float("nan")


def label_detection(
    rules: Mapping[int, Rule], firing: Mapping[int, np.ndarray], quiet: np.ndarray
) -> dict[int, Counts]:
    """Per cluster of one unit: its rule against the held-out tokens, where `firing[c]` ([n, 3] tokens around each
    held-out firing of cluster c, as `ne.rundir.contexts.tokens_at` gives them) are its positives, and every other
    cluster's firings and the tokens where the unit does not fire (`quiet`) its negatives."""
    out = {}
    for c, rule in rules.items():
        mine = firing.get(c, np.zeros((0, 3), np.int64))
        tp = int(rule.matches(mine).sum())
        fp = int(rule.matches(quiet).sum()) + sum(int(rule.matches(t).sum()) for d, t in firing.items() if d != c)
        out[c] = Counts(tp, fp, len(mine) - tp)
    return out


def unit_detection(rules: Sequence[Rule], firing: np.ndarray, quiet: np.ndarray) -> Counts:
    """Whether a unit fires at all, said by any of `rules` (one per cluster, or one for the whole unit)."""

    def hits(toks: np.ndarray) -> np.ndarray:
        out = np.zeros(len(toks), bool)
        for rule in rules:
            out |= rule.matches(toks)
        return out

    tp = int(hits(firing).sum())
    return Counts(tp, int(hits(quiet).sum()), len(firing) - tp)


def below_threshold(
    tokens: Sequence[np.ndarray],
    window_start: Sequence[int],
    windows: Sequence[np.ndarray],
    threshold: float,
    sign: float = 1.0,
    skip: Sequence[int] = (),
) -> np.ndarray:
    """[n, 3] tokens around every position of the examples' stored activation windows where the unit stays below
    `threshold` (in `sign` × act): tokens known not to fire. `tokens`: each example's whole context; `skip`: token ids
    never counted (BOS, padding)."""
    rows = []
    for toks, start, window in zip(tokens, window_start, windows):
        toks = np.asarray(toks, np.int64)
        quiet = start + np.flatnonzero(sign * np.asarray(window, np.float64) < threshold)
        quiet = quiet[~np.isin(toks[quiet], skip)]
        rows.append(around(toks, quiet))
    return np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)


def around(tokens: Int[np.ndarray, " p"], positions: Int[np.ndarray, " n"]) -> Int[np.ndarray, "n 3"]:
    """The tokens at `OFFSETS` of each position of one context (`NONE` outside it)."""
    out = np.full((len(positions), len(OFFSETS)), NONE, np.int64)
    for j, offset in enumerate(OFFSETS):
        at = positions + offset
        inside = (at >= 0) & (at < len(tokens))
        out[inside, j] = tokens[at[inside]]
    return out


def occurrence_detection(
    occ_ctx: Int[np.ndarray, " m"],
    occ_pos: Int[np.ndarray, " m"],
    occ_cluster: Int[np.ndarray, " m"],
    rules: Mapping[int, Rule],
    contexts: Mapping[int, np.ndarray],
    skip: Sequence[int] = (),
) -> dict[int, Counts]:
    """Per cluster of one unit: its rule run over every token of the held-out `contexts` ({ctx_id: tokens}), against
    the unit's firings there (`occ_*`: the ctx_id, pos and cluster columns of its rows of the occurrence table,
    `schema.OCCURRENCES`): precision and recall of the rule as a detector of its cluster's held-out occurrences among
    all other held-out tokens (`skip`: ids never counted; firings outside `contexts` are ignored)."""
    every = []
    for ctx, toks in contexts.items():
        toks = np.asarray(toks, np.int64)
        pos = np.flatnonzero(~np.isin(toks, skip))
        every.append((np.full(len(pos), ctx), pos, around(toks, pos)))
    ctx_all = np.concatenate([c for c, _, _ in every]) if every else np.zeros(0, np.int64)
    pos_all = np.concatenate([p for _, p, _ in every]) if every else np.zeros(0, np.int64)
    toks_all = np.concatenate([t for _, _, t in every]) if every else np.zeros((0, 3), np.int64)
    key = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(ctx_all, pos_all))}
    occ_ctx, occ_pos, occ_cluster = np.asarray(occ_ctx), np.asarray(occ_pos), np.asarray(occ_cluster)
    out = {}
    for c, rule in rules.items():
        hit = rule.matches(toks_all)
        mine = [
            key[(int(x), int(p))]
            for x, p in zip(occ_ctx[occ_cluster == c], occ_pos[occ_cluster == c])
            if (int(x), int(p)) in key
        ]
        tp = int(hit[mine].sum())
        out[c] = Counts(tp, int(hit.sum()) - tp, len(mine) - tp)
    return out


@dataclass
class EmbeddingScore:
    closer: float
    """Share of held-out examples closer (mean cosine) to their own cluster's examples than to the other clusters'."""
    delta: float
    """Mean over held-out examples of (mean cosine to own cluster) - (mean cosine to the other clusters)."""
    n: int
    """Held-out examples scored (those whose cluster and some other cluster of the unit have examples to compare)."""


def embedding_deltas(
    test_md: Float[np.ndarray, "m d"],
    test_cluster: Int[np.ndarray, " m"],
    train_nd: Float[np.ndarray, "n d"],
    train_cluster: Int[np.ndarray, " n"],
) -> np.ndarray:
    """For each held-out example of one unit: mean cosine to its own cluster's examples minus mean cosine to the
    examples of the unit's other clusters (NaN where either is empty). Rows need not be unit length."""

    sims = unit_rows(np.asarray(test_md, np.float64)) @ unit_rows(np.asarray(train_nd, np.float64)).T
    out = np.full(len(test_md), np.nan)
    for i, c in enumerate(test_cluster):
        own, other = train_cluster == c, train_cluster != c
        if own.any() and other.any():
            out[i] = sims[i, own].mean() - sims[i, other].mean()
    return out


def embedding_score(deltas: Sequence[np.ndarray]) -> EmbeddingScore:
    """`embedding_deltas` of many units, summed up."""
    d = np.concatenate([np.asarray(x, np.float64) for x in deltas]) if len(deltas) else np.zeros(0)
    d = d[np.isfinite(d)]
    return EmbeddingScore(
        float((d > 0).mean()) if len(d) else float("nan"), float(d.mean()) if len(d) else float("nan"), len(d)
    )


# --- every feature cluster's examples as sums of embeddings (the `embedding_scores` stage) --------------------


def window_embeddings(
    sums_t_d: Float[np.ndarray, "t d"], counts_t: Int[np.ndarray, " t"], before: int, after: int
) -> Float[np.ndarray, "t d"]:
    """Row p: the unit-length mean of the encoder states of run tokens p - before .. p + after (clipped to the
    context); a zero row where those tokens own no encoder token."""
    t = len(counts_t)
    csum = np.concatenate([np.zeros((1, sums_t_d.shape[1])), np.cumsum(sums_t_d, 0, dtype=np.float64)])
    ccount = np.concatenate([[0], np.cumsum(counts_t)])
    lo = np.clip(np.arange(t) - before, 0, t)
    hi = np.clip(np.arange(t) + after + 1, 0, t)
    n = (ccount[hi] - ccount[lo])[:, None]
    return unit_rows((csum[hi] - csum[lo]) / np.maximum(n, 1)).astype(np.float32)


CLUSTER_KEY = np.int64(2**32)
"""A feature cluster of one layer as one key, unit * CLUSTER_KEY + cluster (cluster -1, an occurrence of a unit
without clusters, is a key no cluster has)."""


class ClusterSums:
    """One layer's feature clusters, each as the sum and count of its examples' unit-length sentence embeddings. The
    mean cosine of a unit vector q to a set of examples is q · (their sum) / (their count), so `margins` gives
    `embedding_deltas` of any number of held-out tokens without the examples themselves."""

    def __init__(self, keys: Int[np.ndarray, " k"], d: int):
        self.keys = np.unique(np.asarray(keys, np.int64))
        self.sums = np.zeros((len(self.keys), d), np.float64)
        self.counts = np.zeros(len(self.keys), np.int64)
        self._units: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(each key's unit row, each unit's summed examples, its example count), made once after the last `add`."""
        if self._units is None:
            units, unit_of = np.unique(self.keys // CLUSTER_KEY, return_inverse=True)
            total = np.zeros((len(units), self.sums.shape[1]))
            np.add.at(total, unit_of, self.sums)
            self._units = unit_of, total, np.bincount(unit_of, weights=self.counts, minlength=len(units))
        return self._units

    def add(self, keys_n: Int[np.ndarray, " n"], unit_nd: Float[np.ndarray, "n d"]) -> None:
        """Examples of clusters in `keys`, as unit-length rows."""
        idx = np.searchsorted(self.keys, keys_n)
        if len(keys_n) and not np.array_equal(self.keys[idx.clip(0, len(self.keys) - 1)], keys_n):
            raise ValueError("an example names a cluster ClusterSums was not made with")
        for lo in range(0, len(idx), 65_536):  # add.at in slices: its temporary is one slice
            np.add.at(self.sums, idx[lo : lo + 65_536], unit_nd[lo : lo + 65_536])
        self.counts += np.bincount(idx, minlength=len(self.keys))
        self._units = None

    def margins(
        self, keys_m: Int[np.ndarray, " m"], rows_m: Int[np.ndarray, " m"], unit_td: Float[np.ndarray, "t d"]
    ) -> tuple[Int[np.ndarray, " m"], Float[np.ndarray, " m"]]:
        """(row of each occurrence's cluster in `keys`, its margin) for occurrences of clusters `keys_m` at tokens
        `rows_m` of `unit_td` (unit-length token embeddings): the mean cosine of the token's embedding to its
        cluster's examples minus that to the examples of its unit's other clusters. NaN where the cluster or the
        other clusters have no examples, or the token has no embedding (a zero row)."""
        unit_of, total, n_total = self.units()
        idx = np.searchsorted(self.keys, keys_m).clip(0, max(len(self.keys) - 1, 0))
        found = (self.keys[idx] == keys_m) if len(self.keys) else np.zeros(len(keys_m), bool)
        n_own, n_other = self.counts[idx], n_total[unit_of[idx]] - self.counts[idx]
        has_text = np.any(unit_td != 0, axis=1)[rows_m]
        ok = np.flatnonzero(found & (n_own > 0) & (n_other > 0) & has_text)
        margin = np.full(len(keys_m), np.nan)
        for lo in range(0, len(ok), 16_384):  # own and other are [rows, d] float64: a slice at a time
            rows = ok[lo : lo + 16_384]
            i = idx[rows]
            own = self.sums[i] / n_own[rows, None]
            other = (total[unit_of[i]] - self.sums[i]) / n_other[rows, None]
            margin[rows] = np.einsum("md,md->m", np.asarray(unit_td[rows_m[rows]], np.float64), own - other)
        return idx, margin


# --- every cluster's label on the whole held-out text (the `scores` stage) -----------------------------------

TOKEN_KEY = np.int64(2**32)
"""A held-out token as one key, ctx_id * TOKEN_KEY + pos."""
_PAIR = np.int64(2**32)
_NO_KEY = -2
"""Fills a rule's unused key slots: no token id, and not `NONE` either."""


def heldout_positions(
    contexts: Sequence[tuple[int, np.ndarray]], skip: Sequence[int] = ()
) -> tuple[Int[np.ndarray, " t"], Int[np.ndarray, "t 3"]]:
    """(sorted keys `ctx_id * TOKEN_KEY + pos`, the tokens at `OFFSETS` around each) of every token of the held-out
    `contexts` ((ctx_id, tokens) pairs) that is not in `skip` (BOS, padding: never an occurrence)."""
    keys, toks = [np.zeros(0, np.int64)], [np.zeros((0, len(OFFSETS)), np.int64)]
    for ctx, tokens in contexts:
        tokens = np.asarray(tokens, np.int64)
        pos = np.flatnonzero(~np.isin(tokens, skip))
        keys.append(int(ctx) * TOKEN_KEY + pos)
        toks.append(around(tokens, pos))
    key_t, toks_t3 = np.concatenate(keys), np.concatenate(toks)
    order = np.argsort(key_t, kind="stable")
    return key_t[order], toks_t3[order]


class TokenCounts:
    """How often each token, and each (neighbour, token) pair, occurs among tokens given as `OFFSETS` rows: how many
    of them a rule matches, without running it over each."""

    def __init__(self, toks_t3: Int[np.ndarray, "t 3"]):
        self.n = len(toks_t3)
        self.column = [np.unique(toks_t3[:, j], return_counts=True) for j in range(len(OFFSETS))]
        key = toks_t3[:, 1] * _PAIR
        self.pair = {offset: np.unique(key + toks_t3[:, 1 + offset] + 1, return_counts=True) for offset in (-1, 1)}

    @staticmethod
    def _count(table: tuple[np.ndarray, np.ndarray], values: np.ndarray) -> int:
        ids, counts = table
        if not len(ids):
            return 0
        i = np.searchsorted(ids, values).clip(0, len(ids) - 1)
        return int(np.where(ids[i] == values, counts[i], 0).sum())

    def matched(self, rule: Rule) -> int:
        """Tokens `rule` matches: as many as `rule.matches(toks_t3).sum()`."""
        keys = np.asarray(rule.keys, np.int64)
        if not rule.offset:
            return self._count(self.column[1], keys) if len(keys) else self.n
        if not len(keys):
            return self._count(self.column[1 + rule.offset], np.array([rule.context], np.int64))
        return self._count(self.pair[rule.offset], keys * _PAIR + rule.context + 1)


@dataclass
class RuleTable:
    """Many rules as arrays, to run each occurrence's own rule over its tokens in one go."""

    keys: Int[np.ndarray, "r k"]
    offset: Int[np.ndarray, " r"]
    context: Int[np.ndarray, " r"]

    @classmethod
    def of(cls, rules: Sequence[Rule]) -> RuleTable:
        width = max([len(r.keys) for r in rules] + [1])
        keys = np.full((len(rules), width), _NO_KEY, np.int64)
        for i, rule in enumerate(rules):
            keys[i, : len(rule.keys)] = rule.keys
        offset = np.array([r.offset for r in rules], np.int64)
        return cls(keys, offset, np.array([r.context for r in rules], np.int64))

    def matches(self, rule_m: Int[np.ndarray, " m"], toks_m3: Int[np.ndarray, "m 3"]) -> np.ndarray:
        """Whether rule `rule_m[i]` matches row i of `toks_m3`, for every i (as `Rule.matches` row by row)."""
        keys = self.keys[rule_m]
        hit = (keys == _NO_KEY).all(axis=1) | (keys == toks_m3[:, 1:2]).any(axis=1)
        offset = self.offset[rule_m]
        neighbour = toks_m3[np.arange(len(rule_m)), 1 + offset]
        return hit & ((offset == 0) | (neighbour == self.context[rule_m]))


def occurrence_counts(
    table: RuleTable, rule_m: Int[np.ndarray, " m"], toks_m3: Int[np.ndarray, "m 3"]
) -> tuple[np.ndarray, np.ndarray]:
    """Per rule of `table`: (occurrences, those its rule matches), from occurrences given as the index of their
    cluster's rule and the tokens around them."""
    n = len(table.offset)
    hit = table.matches(rule_m, toks_m3)
    return np.bincount(rule_m, minlength=n), np.bincount(rule_m[hit], minlength=n)
