"""Feature clusters: planted features, scipy's linkage, brute-force central examples, edge cases; the per-neuron
cut on dendrograms whose right answer is known and against its rule applied by brute force."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import adjusted_rand_score, silhouette_score

from ne.compute.cluster import cluster_examples, cluster_neuron, cut, cut_into, relabel_by_size, silhouette_by_clusters
from ne.compute.embed import cosine_distances
from ne.config import ClusterConfig
from tests.planted import planted_features

THRESHOLD = ClusterConfig().threshold


def _distances(h, w=None):
    w_t = None if w is None else torch.from_numpy(w)[None]
    return cosine_distances(torch.from_numpy(h)[None], w_t, device="cpu")[0].numpy()


@pytest.mark.parametrize("seed", range(5))
def test_planted_features_recovered_by_neuron_embeddings_not_raw_h(seed):
    h, w, truth = planted_features(seed)
    ne = cluster_examples(_distances(h, w), THRESHOLD)
    raw = cluster_examples(_distances(h), THRESHOLD)
    ari_ne = adjusted_rand_score(truth, ne.labels)
    ari_raw = adjusted_rand_score(truth, raw.labels)
    assert ari_ne >= 0.9, ari_ne
    assert ari_raw <= ari_ne - 0.3, (ari_ne, ari_raw)


def test_raw_h_fails_at_every_threshold_where_neuron_embeddings_succeed():
    h, w, truth = planted_features(0)
    best_raw = max(
        adjusted_rand_score(truth, cluster_examples(_distances(h), t).labels) for t in np.linspace(0.05, 1.0, 20)
    )
    assert best_raw < 0.6, best_raw


@pytest.mark.parametrize("method", ["average", "single", "complete"])
def test_linkage_and_cut_equal_scipy_on_the_embeddings(method):
    h, w, _ = planted_features(1, spread=0.4)
    e = h.astype(np.float64) * w
    z_ref = linkage(pdist(e, "cosine"), method=method)
    got = cluster_examples(_distances(h, w), 0.3, method=method)
    np.testing.assert_allclose(got.linkage, z_ref, atol=1e-5)
    ref_labels = fcluster(z_ref, t=0.3, criterion="distance")
    assert adjusted_rand_score(ref_labels, got.labels) == 1.0


@pytest.mark.parametrize("method", ["average", "single", "complete"])
def test_cut_equals_fcluster_at_every_merge_height(method):
    rng = np.random.default_rng(7)
    for trial in range(20):
        x = rng.normal(size=(int(rng.integers(2, 60)), 5))
        x[: len(x) // 3] = x[0]  # exact duplicates: zero-height merges and ties
        z = linkage(pdist(x, "cosine"), method=method)
        for t in np.concatenate([z[:, 2], z[:, 2] + 1e-9, [0.0, 0.05, 2.0]]):
            ref = relabel_by_size(fcluster(z, t=t, criterion="distance"))
            assert np.array_equal(relabel_by_size(cut(z, t)), ref), (trial, t)


def test_central_example_equals_brute_force():
    h, w, _ = planted_features(2, spread=0.5)
    dist = _distances(h, w)
    got = cluster_examples(dist, 0.4)
    assert got.n_clusters > 2
    e = h.astype(np.float64) * w
    for c in range(got.n_clusters):
        members = [i for i in range(len(h)) if got.labels[i] == c]
        best, best_sim = None, -np.inf
        for i in members:
            others = [j for j in members if j != i]
            sims = [e[i] @ e[j] / np.linalg.norm(e[i]) / np.linalg.norm(e[j]) for j in others]
            mean_sim = np.mean(sims) if sims else 1.0
            if mean_sim > best_sim + 1e-9:
                best, best_sim = i, mean_sim
        assert got.central[c] == best
        assert got.labels[got.central[c]] == c


def test_clusters_numbered_by_size_with_deterministic_ties():
    assert relabel_by_size(np.array([7, 3, 3, 9, 9, 5])).tolist() == [2, 0, 0, 1, 1, 3]
    h, w, _ = planted_features(3)
    labels = cluster_examples(_distances(h, w), THRESHOLD).labels
    sizes = np.bincount(labels)
    assert np.all(np.diff(sizes) <= 0)
    assert sizes.tolist() == [40, 30, 20, 10]


def test_min_cluster_size_marks_small_clusters_as_outliers():
    h, w, truth = planted_features(4, sizes=(40, 30, 3, 1))
    got = cluster_examples(_distances(h, w), THRESHOLD, min_cluster_size=5)
    assert np.bincount(got.labels).tolist() == [40, 30, 3, 1]
    assert got.outlier.tolist() == (got.labels >= 2).tolist()
    assert len(got.central) == 4  # outlier clusters are kept, with central examples


def test_one_and_two_examples():
    one = cluster_examples(np.zeros((1, 1)), 0.5)
    assert one.labels.tolist() == [0] and one.central.tolist() == [0] and one.linkage.shape == (0, 4)
    near = cluster_examples(np.array([[0.0, 0.1], [0.1, 0.0]]), 0.5)
    assert near.labels.tolist() == [0, 0] and near.central.tolist() == [0]
    np.testing.assert_allclose(near.linkage, [[0, 1, 0.1, 2]])
    far = cluster_examples(np.array([[0.0, 0.9], [0.9, 0.0]]), 0.5, min_cluster_size=2)
    assert far.labels.tolist() == [0, 1] and far.central.tolist() == [0, 1]
    assert far.outlier.tolist() == [True, True]


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="'ward'"):
        cluster_examples(squareform(pdist(np.eye(3))), 0.5, method="ward")


# --- the per-neuron cut -------------------------------------------------------------------------------------


def _blocks(sizes, within, between, seed=0, jitter=0.0):
    """A distance matrix of groups of `sizes`: `within` inside a group, `between` across, each distance
    plus uniform noise in [0, jitter); the right clusters are the groups."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    d = np.where(truth[:, None] == truth[None, :], within, between) + rng.uniform(0, jitter, (len(truth),) * 2)
    d = np.triu(d, 1)
    return d + d.T, truth


def _per_neuron(d, **overrides):
    cfg = replace(ClusterConfig(), **overrides)
    return cluster_neuron(d, cfg), cfg


@pytest.mark.parametrize("k_max", [2, 5, 12])
def test_silhouette_by_clusters_equals_sklearn_at_every_count(k_max):
    rng = np.random.default_rng(3)
    for trial in range(25):
        n = int(rng.integers(3, 40))
        x = rng.normal(size=(n, 4))
        x[: n // 4] = x[0]  # duplicates: zero-height merges and ties
        d = squareform(pdist(x, "cosine"))
        z = linkage(squareform(d, checks=False), "average")
        got = silhouette_by_clusters(d, z, k_max)
        assert got.shape == (k_max + 1,)
        for k in range(k_max + 1):
            if 2 <= k <= n - 1:
                labels = cut_into(z, k)
                assert len(np.unique(labels)) == k
                ref = silhouette_score(d, labels, metric="precomputed")
                assert got[k] == pytest.approx(ref, abs=1e-12), (trial, k)
            else:
                assert np.isnan(got[k])


def test_separated_groups_are_found_at_any_spread_where_the_fixed_cut_fails():
    """Three groups far apart: tight ones (the fixed cut finds them too) and loose ones, whose inner distances
    exceed the fixed cut, which then shatters them while the per-neuron cut still finds the three."""
    for within, jitter in ((0.02, 0.05), (0.6, 0.2)):
        d, truth = _blocks((30, 20, 10), within, 1.4, jitter=jitter)
        got, cfg = _per_neuron(d)
        assert adjusted_rand_score(truth, got.labels) == 1.0
        heights = got.linkage[:, 2]
        assert heights[-3] < got.threshold < heights[-2]  # in the gap: the 3 clusters' merges are undone
        fixed = cluster_examples(d, cfg.threshold)
        assert (fixed.n_clusters == 3) == (within < cfg.threshold)


def test_one_tight_group_stays_whole_even_with_an_outlier():
    d, _ = _blocks((40,), 0.05, 0.0, jitter=0.1)
    got, _ = _per_neuron(d)
    assert got.n_clusters == 1 and got.threshold == got.linkage[-1, 2]
    outlier = np.pad(d, ((0, 1), (0, 1)), constant_values=0.35)  # 0.35 from every member: not a second behaviour
    outlier[-1, -1] = 0.0
    z = linkage(squareform(outlier, checks=False), "average")
    assert silhouette_by_clusters(outlier, z, 2)[2] > ClusterConfig().min_silhouette  # the silhouette alone splits
    assert _per_neuron(outlier)[0].n_clusters == 1
    assert _per_neuron(outlier, min_separation=0.3)[0].n_clusters == 2


def test_nested_groups_split_down_to_min_separation():
    """Two groups of two subgroups each: subgroups 0.3 apart, groups 1.0 apart. The subgroups are behaviours
    only if clusters 0.3 apart may be separated; both cuts score within the tolerance, and the finer wins."""
    sub, _ = _blocks((10, 10, 10, 10), 0.05, 0.3, jitter=0.02)
    group = np.repeat([0, 1], 20)
    d = np.where(group[:, None] == group[None, :], sub, 1.0)
    np.fill_diagonal(d, 0.0)
    assert _per_neuron(d)[0].n_clusters == 2
    assert _per_neuron(d, min_separation=0.2)[0].n_clusters == 4


def test_no_structure_is_one_cluster():
    rng = np.random.default_rng(0)
    d = squareform(pdist(rng.normal(size=(60, 50)), "cosine"))  # every pair about 1 apart, no groups
    got, cfg = _per_neuron(d)
    assert got.n_clusters == 1
    assert cluster_examples(d, cfg.threshold).n_clusters > 30  # the fixed cut leaves each example alone


def _rule_by_brute_force(d, cfg):
    """The per-neuron rule from its definition: every threshold between two distinct merge heights, clustered
    by scipy's fcluster and scored by scikit-learn's silhouette."""
    z = linkage(squareform(d, checks=False), cfg.method)
    heights = np.unique(z[:, 2])
    options = []
    for lo, hi in zip(heights[:-1], heights[1:]):
        labels = fcluster(z, (lo + hi) / 2, "distance")
        k = labels.max()
        if 2 <= k <= min(cfg.max_clusters, len(d) - 1) and hi > cfg.min_separation:
            options.append((k, silhouette_score(d, labels, metric="precomputed"), labels))
    if not options or max(s for _, s, _ in options) < cfg.min_silhouette:
        return np.zeros(len(d), int)
    best = max(s for _, s, _ in options)
    return max((o for o in options if o[1] >= best - cfg.silhouette_tolerance), key=lambda o: o[0])[2]


@pytest.mark.parametrize("seed", range(6))
def test_per_neuron_cut_equals_its_rule_applied_by_brute_force(seed):
    sizes = [(100,), (50, 50), (40, 30, 20, 10), (60, 25, 10, 3, 1, 1), (13,) * 8, (30, 30)][seed]
    for spread in (0.1, 0.25, 0.4):
        h, w, _ = planted_features(seed, sizes=sizes, spread=spread)
        d = squareform(pdist(h.astype(np.float64) * w, "cosine"))
        for overrides in ({}, {"min_separation": 0.3}, {"silhouette_tolerance": 0.0, "max_clusters": 6}):
            got, cfg = _per_neuron(d, **overrides)
            assert adjusted_rand_score(_rule_by_brute_force(d, cfg), got.labels) == 1.0, (spread, overrides)
            assert np.array_equal(relabel_by_size(cut(got.linkage, got.threshold)), got.labels)


def test_tied_merges_are_never_split_apart():
    """Two pairs, each 0.6 apart, 1.0 from each other: the pairs merge at the same height, so no threshold
    gives 3 clusters, though its silhouette (0.2) is within a loose tolerance of the 2 clusters' (0.4)."""
    d, truth = _blocks((2, 2), 0.6, 1.0)
    got, _ = _per_neuron(d, silhouette_tolerance=0.25)
    assert got.labels.tolist() == truth.tolist()
    assert got.linkage[1, 2] < got.threshold < got.linkage[2, 2]


def test_per_neuron_cut_of_tiny_neurons():
    assert np.isnan(_per_neuron(np.zeros((1, 1)))[0].threshold)
    two = np.array([[0.0, 0.9], [0.9, 0.0]])
    got, _ = _per_neuron(two)  # no silhouette exists below 3 examples: one cluster
    assert got.labels.tolist() == [0, 0] and got.threshold == 0.9
    three, _ = _blocks((2, 1), 0.01, 1.0)
    assert _per_neuron(three)[0].labels.tolist() == [0, 0, 1]


def test_per_neuron_cut_beats_the_fixed_cut_under_noise_and_matches_it_when_easy():
    """Planted features (the benchmark's scenario of today's test): at spread 0.1 both cuts find the features;
    at 0.3 the fixed cut shatters them and the per-neuron cut does much better."""
    cfg = ClusterConfig()
    ari = {}
    for spread in (0.1, 0.3):
        for rule in ("fixed", "silhouette"):
            scores = []
            for seed in range(8):
                h, w, truth = planted_features(seed, spread=spread)
                labels = cluster_neuron(_distances(h, w), replace(cfg, cut=rule)).labels
                scores.append(adjusted_rand_score(truth, labels))
            ari[spread, rule] = np.mean(scores)
    assert ari[0.1, "silhouette"] >= ari[0.1, "fixed"] - 0.02 and ari[0.1, "silhouette"] > 0.9
    assert ari[0.3, "silhouette"] > ari[0.3, "fixed"] + 0.15, ari
