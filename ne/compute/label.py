"""Offline labels: a short phrase for every feature cluster, from what sets its examples apart.

A label is a rule over an example's key token and one of its neighbours, written in words:
`"for"`, `"for" / "while"`, `"in" after "is"`, `"(" before ")"`, `after "the"` (any key token). It is chosen, per
cluster, to tell the cluster's examples from the neuron's other examples, the contrast a reader of the viewer makes:
- key tokens K: the one whose rule has the best F1 (its coverage of the cluster against the share of its matches
  among the neuron's examples that are the cluster's), then others, most frequent first, each kept when it raises the
  F1 (at most `MAX_KEYS`, each on at least `MIN_SHARE` of the cluster);
- then at most one neighbour condition (the token just before or just after the key token, on at least `MIN_SHARE`
  of the cluster), with K or alone, kept only when it raises the F1 by `MIN_GAIN` or more: labels stay short.
A neuron with a single cluster has nothing to contrast with, so its label is its commonest key tokens. A label
whose rule holds for less than half of its cluster ends with that share, e.g. `before "." (10%)`: the cluster is
mixed, and the label names only its largest common trait.

Beside the label each row keeps the rule itself and how much it matches: the cluster's examples (`coverage`), the
neuron's other examples (`others`) and the corpus's token positions (`corpus`). coverage / others is the rule's lift
over the neuron's other clusters, coverage / corpus its lift over the corpus (how rare what it names is).
`ne.rundir.labels` reads a run's examples, clusters and contexts for these functions; `benchmarks/describe.py`
scores the labels on held-out examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from jaxtyping import Int

from ne import schema

MAX_KEYS = 3
MIN_SHARE = 0.1
"""A key token or neighbour enters a rule only when it holds for at least this share of the cluster."""
MIN_GAIN = 0.05
"""A neighbour condition is added only when it raises the rule's F1 by this much."""
WEAK = 0.5
"""A label whose rule holds for less than this share of its cluster says so: `before "." (10%)`."""
MAX_CHARS = 16
"""A token longer than this is cut in the label (with …)."""
NONE = -1
"""No token: before the first position of a context or after its last one."""
OFFSETS = (-1, 0, 1)
"""The tokens a rule reads, relative to the key token: before, the key token, after (the columns of
`ne.rundir.contexts.tokens_at`)."""


@dataclass(frozen=True)
class Rule:
    """The key token is one of `keys` (any token when empty), and the token at `offset` is `context` (no
    condition when offset is 0)."""

    keys: tuple[int, ...]
    offset: int = 0
    context: int = NONE

    def matches(self, toks_n3: Int[np.ndarray, "n 3"]) -> np.ndarray:
        """Which examples (rows of `ne.rundir.contexts.tokens_at(..., OFFSETS)`: before, key, after) the rule
        matches."""
        hit = np.isin(toks_n3[:, 1], self.keys) if self.keys else np.ones(len(toks_n3), bool)
        if self.offset:
            hit &= toks_n3[:, 1 + self.offset] == self.context
        return hit

    def text(self, show: Callable[[int], str]) -> str:
        keys = " / ".join(f'"{show(k)}"' for k in self.keys)
        if not self.offset:
            return keys
        where = f'{"after" if self.offset < 0 else "before"} "{show(self.context)}"'
        return f"{keys} {where}" if keys else where


def f1(hit_c: np.ndarray, hit_o: np.ndarray) -> float:
    """F1 of a rule that should match the cluster's examples (`hit_c`) and none of the others (`hit_o`)."""
    tp = int(hit_c.sum())
    return 2 * tp / (2 * tp + int(hit_o.sum()) + (len(hit_c) - tp)) if len(hit_c) else 0.0


def best_rule(toks_c: np.ndarray, toks_o: np.ndarray, special: Sequence[int] = ()) -> Rule:
    """The rule that best tells one cluster's examples (`toks_c`, [n, 3] as `OFFSETS` reads them) from the
    neuron's other examples (`toks_o`)."""
    search = _RuleSearch(toks_c, toks_o)
    return search.with_context(search.key_rule(), special)


def _by_count(column: np.ndarray, skip: Sequence[int] = ()) -> list[tuple[int, int]]:
    """(token, count) of a column, most frequent first, ties by id: deterministic."""
    ids, counts = np.unique(column[~np.isin(column, [NONE, *skip])], return_counts=True)
    order = np.lexsort((ids, -counts))
    return [(int(t), int(n)) for t, n in zip(ids[order], counts[order])]


class _RuleSearch:
    """Rules for one cluster, scored against the neuron's other examples."""

    def __init__(self, toks_c: np.ndarray, toks_o: np.ndarray):
        self.toks_c, self.toks_o = toks_c, toks_o
        self.least = max(1, int(np.ceil(MIN_SHARE * len(toks_c))))

    def score(self, rule: Rule) -> float:
        return f1(rule.matches(self.toks_c), rule.matches(self.toks_o))

    def frequent(self, column: np.ndarray, skip: Sequence[int] = ()) -> list[int]:
        return [t for t, n in _by_count(column, skip) if n >= self.least]

    def key_rule(self) -> Rule:
        """The best single key token, widened by each further frequent key that raises the score."""
        keys = self.frequent(self.toks_c[:, 1]) or [_by_count(self.toks_c[:, 1])[0][0]]  # else the commonest
        rule = max((Rule((k,)) for k in keys), key=self.score)  # the first best: the most frequent among equals
        for k in keys:
            if k in rule.keys:
                continue
            if len(rule.keys) == MAX_KEYS:
                break
            wider = Rule(tuple(sorted((*rule.keys, k))))
            if self.score(wider) > self.score(rule):
                rule = wider
        return rule

    def with_context(self, rule: Rule, special: Sequence[int]) -> Rule:
        """`rule`, or a rule on a neighbouring token (with or without its keys) that beats it by `MIN_GAIN`."""
        base = self.score(rule)
        best, gain = rule, MIN_GAIN
        for offset in (-1, 1):
            for context in self.frequent(self.toks_c[:, 1 + offset], special):
                for keys_part in (rule.keys, ()):
                    candidate = Rule(keys_part, offset, context)
                    if self.score(candidate) - base >= gain + 1e-12:
                        best, gain = candidate, self.score(candidate) - base
        return best


PAIR = np.int64(2**32)
"""Adjacent pair (a, b) as one key, a * PAIR + b: token ids are int32."""


@dataclass
class CorpusCounts:
    """How often each token, and each pair of adjacent tokens, occurs in the corpus: a rule's corpus rate."""

    unigrams: np.ndarray
    """[vocab] count of each token id."""
    leading: np.ndarray
    """[vocab] count of each token id with a token after it in its context."""
    trailing: np.ndarray
    """[vocab] count of each token id with a token before it."""
    pairs: np.ndarray
    """Sorted keys `a * PAIR + b` of the adjacent pairs (a, then b) that occur."""
    pair_counts: np.ndarray
    positions: int

    def _count(self, counts: np.ndarray, ids) -> int:
        ids = np.asarray(ids, np.int64)
        return int(counts[ids[(ids >= 0) & (ids < len(counts))]].sum())

    def pair(self, a: np.ndarray, b: np.ndarray) -> int:
        """How often a is followed by b, summed over the pairs given."""
        keys = np.asarray(a, np.int64) * PAIR + np.asarray(b, np.int64)
        if not len(self.pairs):
            return 0
        i = np.searchsorted(self.pairs, keys).clip(0, len(self.pairs) - 1)
        return int(np.where(self.pairs[i] == keys, self.pair_counts[i], 0).sum())

    def rate(self, rule: Rule) -> float:
        """Share of the corpus's token positions the rule matches (at its key token)."""
        keys = np.asarray(rule.keys, np.int64)
        if not rule.offset:
            count = self._count(self.unigrams, keys) if len(keys) else self.positions
        elif not len(keys):  # any key token next to the context token
            count = self._count(self.leading if rule.offset < 0 else self.trailing, [rule.context])
        else:
            ctx = np.full(len(keys), rule.context)
            count = self.pair(ctx, keys) if rule.offset < 0 else self.pair(keys, ctx)
        return count / max(self.positions, 1)


def count_tokens(parts: Iterable[pa.ListArray]) -> CorpusCounts:
    """Token and adjacent-pair counts over the corpus's contexts, given as one list array of token ids per part."""
    counts = {name: np.zeros(0, np.int64) for name in ("unigrams", "leading", "trailing")}
    pair_keys, pair_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for tokens in parts:
        flat = tokens.flatten().to_numpy().astype(np.int64)
        if not len(flat):
            continue
        ends = tokens.offsets.to_numpy()[1:] - tokens.offsets[0].as_py() - 1
        follows = np.ones(len(flat), bool)  # flat[i + 1] follows flat[i] in the same context
        follows[ends[ends >= 0]] = False
        first = np.flatnonzero(follows)
        for key, ids in (("unigrams", flat), ("leading", flat[first]), ("trailing", flat[first + 1])):
            grown = np.bincount(ids, minlength=max(len(counts[key]), int(flat.max()) + 1))
            grown[: len(counts[key])] += counts[key]
            counts[key] = grown
        keys, n = np.unique(flat[first] * PAIR + flat[first + 1], return_counts=True)
        pair_keys, inverse = np.unique(np.concatenate([pair_keys, keys]), return_inverse=True)
        pair_counts = np.bincount(inverse, weights=np.concatenate([pair_counts, n]), minlength=len(pair_keys)).astype(
            np.int64
        )
    return CorpusCounts(
        counts["unigrams"], counts["leading"], counts["trailing"], pair_keys, pair_counts, int(counts["unigrams"].sum())
    )


def shown(pieces: Sequence[str], word_pieces: bool = False) -> list[str]:
    """Tokens as a label shows them (pieces as `decode_each` gives them): without surrounding spaces, newlines as
    ⏎, blanks as ␣, long tokens cut. With `word_pieces` (a WordPiece tokenizer, whose word-internal pieces come
    without the leading space of a word's first token) a piece is shown as `##piece`, so the word "t" and the piece
    "##t" differ. Byte-level BPE also starts a line's first word without a space, so it gets no such mark."""
    out = []
    for piece in pieces:
        text = piece.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")
        glued = word_pieces and bool(text) and text[0].isalnum()
        text = text.strip() or "␣"
        text = text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"
        out.append(f"##{text}" if glued else text)
    return out


def label_clusters(
    layer: int,
    neuron_n: np.ndarray,
    cluster_n: np.ndarray,
    outlier_n: np.ndarray,
    toks_n3: np.ndarray,
    corpus: CorpusCounts,
    decode: Callable[[Sequence[int]], list[str]],
    special: Sequence[int] = (),
    word_pieces: bool = False,
) -> pa.Table:
    """The labels table (`schema.LABELS`) of one layer's clusters, from each example's neuron, cluster, outlier
    flag and tokens (`OFFSETS` around the key token); rows in neuron then cluster order."""
    order = np.lexsort((cluster_n, neuron_n))
    neuron_n, cluster_n, outlier_n, toks_n3 = neuron_n[order], cluster_n[order], outlier_n[order], toks_n3[order]
    bounds = np.flatnonzero(np.diff(neuron_n)) + 1
    rows: dict[str, list] = {name: [] for name in schema.LABELS.names}
    rules: list[Rule] = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(neuron_n)]):
        clusters = cluster_n[lo:hi]
        toks = toks_n3[lo:hi]
        for c in np.unique(clusters):
            mine = clusters == c
            rule = best_rule(toks[mine], toks[~mine], special)
            hit_c, hit_o = rule.matches(toks[mine]), rule.matches(toks[~mine])
            rules.append(rule)
            for name, value in (
                ("layer", layer),
                ("neuron", int(neuron_n[lo])),
                ("cluster", int(c)),
                ("size", int(mine.sum())),
                ("outlier", bool(outlier_n[lo:hi][mine][0])),
                ("key_tokens", list(rule.keys)),
                ("context_offset", rule.offset),
                ("context_token", rule.context),
                ("coverage", float(hit_c.mean())),
                ("others", float(hit_o.mean()) if len(hit_o) else float("nan")),
                ("corpus", corpus.rate(rule)),
            ):
                rows[name].append(value)
    ids = sorted({t for r in rules for t in (*r.keys, r.context) if t != NONE})
    names = dict(zip(ids, shown(decode(ids), word_pieces) if ids else []))
    rows["label"] = [
        rule.text(names.__getitem__) + (f" ({cov:.0%})" if cov < WEAK else "")
        for rule, cov in zip(rules, rows["coverage"])
    ]
    return pa.Table.from_pydict(rows, schema=schema.LABELS)


def uses_word_pieces(tokenizer) -> bool:
    """True for a WordPiece tokenizer (BERT's family), whose word-internal pieces carry no leading space. (A BPE
    vocabulary may hold a few tokens that start with "##", such as Markdown's heading, so the vocabulary alone does
    not tell.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return type(backend.model).__name__ == "WordPiece"
    return hasattr(tokenizer, "wordpiece_tokenizer")
