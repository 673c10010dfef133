"""The pure co-activation maths against naive loops: pairs sharing a token, the cap per token, scores, merge
ranges and grouped quantiles."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ne.compute import coactivation as co
from ne.errors import ConfigError


def random_occurrences(rng, n_rows=400, n_tokens=60, n_features=25):
    token = rng.integers(0, n_tokens, n_rows)
    feature = rng.integers(0, n_features, n_rows)
    # one occurrence of a feature per token, as a unit joins one cluster at a token
    _, first = np.unique(token * n_features + feature, return_index=True)
    return feature[first], token[first], n_features


def test_token_pairs_equal_a_loop_over_tokens():
    feature, token, n = random_occurrences(np.random.default_rng(0))
    want: Counter = Counter()
    for t in np.unique(token):
        here = feature[token == t]
        want.update((int(a) * n + int(b)) for a in here for b in here if a != b)
    keys, counts = co.token_pairs(feature, token, n)
    assert np.all(np.diff(keys) > 0)  # sorted, unique
    assert dict(zip(keys.tolist(), counts.tolist())) == dict(want)
    assert co.token_pairs(feature[:0], token[:0], n)[0].size == 0


def test_strongest_keeps_the_top_of_each_token():
    rng = np.random.default_rng(1)
    token = rng.integers(0, 20, 300)
    strength = rng.random(300)
    kept = co.strongest(token, strength, 3)
    want = sorted(
        i
        for t in np.unique(token)
        for i in np.flatnonzero(token == t)[np.argsort(-strength[token == t], kind="stable")][:3]
    )
    assert kept.tolist() == want
    assert co.strongest(token, strength, None).tolist() == list(range(300))


def test_scores_follow_their_formulas():
    c, na, nb, n = np.array([3, 5]), np.array([10, 6]), np.array([4, 9]), 100
    assert co.scores("count", c, na, nb, n).tolist() == [3, 5]
    np.testing.assert_allclose(co.scores("jaccard", c, na, nb, n), c / (na + nb - c))
    np.testing.assert_allclose(co.scores("cosine", c, na, nb, n), c / np.sqrt(na * nb))
    pmi = np.log(c * n / (na * nb))
    np.testing.assert_allclose(co.scores("pmi", c, na, nb, n), pmi)
    np.testing.assert_allclose(co.scores("npmi", c, na, nb, n), pmi / -np.log(c / n))
    with pytest.raises(ConfigError, match="coactivation.score is 'lift'; choose one of 'count'"):
        co.scores("lift", c, na, nb, n)


def test_merge_ranges_cover_every_feature_within_the_budget(monkeypatch):
    monkeypatch.setattr(co, "PAIR_ROW_BYTES", 2**20 // 100)  # 100 pair rows per MiB
    rows = np.array([30, 50, 40, 250, 10, 0, 60])
    ranges = co.plan_ranges(rows, 1)
    assert ranges == [(0, 2), (2, 3), (3, 4), (4, 7)]  # a feature over the budget is a range alone
    assert all(rows[lo:hi].sum() <= 100 or hi - lo == 1 for lo, hi in ranges)


def test_grouped_quantiles_equal_numpy():
    rng = np.random.default_rng(2)
    sizes = np.array([0, 1, 2, 7, 30])
    groups = [np.sort(rng.normal(size=s)) for s in sizes]
    x = np.concatenate(groups)
    start = np.cumsum(sizes) - sizes
    for q in (0.1, 0.5, 0.9):
        got = co.quantile(x, start, sizes, q)
        assert np.isnan(got[0])
        np.testing.assert_allclose(got[1:], [np.quantile(g, q) for g in groups[1:]])


def test_feature_ids_are_dense_in_layer_neuron_cluster_order():
    # layer 0: units 0..2 with 2, 0, 1 clusters; layer 3: unit 0..1 with 1, 2
    starts = {0: np.array([0, 2, 2, 3]), 3: np.array([3, 4, 6])}
    ids = co.FeatureIds(
        np.array([0, 0, 0, 3, 3, 3]), np.array([0, 0, 2, 0, 1, 1]), np.array([0, 1, 0, 0, 0, 1]), starts
    )
    assert ids.n == 6
    assert ids.ids(3, np.array([1, 0, 1]), np.array([1, 0, -1])).tolist() == [5, 3, -1]
    assert [ids.id_of(0, 0, 1), ids.id_of(0, 1, 0), ids.id_of(3, 1, 1), ids.id_of(5, 0, 0)] == [1, None, 5, None]
