"""The GPU code paths give the CPU results: run on every device this machine has (CPU in CI, CUDA where
present) and in the reduced precisions a GPU run uses."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

import index.exact as exact
from index.exact import exact_search
from jobs.ray_utils import gpu_wanted
from ne.compute.cluster import cluster_neuron
from ne.compute.embed import cosine_distances
from ne.compute.metrics import analyse_neurons
from ne.config import ClusterConfig
from ne.errors import ConfigError
from tests.planted import planted_features

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_search_equals_faiss_flat(device, monkeypatch):
    monkeypatch.setattr(exact, "CHUNK", 700)  # several chunks, the last one short
    x, queries = _unit_vectors(3000, 48, 0), _unit_vectors(50, 48, 1)
    flat = faiss.IndexFlatIP(48)
    flat.add(x)
    want_sims, want_rows = flat.search(queries, 20)
    sims, rows = exact_search(x, queries, 20, device=device)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    sims, rows = exact_search(x[:5], queries, 8, device=device)  # fewer vectors than k: padded as FAISS pads
    small = faiss.IndexFlatIP(48)
    small.add(x[:5])
    np.testing.assert_array_equal(rows, small.search(queries, 8)[1])
    assert np.isinf(sims[:, 5:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_search_finds_the_same_neighbours(device, dtype):
    x, queries = _unit_vectors(4000, 64, 2), _unit_vectors(100, 64, 3)
    _, truth = exact_search(x, queries, 20, device=device)
    _, rows = exact_search(x, queries, 20, device=device, dtype=dtype)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(rows, truth)])
    assert recall >= 0.97, recall


@pytest.mark.parametrize("device", DEVICES)
def test_distances_and_clusters_on_every_device_equal_scipy(device):
    h, w, _ = planted_features(seed=4)
    h_t, w_t = torch.from_numpy(h)[None], torch.from_numpy(w)[None]
    dist = cosine_distances(h_t, w_t, device=device)[0].cpu().numpy()
    ref = squareform(pdist(h.astype(np.float64) * w, "cosine"))
    np.testing.assert_allclose(dist, ref, atol=2e-6)
    cfg = ClusterConfig()
    [result] = analyse_neurons(h_t, np.array([len(h)]), w_t, cfg, device=device)
    want = cluster_neuron(ref, cfg)  # the run's cut, per neuron by default
    np.testing.assert_array_equal(result.clusters.labels, want.labels)


def test_asking_for_gpus_a_cluster_lacks_is_an_error(local_ray):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_wanted(None, "cluster.use_gpu") is False and gpu_wanted(False, "cluster.use_gpu") is False
    with pytest.raises(
        ConfigError,
        match="cluster.use_gpu is true but the Ray cluster has no GPU; set cluster.use_gpu to null or false",
    ):
        gpu_wanted(True, "cluster.use_gpu")
