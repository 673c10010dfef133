"""Offline labels' maths (`ne.compute.label`): the rule chosen per cluster against naive counting, how tokens are
spelled, and the corpus counts a rule's rate comes from."""

from __future__ import annotations

from collections import Counter
from itertools import product

import numpy as np
import pyarrow as pa
import pytest

from ne.compute.label import (
    MIN_GAIN,
    CorpusCounts,
    Rule,
    best_rule,
    count_tokens,
    f1,
    label_clusters,
    shown,
    uses_word_pieces,
)
from ne.models.tokenizers import gpt2_tokenizer


def _naive_f1(rule: Rule, toks_c, toks_o) -> float:
    def hit(t):
        return (not rule.keys or t[1] in rule.keys) and (not rule.offset or t[1 + rule.offset] == rule.context)

    tp = sum(hit(t) for t in toks_c)
    fp = sum(hit(t) for t in toks_o)
    return 2 * tp / (2 * tp + fp + len(toks_c) - tp)


def test_planted_clusters_get_the_rule_that_sets_them_apart():
    rng = np.random.default_rng(0)

    def examples(n, key, before, after=None):
        keys = np.asarray(key if isinstance(key, list) else [key] * n)
        return np.stack([np.full(n, before), keys, rng.integers(50, 60, n) if after is None else np.full(n, after)], 1)

    a = examples(20, 10, 5)  # "for" after "the"
    b = examples(15, 10, 6)  # "for" after "a"
    c = examples(10, [11] * 6 + [12] * 4, 7)  # "while" or "until"
    d = examples(8, 13, 8, after=9)
    d[:, 0] = rng.integers(20, 40, 8)  # "(" before ")", whatever comes before
    groups = [a, b, c, d]
    rules = [best_rule(g, np.concatenate([h for j, h in enumerate(groups) if j != i])) for i, g in enumerate(groups)]
    assert rules == [Rule((10,), -1, 5), Rule((10,), -1, 6), Rule((11, 12)), Rule((13,))]
    show = {5: "the", 6: "a", 10: "for", 11: "while", 12: "until", 13: "("}.__getitem__
    assert [r.text(show) for r in rules] == ['"for" after "the"', '"for" after "a"', '"while" / "until"', '"("']
    assert Rule((), 1, 12).text(show) == 'before "until"'
    # A single cluster has nothing to contrast with: its commonest key tokens.
    assert best_rule(c, np.zeros((0, 3), np.int64)) == Rule((11, 12))
    # A mixed cluster (no key token on a tenth of it): its largest common trait, with the share it covers.
    mixed = np.stack(
        [
            np.r_[np.full(12, 1), rng.integers(20, 40, 18)],
            np.r_[[5, 5], np.arange(100, 128)],
            rng.integers(200, 260, 30),
        ],
        1,
    )
    assert best_rule(mixed, np.zeros((0, 3), np.int64)) == Rule((), -1, 1)
    counts = CorpusCounts(*(np.zeros(300, np.int64),) * 3, np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
    table = label_clusters(
        0, np.zeros(30, int), np.zeros(30, int), np.zeros(30, bool), mixed, counts, lambda ids: [f" t{i}" for i in ids]
    )
    assert table.column("label").to_pylist() == ['after "t1" (40%)']


def test_tokens_are_spelled_for_labels():
    assert shown([" t", "t", "\n", " ", "(", " " + "x" * 30], word_pieces=True) == [
        "t",
        "##t",
        "⏎",
        "␣",
        "(",
        "x" * 15 + "…",
    ]
    assert shown(["The", " for"], word_pieces=False) == ["The", "for"]  # BPE: a line's first word has no space
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(WordPiece({"[UNK]": 0, "t": 1, "##t": 2}, unk_token="[UNK]"))
    bert_like = PreTrainedTokenizerFast(tokenizer_object=wordpiece)
    assert uses_word_pieces(bert_like) and not uses_word_pieces(gpt2_tokenizer())


@pytest.mark.parametrize("seed", range(20))
def test_no_simple_rule_beats_the_chosen_one(seed):
    """Against every one-key rule, and every rule of the chosen keys (or none) with one neighbour held by at least a
    tenth of the cluster, by naive counting: none has a better F1 (a neighbour must win by MIN_GAIN to be added)."""
    rng = np.random.default_rng(seed)
    n_c, n_o = rng.integers(3, 30), rng.integers(0, 40)
    toks_c, toks_o = rng.integers(0, 6, (n_c, 3)), rng.integers(0, 6, (n_o, 3))
    chosen = best_rule(toks_c, toks_o)
    best = _naive_f1(chosen, toks_c.tolist(), toks_o.tolist())
    assert best == pytest.approx(f1(chosen.matches(toks_c), chosen.matches(toks_o)))
    frequent = [t for t, n in Counter(toks_c[:, 1].tolist()).items() if n >= np.ceil(0.1 * n_c)]
    for k in frequent:
        assert _naive_f1(Rule((k,)), toks_c.tolist(), toks_o.tolist()) <= best + 1e-12
    if chosen.offset == 0:
        for offset, keys in product((-1, 1), (chosen.keys, ())):
            side = toks_c[:, 1 + offset].tolist()
            for context in {t for t in side if side.count(t) >= np.ceil(0.1 * n_c)}:
                other = _naive_f1(Rule(keys, offset, context), toks_c.tolist(), toks_o.tolist())
                assert other < best + MIN_GAIN + 1e-9


def test_count_tokens_counts_within_contexts_only():
    """Pairs never span two contexts; a part given as a slice of a larger list array counts only its own rows."""
    contexts = [[1, 2, 1, 2], [2, 3], [3], [], [1, 1]]
    whole = pa.array([[9, 9]] + contexts, pa.list_(pa.int32()))
    counts = count_tokens([whole.slice(1, 3), whole.slice(4)])
    uni = Counter(t for c in contexts for t in c)
    pairs = Counter(p for c in contexts for p in zip(c, c[1:]))
    assert counts.positions == sum(uni.values()) and counts.unigrams.tolist() == [uni[i] for i in range(4)]
    assert {(int(k) >> 32, int(k) & 0xFFFFFFFF): int(n) for k, n in zip(counts.pairs, counts.pair_counts)} == pairs
    assert counts.leading.tolist() == [sum(n for (a, _), n in pairs.items() if a == i) for i in range(4)]
    assert counts.trailing.tolist() == [sum(n for (_, b), n in pairs.items() if b == i) for i in range(4)]
