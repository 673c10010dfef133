"""Scores on held-out text (`ne.compute.scores`) against naive loops: label detection from held-out examples and from
hand-written occurrence tables, and the example-embedding score."""

from __future__ import annotations

import numpy as np
import pytest

from ne.compute.label import NONE, Rule
from ne.compute.scores import (
    Counts,
    around,
    below_threshold,
    embedding_deltas,
    embedding_score,
    label_detection,
    occurrence_detection,
    unit_detection,
)


def _hit(rule: Rule, t) -> bool:
    return (not rule.keys or t[1] in rule.keys) and (not rule.offset or t[1 + rule.offset] == rule.context)


def test_label_and_unit_detection_count_like_a_loop():
    rng = np.random.default_rng(0)
    firing = {c: rng.integers(0, 5, (rng.integers(0, 12), 3)) for c in range(3)}
    quiet = rng.integers(0, 5, (30, 3))
    rules = {0: Rule((1, 2)), 1: Rule((3,), -1, 4), 2: Rule((), 1, 0)}
    got = label_detection(rules, firing, quiet)
    for c, rule in rules.items():
        tp = sum(_hit(rule, t) for t in firing[c])
        fp = sum(_hit(rule, t) for t in quiet) + sum(_hit(rule, t) for d in firing if d != c for t in firing[d])
        assert got[c] == Counts(tp, fp, len(firing[c]) - tp)
    every = np.concatenate(list(firing.values()))
    unit = unit_detection(list(rules.values()), every, quiet)
    tp = sum(any(_hit(r, t) for r in rules.values()) for t in every)
    assert unit == Counts(tp, sum(any(_hit(r, t) for r in rules.values()) for t in quiet), len(every) - tp)
    total = sum(got.values(), Counts())
    assert total.precision == pytest.approx(total.tp / (total.tp + total.fp))
    assert total.f1 == pytest.approx(2 * total.precision * total.recall / (total.precision + total.recall))


def test_quiet_tokens_are_those_below_the_threshold_in_the_stored_windows():
    tokens = [np.array([50, 7, 8, 9, 10, 11]), np.array([50, 3, 4])]
    windows = [np.array([0.1, 0.9, 0.2]), np.array([0.95, 0.3])]  # from position 2, and from position 1
    quiet = below_threshold(tokens, [2, 1], windows, threshold=0.5, skip=[50])
    assert quiet.tolist() == [[7, 8, 9], [9, 10, 11], [3, 4, NONE]]
    negative = below_threshold(tokens, [2, 1], [-w for w in windows], threshold=0.5, sign=-1.0)
    assert negative.tolist() == quiet.tolist()
    assert around(tokens[0], np.array([0, 5])).tolist() == [[NONE, 50, 7], [10, 11, NONE]]


def test_occurrence_detection_against_a_hand_written_table():
    contexts = {10: np.array([0, 5, 6, 5, 7, 5, 6]), 11: np.array([0, 6, 5, 6, 6]), 12: np.array([0, 9, 9])}
    occ = [(10, 1, 0), (10, 3, 1), (10, 5, 0), (11, 2, 0), (12, 1, 1), (13, 1, 0)]  # (ctx, pos, cluster) of unit 4
    rules = {0: Rule((5,), 1, 6), 1: Rule((5, 9))}
    ctx, pos, cluster = (np.array(column) for column in zip(*occ))
    got = occurrence_detection(ctx, pos, cluster, rules, contexts, skip=[0])
    for c, rule in rules.items():  # naive: every non-BOS token of the held-out contexts (ctx 13 is not one)
        tp = fp = 0
        for ctx, toks in contexts.items():
            for p in range(1, len(toks)):
                t = [toks[p - 1], toks[p], toks[p + 1] if p + 1 < len(toks) else NONE]
                fires = (ctx, p, c) in occ
                tp += fires and _hit(rule, t)
                fp += (not fires) and _hit(rule, t)
        n = sum(1 for x, _, k in occ if k == c and x in contexts)
        assert got[c] == Counts(tp, fp, n - tp)
    assert got[0] == Counts(3, 0, 0) and got[1] == Counts(2, 4, 0)


def test_embedding_score_is_delphis_measure_by_a_loop():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(20, 6)), rng.normal(size=(8, 6))
    train_c, test_c = rng.integers(0, 3, 20), rng.integers(0, 3, 8)
    got = embedding_deltas(test, test_c, train, train_c)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for q, c, d in zip(test, test_c, got):
        own = [cos(q, t) for t, k in zip(train, train_c) if k == c]
        other = [cos(q, t) for t, k in zip(train, train_c) if k != c]
        assert d == pytest.approx(np.mean(own) - np.mean(other))
    assert np.isnan(embedding_deltas(test[:1], np.array([0]), train[:3], np.zeros(3, int))).all()  # nothing to contrast
    score = embedding_score([got, np.array([np.nan])])
    assert score.n == 8 and score.closer == pytest.approx(np.mean(got > 0)) and score.delta == pytest.approx(got.mean())


def test_cluster_sums_margins_are_embedding_deltas():
    """Three units (one with a single cluster, so nothing to contrast): every margin from the sums equals
    `embedding_deltas` over the unit's examples, and tokens of unknown clusters or without text get NaN."""
    from ne.compute.embed import unit_rows
    from ne.compute.scores import CLUSTER_KEY, ClusterSums

    rng = np.random.default_rng(2)
    unit_n, cluster_n = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    cluster_n[unit_n == 2] = 0
    train = unit_rows(rng.normal(size=(60, 6)))
    sums = ClusterSums(np.unique(unit_n * CLUSTER_KEY + cluster_n), 6)
    for lo in (0, 25):  # added in two goes
        sums.add(unit_n[lo : lo + 35] * CLUSTER_KEY + cluster_n[lo : lo + 35], train[lo : lo + 35])
    sums.add(unit_n[60:], train[60:])
    q = unit_rows(rng.normal(size=(10, 6)))
    q[9] = 0
    unit_m, cluster_m = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    cluster_m[:3] = 7  # no such cluster
    rows_m = rng.integers(0, 10, 40)
    idx, margin = sums.margins(unit_m * CLUSTER_KEY + cluster_m, rows_m, q)
    # the first 35 rows were added, then rows 25..59: 25..34 twice
    twice = np.concatenate([np.arange(60), np.arange(25, 35)])
    for i in range(40):
        u, c, r = unit_m[i], cluster_m[i], rows_m[i]
        mine = unit_n[twice] == u
        want = embedding_deltas(q[r : r + 1], np.array([c]), train[twice][mine], cluster_n[twice][mine])[0]
        if c == 7 or r == 9:
            want = np.nan
        if np.isnan(want):
            assert np.isnan(margin[i])
        else:
            assert margin[i] == pytest.approx(want, abs=1e-9)
            assert sums.keys[idx[i]] == u * CLUSTER_KEY + c
    assert np.isfinite(margin).sum() > 15


def test_window_embeddings_are_window_means_by_a_loop():
    rng = np.random.default_rng(0)
    sums, counts = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
    counts[[2, 3, 4]] = 0
    sums[[2, 3, 4]] = 0
    from ne.compute.scores import window_embeddings

    got = window_embeddings(sums, counts, before=2, after=1)
    for p in range(9):
        window = range(max(0, p - 2), min(9, p + 2))
        n = sum(counts[t] for t in window)
        if n == 0:
            assert not got[p].any()
            continue
        mean = sum(sums[t] for t in window) / n
        np.testing.assert_allclose(got[p], mean / np.linalg.norm(mean), rtol=1e-5)
    assert not window_embeddings(sums, counts, 0, 0)[3].any()  # a token with no encoder token, alone
