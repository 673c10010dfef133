"""Feature clusters: planted features, scipy's linkage, brute-force central examples, edge cases."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import adjusted_rand_score

from ne.cluster import cluster_examples, cut, relabel_by_size
from ne.config import ClusterConfig
from ne.embed import cosine_distances
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
    best_raw = max(adjusted_rand_score(truth, cluster_examples(_distances(h), t).labels)
                   for t in np.linspace(0.05, 1.0, 20))
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
