"""Batched neuron-embedding distances against scipy's pdist, one neuron at a time."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from ne.compute import embed
from ne.compute.embed import cosine_distances, neuron_distances, neuron_embeddings, pad_rows


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    d_model = 768
    rows = rng.normal(size=(500, d_model)).astype(np.float32) + rng.normal(size=d_model).astype(np.float32)
    counts = [100, 37, 2, 1, 100, 64]
    index_lists = [rng.choice(len(rows), size=c, replace=False) for c in counts]
    w = rng.normal(size=(len(counts), d_model)).astype(np.float32) * rng.exponential(size=d_model)
    return rows, index_lists, w


def test_neuron_embeddings_is_hadamard_product():
    h = torch.randn(3, 5, 7)
    w = torch.randn(3, 7)
    e = neuron_embeddings(h, w)
    assert torch.equal(e[1, 2], h[1, 2] * w[1])
    with pytest.raises(ValueError, match="d_model 7 but w has 6"):
        neuron_embeddings(h, torch.randn(3, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_distances_equal_scipy_pdist(batch, dtype):
    rows, index_lists, w = batch
    h_bnd, counts = pad_rows(rows, index_lists)
    assert list(counts) == [len(ix) for ix in index_lists]
    dist = cosine_distances(h_bnd, torch.from_numpy(w), dtype=dtype, device="cpu").numpy()
    for b, ix in enumerate(index_lists):
        n = len(ix)
        e = rows[ix].astype(np.float64) * w[b].astype(np.float64)
        expected = squareform(pdist(e, "cosine")) if n > 1 else np.zeros((1, 1))
        np.testing.assert_allclose(dist[b, :n, :n], expected, atol=1e-5, rtol=0)
        assert np.all(np.diag(dist[b, :n, :n]) == 0)


def test_w_none_gives_raw_pre_mlp_distances(batch):
    rows, index_lists, _ = batch
    h_bnd, _ = pad_rows(rows, index_lists[:1])
    dist = cosine_distances(h_bnd, None, device="cpu")[0].numpy()
    np.testing.assert_allclose(
        dist, squareform(pdist(rows[index_lists[0]].astype(np.float64), "cosine")), atol=1e-5, rtol=0
    )
    ones = torch.ones(1, rows.shape[1])
    assert torch.allclose(cosine_distances(h_bnd, ones, device="cpu")[0], torch.from_numpy(dist))


def test_distances_do_not_depend_on_padding_or_batch_mates(batch):
    rows, index_lists, w = batch
    alone, _ = pad_rows(rows, index_lists[2:3])
    together, _ = pad_rows(rows, index_lists)
    d_alone = cosine_distances(alone, torch.from_numpy(w[2:3]), device="cpu")[0]
    d_together = cosine_distances(together, torch.from_numpy(w), device="cpu")[2, :2, :2]
    assert torch.allclose(d_alone, d_together, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 100 * 768 * 4, 2**40])
def test_chunked_distances_cover_the_batch_and_equal_one_product(batch, monkeypatch, chunk_bytes):
    """One neuron, two, or the whole batch per product: the same numbers, every neuron once, in order."""
    rows, index_lists, w = batch
    h_bnd, _ = pad_rows(rows, index_lists)
    w_bd = torch.from_numpy(w)
    monkeypatch.setattr(embed, "CPU_CHUNK_BYTES", chunk_bytes)
    for weights in (w_bd, None):
        chunks = list(neuron_distances(h_bnd, weights, device="cpu"))
        expected_step = {1: 1, 2 * 100 * 768 * 4: 2, 2**40: len(index_lists)}[chunk_bytes]
        assert [lo for lo, _ in chunks] == list(range(0, len(index_lists), expected_step))
        whole = np.concatenate([d for _, d in chunks])
        assert whole.dtype == np.float64
        one_product = cosine_distances(h_bnd, weights, device="cpu").double().numpy()
        for b, ix in enumerate(index_lists):  # padded rows may differ; the real block may not
            n = len(ix)
            np.testing.assert_allclose(whole[b, :n, :n], one_product[b, :n, :n], atol=1e-6, rtol=0)


def test_zero_embedding_is_at_distance_one():
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [2.0, 4.0]]])
    dist = cosine_distances(h, None, device="cpu")[0]
    assert dist[0, 1] == 1.0 and dist[1, 2] == 1.0
    assert abs(float(dist[0, 2])) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_read_h_returns_requested_rows_in_order(tmp_path, dtype):
    import pyarrow as pa

    from ne import schema
    from ne.errors import DataError
    from ne.rundir.h import load_h, read_h
    from ne.rundir.store import RunDir

    run = RunDir(str(tmp_path))
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 6)).astype(dtype)
    ids = np.arange(30) * 7 + 3
    for part, sl in enumerate((slice(0, 12), slice(12, 30))):
        table = pa.table(
            {"h_id": ids[sl], "ctx_id": ids[sl] // 16, "pos": ids[sl] % 16, "h": list(rows[sl])},
            schema=schema.h_schema(6, dtype),
        )
        run.write_parquet(f"{schema.layer_dir(schema.H_DIR, 1)}/{schema.part_name(part)}", table)
    want = ids[[25, 3, 3, 14, 0]]
    got = read_h(run, 1, want)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows[[25, 3, 3, 14, 0]].astype(np.float32))
    with pytest.raises(DataError, match=r"h/layer=1 lacks h_ids \[4\]"):
        read_h(run, 1, np.array([3, 4]))
    whole = load_h(run, 1)  # all rows, shared by a layer's batches: same rows, same errors
    np.testing.assert_array_equal(whole.h_ids, ids)
    np.testing.assert_array_equal(whole.take(want), got)
    with pytest.raises(DataError, match=r"h/layer=1 lacks h_ids \[4, 500\]"):
        whole.positions(np.array([500, 3, 4]))


# --- gated MLPs: the concat embedding, the weights file, the planted-feature choice ------------------------


def test_concat_distances_equal_those_of_the_explicit_concatenation(batch):
    """cosine_distances takes [b, parts, d] weights without building the 2d-wide embedding; same numbers."""
    rows, index_lists, w = batch
    up = np.roll(w, 5, axis=1) * 0.7
    h_bnd, _ = pad_rows(rows, index_lists)
    w_bpd = torch.from_numpy(np.stack([w, up], axis=1))
    dist = cosine_distances(h_bnd, w_bpd, dtype=torch.float64, device="cpu").numpy()
    for b, ix in enumerate(index_lists):
        if len(ix) < 2:
            continue
        h = rows[ix].astype(np.float64)
        e = np.concatenate([h * w[b], h * up[b]], axis=1)
        np.testing.assert_allclose(dist[b, : len(ix), : len(ix)], squareform(pdist(e, "cosine")), atol=1e-9)
    explicit = neuron_embeddings(h_bnd[:1], w_bpd[:1])
    assert explicit.shape == (1, h_bnd.shape[1], 2 * rows.shape[1])
    assert torch.equal(explicit[0, 0, rows.shape[1] :], h_bnd[0, 0] * w_bpd[0, 1])


def test_weights_file_is_read_by_neuron_range(tmp_path):
    from ne import schema
    from ne.errors import ConfigError
    from ne.rundir.store import RunDir
    from ne.rundir.weights import read_layer_weights, read_w_in, weights_file

    g = torch.randn(16, 40)
    u = torch.randn(16, 40)
    run = RunDir(str(tmp_path))
    run.write_bytes(
        schema.weights_path(3),
        weights_file({"W_gate": g, "b_gate": torch.zeros(40), "W_up": u, "b_up": torch.zeros(40)}),
    )
    part = read_layer_weights(run, 3, 10, 17)
    assert part.gated and part.d_mlp == 40 and part.gate.shape == (7, 16)
    np.testing.assert_array_equal(part.unit_weights(np.arange(10, 17), "gate")[:, 0], g.numpy()[:, 10:17].T)
    both = part.unit_weights(np.array([12, 16]), "concat")
    np.testing.assert_array_equal(both[:, 1], u.numpy()[:, [12, 16]].T)
    np.testing.assert_array_equal(read_w_in(run, 3), g.numpy())
    e = part.embed(np.ones((2, 16), np.float32), np.array([12, 16]), "concat")
    np.testing.assert_array_equal(e, np.concatenate([both[:, 0], both[:, 1]], axis=1))
    with pytest.raises(ConfigError, match="model.gated_embedding is 'gat'; choose one of 'concat', 'gate'"):
        part.unit_weights(np.array([12]), "gat")


def _planted_auc(where: str, mode: str, seeds: range, spread: float) -> tuple[float, float]:
    """(mean ARI at the default cut, mean AUC of same-feature pairs being closer) over seeds."""
    from sklearn.metrics import adjusted_rand_score, roc_auc_score

    from ne.compute.cluster import cluster_examples
    from ne.compute.embed import LayerWeights
    from ne.config import ClusterConfig
    from tests.planted import planted_gated_features

    ari, auc = [], []
    for seed in seeds:
        h, g, u, truth = planted_gated_features(seed, where, spread=spread)
        w = LayerWeights(g[None], u[None]).unit_weights(np.array([0]), mode)
        d = cosine_distances(torch.from_numpy(h)[None], torch.from_numpy(w), device="cpu")[0].numpy()
        ari.append(adjusted_rand_score(truth, cluster_examples(d, ClusterConfig().threshold).labels))
        upper = np.triu_indices(len(truth), 1)
        auc.append(roc_auc_score((truth[:, None] == truth[None])[upper], -d[upper]))
    return float(np.mean(ari)), float(np.mean(auc))


def test_planted_gated_features_concat_is_never_blind():
    """The measurement behind model.gated_embedding's default (benchmarks/gated_embedding.py prints it all):
    `gate` cannot see features that live in the up projection; `concat` sees features wherever they live."""
    seeds, spread = range(5), 0.15
    got = {
        (where, mode): _planted_auc(where, mode, seeds, spread)
        for where in ("gate", "up", "both")
        for mode in ("gate", "concat")
    }
    assert got["up", "gate"][1] < 0.6 and got["up", "gate"][0] < 0.1  # blind
    for where in ("gate", "up", "both"):
        assert got[where, "concat"][1] > 0.95, (where, got[where, "concat"])
    assert got["both", "concat"][0] > 0.95 and got["both", "concat"][0] > got["both", "gate"][0]
    assert got["gate", "gate"][1] > 0.95  # and gate does see its own features
