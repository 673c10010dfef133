"""Polysemy metrics, the Figure 4 comparisons and nearest-neighbour agreement against scikit-learn, scipy and
naive loops; degenerate cases are NaN."""

import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import silhouette_score

from ne.compute.cluster import cluster_examples, cluster_neuron, cut_thresholds, linkage_of
from ne.compute.embed import pad_rows
from ne.compute.metrics import analyse_neurons, figure4_metrics, neighbour_agreement, neuron_metrics, silhouette
from ne.config import ClusterConfig
from tests.planted import planted_features


def _random_case(seed, n=60, n_labels=5):
    rng = np.random.default_rng(seed)
    dist = squareform(pdist(rng.normal(size=(n, 8)), "cosine"))
    labels = rng.integers(0, n_labels, size=n)
    labels[0] = 0
    labels[1] = n_labels - 1  # guarantee two distinct labels
    return dist, np.unique(labels, return_inverse=True)[1]


@pytest.mark.parametrize("seed", range(4))
def test_silhouette_equals_sklearn(seed):
    dist, labels = _random_case(seed)
    assert silhouette(dist, labels) == pytest.approx(silhouette_score(dist, labels, metric="precomputed"), abs=1e-12)


def test_silhouette_with_singleton_clusters_equals_sklearn():
    dist, labels = _random_case(9, n=12, n_labels=3)
    labels = labels.copy()
    labels[5] = labels.max() + 1  # a singleton cluster scores 0 in sklearn
    assert silhouette(dist, labels) == pytest.approx(silhouette_score(dist, labels, metric="precomputed"))


def test_silhouette_degenerate_cases_are_nan():
    dist, _ = _random_case(0, n=6)
    assert math.isnan(silhouette(dist, np.zeros(6, dtype=int)))  # one cluster
    assert math.isnan(silhouette(dist, np.arange(6)))  # all singletons
    assert math.isnan(silhouette(np.zeros((1, 1)), np.zeros(1, dtype=int)))


def test_metrics_equal_naive_loops():
    h, w, _ = planted_features(0, spread=0.4)
    e = h.astype(np.float64) * w
    dist = squareform(pdist(e, "cosine"))
    clusters = cluster_examples(dist, 0.3)
    got = neuron_metrics(dist, clusters)
    intra, inter, every = [], [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            every.append(dist[i, j])
            (intra if clusters.labels[i] == clusters.labels[j] else inter).append(dist[i, j])
    assert got["n_examples"] == len(e)
    assert got["n_clusters"] == len(set(clusters.labels.tolist())) > 1
    assert got["max_dist"] == pytest.approx(max(every))
    assert got["mean_dist"] == pytest.approx(np.mean(every))
    assert got["intra_dist"] == pytest.approx(np.mean(intra))
    assert got["inter_dist"] == pytest.approx(np.mean(inter))
    assert got["silhouette"] == pytest.approx(silhouette_score(dist, clusters.labels, metric="precomputed"))


def test_metrics_of_degenerate_neurons():
    one = neuron_metrics(np.zeros((1, 1)), cluster_examples(np.zeros((1, 1)), 0.5))
    assert one["n_examples"] == 1 and one["n_clusters"] == 1
    assert all(math.isnan(one[k]) for k in ("max_dist", "mean_dist", "intra_dist", "inter_dist", "silhouette"))
    tight = np.full((4, 4), 0.1) - 0.1 * np.eye(4)
    single = neuron_metrics(tight, cluster_examples(tight, 0.5))
    assert single["n_clusters"] == 1 and single["intra_dist"] == pytest.approx(0.1)
    assert math.isnan(single["inter_dist"]) and math.isnan(single["silhouette"])
    spread = np.full((3, 3), 0.9) - 0.9 * np.eye(3)
    apart = neuron_metrics(spread, cluster_examples(spread, 0.5, min_cluster_size=2))
    assert apart["n_clusters"] == 0  # three outlier singletons
    assert math.isnan(apart["intra_dist"]) and apart["inter_dist"] == pytest.approx(0.9)


def test_analyse_neurons_separates_planted_features_better_than_raw():
    cases = [planted_features(s) for s in range(3)]
    rows = np.concatenate([h for h, _, _ in cases])
    starts = np.cumsum([0] + [len(h) for h, _, _ in cases])
    h_bnd, counts = pad_rows(rows, [np.arange(starts[i], starts[i + 1]) for i in range(3)])
    w_bd = torch.from_numpy(np.stack([w for _, w, _ in cases]))
    results = analyse_neurons(h_bnd, counts, w_bd, ClusterConfig(), device="cpu")
    for (h, w, _), res in zip(cases, results):
        assert res.metrics["n_clusters"] == 4
        assert res.metrics["silhouette"] > res.metrics["raw_silhouette"] or math.isnan(res.metrics["raw_silhouette"])
        solo = cluster_neuron(squareform(pdist(h.astype(np.float64) * w, "cosine")), ClusterConfig())
        assert np.array_equal(solo.labels, res.clusters.labels)
        assert res.metrics["threshold"] == pytest.approx(solo.threshold)


def test_neighbour_agreement_equals_a_naive_loop():
    rng = np.random.default_rng(5)
    for _ in range(10):
        n = int(rng.integers(2, 40))
        x = rng.normal(size=(n, 3))
        x[n // 2 :] = x[: n - n // 2]  # duplicates: nearest-neighbour ties, broken by the lower rank
        dist = squareform(pdist(x, "cosine"))
        tokens = rng.integers(0, 4, size=(n, 2))
        tokens[0, 1] = -1  # a key token at position 0 has no token before it
        got = neighbour_agreement(dist, tokens)
        same_key = same_both = pairs_key = pairs_both = 0
        for i in range(n):
            j = min((k for k in range(n) if k != i), key=lambda k: (dist[i, k], k))
            same_key += tokens[i, 0] == tokens[j, 0]
            same_both += tokens[i, 0] == tokens[j, 0] and tokens[i, 1] == tokens[j, 1]
            for k in range(n):
                if k != i:
                    pairs_key += tokens[i, 0] == tokens[k, 0]
                    pairs_both += (tokens[i] == tokens[k]).all()
        assert got["same_token"] == pytest.approx(same_key / n) and got["same_bigram"] == pytest.approx(same_both / n)
        assert got["pair_same_token"] == pytest.approx(pairs_key / (n * (n - 1)))
        assert got["pair_same_bigram"] == pytest.approx(pairs_both / (n * (n - 1)))
    assert all(math.isnan(v) for v in neighbour_agreement(np.zeros((1, 1)), np.zeros((1, 2), int)).values())


@pytest.mark.parametrize("seed", range(3))
def test_figure4_metrics_equal_direct_computation(seed):
    h, w, _ = planted_features(seed, sizes=(30, 20, 15, 5), spread=0.3)
    e = h.astype(np.float64) * w
    d_ne, d_raw = squareform(pdist(e, "cosine")), squareform(pdist(h.astype(np.float64), "cosine"))
    cfg = ClusterConfig()
    z_ne, z_raw = linkage_of(d_ne), linkage_of(d_raw)
    cuts_ne, cuts_raw = cut_thresholds(d_ne, z_ne, cfg), cut_thresholds(d_raw, z_raw, cfg)
    got = figure4_metrics(d_ne, d_raw, z_ne, z_raw, cuts_ne, cuts_raw, cfg.min_cluster_size)

    def sil(d, labels):
        return silhouette_score(d, labels, metric="precomputed") if 2 <= len(set(labels)) <= len(d) - 1 else None

    ref = {}
    for rule, name in (("fixed", "fixed"), ("silhouette", "per_neuron")):
        ne = fcluster(linkage(pdist(e, "cosine"), "average"), cuts_ne[rule], "distance")
        raw = fcluster(linkage(pdist(h.astype(np.float64), "cosine"), "average"), cuts_raw[rule], "distance")
        ref[f"n_clusters_{name}"] = sum(np.bincount(ne)[1:] >= cfg.min_cluster_size)
        ref[f"silhouette_{name}"], ref[f"raw_silhouette_{name}"] = sil(d_ne, ne), sil(d_raw, raw)
        if rule == "silhouette":
            k_ne, k_raw = ne.max(), raw.max()
    # As many clusters as the other space's cut: scipy's maxclust gives exactly k when no merge heights tie.
    ref["silhouette_at_raw_k"] = sil(d_ne, fcluster(z_ne, k_raw, "maxclust"))
    ref["raw_silhouette_at_ne_k"] = sil(d_raw, fcluster(z_raw, k_ne, "maxclust"))
    assert got["n_clusters_fixed"] > 4  # the fixed cut shatters these noisy features ...
    assert k_ne < got["n_clusters_fixed"]  # ... and the per-neuron cut does not
    for key, value in ref.items():
        if value is None:
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), key


def test_nearest_neighbours_share_the_planted_feature_in_neuron_embeddings_not_raw_h():
    """The cut-free measure sees the mechanism of Figure 4: fed each example's true feature as its "token",
    neighbours in h ⊙ w share it; neighbours in raw h, dominated by noise w ignores, less often."""
    for seed in range(3):
        h, w, truth = planted_features(seed)
        tokens = np.stack([truth, np.zeros_like(truth)], axis=1)
        ne = neighbour_agreement(squareform(pdist(h.astype(np.float64) * w, "cosine")), tokens)
        raw = neighbour_agreement(squareform(pdist(h.astype(np.float64), "cosine")), tokens)
        assert ne["same_token"] >= 0.98 and raw["same_token"] < ne["same_token"] - 0.1, (ne, raw)
        assert raw["same_token"] >= raw["pair_same_token"] - 0.1  # raw h is no worse than chance
