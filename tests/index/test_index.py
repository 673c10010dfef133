"""The similar-features index: recall at scale, queries against brute force, and bad input."""

import dataclasses

import numpy as np
import pytest

from index.build import build_index, run_index
from index.query import SimilarFeatures
from jobs.cluster import run_cluster
from ne import schema
from ne.config import IndexConfig, RunConfig
from ne.errors import ConfigError, DataError
from ne.rundir.store import RunDir
from ne.rundir.weights import read_w_in
from tests.planted import write_synthetic_run


def _mixture(n, d, rng, centers):
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_recall_at_20_on_200k_vectors():
    rng = np.random.default_rng(0)
    d = 64
    centers = rng.normal(size=(2000, d)).astype(np.float32)
    x = _mixture(200_000, d, rng, centers)
    index, info = build_index(x, IndexConfig(exact_below=100_000, recall_k=20, recall_queries=200), seed=0)
    assert info["type"].startswith("IVF") and info["nlist"] == round(4 * np.sqrt(200_000))
    assert info["recall"] >= 0.95
    queries = _mixture(200, d, rng, centers)  # new points, not indexed ones
    exact = np.argpartition(-(queries @ x.T), 20, axis=1)[:, :20]  # the top 20, unordered
    found = index.search(queries, 20)[1]
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, exact)])
    assert recall >= 0.95, recall


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("idx") / "run")
    write_synthetic_run(path, d_mlp=12)
    cfg = RunConfig(run_dir=path, index=IndexConfig(vectors="neuron"))
    run_cluster(cfg, in_process=True)
    summary = run_index(cfg)
    assert "Flat index" in summary.describe()
    return path


def _central_vectors(path, vectors="neuron"):
    """Brute force: every central example's vector, rebuilt from the run's files with pandas."""
    run = RunDir(path)
    keys, vecs = [], []
    for layer in (0, 2):
        cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
        h = run.read_parquet(schema.layer_dir(schema.H_DIR, layer)).to_pandas().set_index("h_id")
        w = read_w_in(run, layer)
        for r in cl[cl.is_central].itertuples():
            e = ex[(ex.neuron == r.neuron) & (ex["rank"] == r.rank)].iloc[0]
            v = np.asarray(h.loc[e.h_id, "h"], dtype=np.float64)
            if vectors == "neuron":
                v = v * w[:, r.neuron]
            keys.append((layer, r.neuron, r.cluster, e.ctx_id, e.pos))
            vecs.append(v / np.linalg.norm(v))
    return keys, np.array(vecs)


def test_queries_equal_brute_force(run_dir):
    sf = SimilarFeatures.load(run_dir)
    keys, vecs = _central_vectors(run_dir)
    assert sf.index.ntotal == len(keys)
    q = keys.index(next(k for k in keys if k[:2] == (0, 4)))
    sims = vecs @ vecs[q]
    order = [i for i in np.argsort(-sims, kind="stable") if keys[i][:2] != (0, 4)][:5]
    hits = sf.query(0, 4, keys[q][2], k=5)
    assert [(h.layer, h.neuron, h.cluster, h.ctx_id, h.pos) for h in hits] == [keys[i] for i in order]
    np.testing.assert_allclose([h.similarity for h in hits], sims[order], atol=1e-5)
    with_self = sf.query(0, 4, keys[q][2], k=3, exclude_same_neuron=False)
    assert (with_self[0].layer, with_self[0].neuron, with_self[0].cluster) == keys[q][:3]
    assert with_self[0].similarity == pytest.approx(1.0, abs=1e-5)
    by_vector = sf.query_vector(vecs[q] * 7.0, k=3)
    assert [(h.neuron, h.cluster) for h in by_vector] == [(h.neuron, h.cluster) for h in with_self]


def test_ivf_and_pre_mlp_options(run_dir, tmp_path):
    path = str(tmp_path / "run")
    write_synthetic_run(path, d_mlp=12)
    cfg = RunConfig(run_dir=path, index=IndexConfig(vectors="pre_mlp", exact_below=0, target_recall=1.0))
    run_cluster(cfg, in_process=True)
    info = run_index(cfg).info
    assert info["type"].startswith("IVF") and info["recall"] >= 0.99 and info["vectors"] == "pre_mlp"
    keys, vecs = _central_vectors(path, "pre_mlp")
    sf = SimilarFeatures.load(path)
    q = keys.index(next(k for k in keys if k[:3] == (2, 3, 0)))
    hits = sf.query(2, 3, 0, 4, exclude_same_neuron=False)
    # neighbouring neurons share h rows, so pre-MLP vectors tie: compare similarities, not identities
    np.testing.assert_allclose([h.similarity for h in hits], np.sort(vecs @ vecs[q])[::-1][:4], atol=1e-5)
    for h in hits:
        i = keys.index(next(k for k in keys if k[:3] == (h.layer, h.neuron, h.cluster)))
        assert vecs[i] @ vecs[q] == pytest.approx(h.similarity, abs=1e-5)


def test_mean_pre_mlp_vectors_equal_brute_force(tmp_path):
    """The default vector: per cluster, the normalised mean of its members' unit h, from the run's tables."""
    path = str(tmp_path / "run")
    write_synthetic_run(path, d_mlp=12)
    cfg = RunConfig(run_dir=path)
    assert cfg.index.vectors == "mean_pre_mlp"
    run_cluster(cfg, in_process=True)
    run_index(cfg)
    sf = SimilarFeatures.load(path)
    run = RunDir(path)
    expected = []
    for layer in (0, 2):
        cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas().merge(cl, on=["neuron", "rank"])
        h = run.read_parquet(schema.layer_dir(schema.H_DIR, layer)).to_pandas().set_index("h_id")
        for (neuron, cluster), members in ex.groupby(["neuron", "cluster"]):
            rows = np.stack(h.loc[members.h_id, "h"].to_numpy()).astype(np.float64)
            mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
            expected.append(((layer, neuron, cluster), mean / np.linalg.norm(mean)))
    got = {(int(r.layer), int(r.neuron), int(r.cluster)): sf.index.reconstruct(i) for i, r in sf.ids.iterrows()}
    assert len(got) == len(expected)
    for key, vec in expected:
        np.testing.assert_allclose(got[key], vec, atol=1e-5)


def test_bad_queries_name_the_value(run_dir):
    sf = SimilarFeatures.load(run_dir)
    with pytest.raises(ConfigError, match=r"layer 1 is not in this run; it has layers \[0, 2\]"):
        sf.query(1, 0, 0)
    with pytest.raises(ConfigError, match=r"neuron 12 is out of range; layer 0 has neurons 0..11"):
        sf.query(0, 12, 0)
    with pytest.raises(ConfigError, match=r"neuron 0 of layer 0 has no examples"):
        sf.query(0, 0, 0)
    with pytest.raises(ConfigError, match=r"cluster 9 is out of range; neuron 1 of layer 0 has clusters 0..0"):
        sf.query(0, 1, 9)
    for k in (0, -3):
        with pytest.raises(ConfigError, match=f"k is {k}; ask for at least one"):
            sf.query(0, 4, 0, k=k)
    with pytest.raises(ConfigError, match=r"shape \(1, 5\).*dimension 32"):
        sf.query_vector(np.ones(5), k=3)
    with pytest.raises(ConfigError, match="zero or not finite"):
        sf.query_vector(np.zeros(32))


def test_missing_or_corrupt_index_files(run_dir, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(run_dir, path)
    good = (path / "index" / "faiss.index").read_bytes()
    (path / "index" / "faiss.index").write_bytes(b"not a faiss index")
    with pytest.raises(
        DataError,
        match=r"faiss.index has 17 bytes where \d+ were written: it is truncated or "
        r"replaced; redo stage 'index'.*--force index",
    ):
        SimilarFeatures.load(str(path))
    (path / "index" / "faiss.index").write_bytes(good[:200])
    with pytest.raises(DataError, match="faiss.index has 200 bytes where"):
        SimilarFeatures.load(str(path))  # truncated
    (path / "index" / "faiss.index").write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(DataError, match=r"faiss.index is corrupt \(its content differs from what was written\)"):
        SimilarFeatures.load(str(path))  # one bit flipped
    (path / "index" / "faiss.index").unlink()
    with pytest.raises(DataError, match=r"faiss.index is missing; redo stage 'index'"):
        SimilarFeatures.load(str(path))
    with pytest.raises(DataError, match=r"run directory .*nothing does not exist"):
        SimilarFeatures.load(str(tmp_path / "nothing"))


def test_index_needs_clusters(tmp_path):
    path = str(tmp_path / "run")
    write_synthetic_run(path)
    with pytest.raises(DataError, match="stage 'cluster' is missing, and 'index' needs it; run `ne cluster"):
        run_index(RunConfig(run_dir=path))


def test_rebuild_skips_and_force_redoes(run_dir):
    cfg = RunConfig(run_dir=run_dir, index=IndexConfig(vectors="neuron"))
    before = RunDir(run_dir).manifest()["stages"]["index"]["finished"]
    assert run_index(cfg).info["seconds"] > 0
    assert RunDir(run_dir).manifest()["stages"]["index"]["finished"] == before
    changed = dataclasses.replace(cfg, index=IndexConfig(vectors="pre_mlp"))
    with pytest.raises(ConfigError, match="index.vectors is 'pre_mlp' in this config but was 'neuron'.*--force index"):
        run_index(changed)


def test_cli_similar_cluster_and_index(run_dir, tmp_path, capsys):
    from ne.cli import main

    assert main(["similar", run_dir, "--layer", "0", "--neuron", "4", "--cluster", "0", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("query: layer 0, neuron 4, cluster 0: ") and "[[" in lines[0]
    assert lines[1].startswith(
        "answered by vector: the nearest in the index, by neuron vectors (this run has no co-activation table"
    )
    assert lines[2].split()[:4] == ["layer", "neuron", "cluster", "similarity"]
    expected = SimilarFeatures.load(run_dir).query(0, 4, 0, k=3)
    for line, hit in zip(lines[3:], expected, strict=True):
        layer, neuron, cluster, sim = line.split()[:4]
        assert (int(layer), int(neuron), int(cluster)) == (hit.layer, hit.neuron, hit.cluster)
        assert float(sim) == pytest.approx(hit.similarity, abs=1e-4)
    assert main(["similar", run_dir, "--layer", "0", "--neuron", "4", "-k", "0"]) == 2
    assert "k is 0; ask for at least one" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path / 'none'}\n")
    assert main(["cluster", "--config", str(config)]) == 2
    assert "stage 'contexts' is missing, and 'cluster' needs it" in capsys.readouterr().err
    config.write_text(f"run_dir: {run_dir}\nindex:\n  vectors: neuron\n")
    assert main(["index", "--config", str(config)]) == 0
    assert "Flat index" in capsys.readouterr().out


def test_recall_credits_tied_vectors_and_counts_misses():
    from index.build import recall_at_k

    exact = np.array([[0.9, 0.8, 0.8], [0.7, 0.6, 0.5]])
    # Query 0 found another of two tied vectors (same similarity 0.8): full recall. Query 1 missed its third.
    found = np.array([[0.9, 0.8, 0.8], [0.7, 0.6, 0.4]])
    assert recall_at_k(found, exact) == pytest.approx((3 / 3 + 2 / 3) / 2)
    assert recall_at_k(np.array([[0.9, -3.4e38, -3.4e38]]), exact[:1]) == pytest.approx(1 / 3)  # FAISS's padding


def test_query_vector_takes_only_the_direction_at_any_scale(run_dir):
    """1e-30 or 1e30 times a vector finds what the vector finds, with its cosines (brute force in float64)."""
    sf = SimilarFeatures.load(run_dir)
    keys, vecs = _central_vectors(run_dir)
    rng = np.random.default_rng(0)
    for direction in (vecs[3], rng.normal(size=sf.dim), np.ones(sf.dim)):
        sims = vecs @ (direction / np.linalg.norm(direction))
        order = np.argsort(-sims, kind="stable")[:4]
        for scale in (1e-30, 1e-300, 1.0, 1e30, 1e300):
            hits = sf.query_vector(direction * scale, k=4)
            np.testing.assert_allclose([h.similarity for h in hits], sims[order], atol=1e-5)
            assert all(-1.0 - 1e-5 <= h.similarity <= 1.0 + 1e-5 for h in hits)
    for bad in (np.zeros(sf.dim), np.full(sf.dim, np.nan), np.full(sf.dim, np.inf)):
        with pytest.raises(ConfigError, match="zero or not finite; give a vector with a direction"):
            sf.query_vector(bad)
    with pytest.raises(ConfigError, match="the query vector must hold numbers"):
        sf.query_vector(["a"] * sf.dim)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, None, 0), "neuron is None (NoneType); it must be an integer"),
        ((0, 5, True), "cluster is True (bool); it must be an integer"),
        (("0", 4, 0), "layer is '0' (str); it must be an integer"),
        ((0, 5.5, 0), "neuron is 5.5 (float); it must be an integer"),
        ((0.0, 4, 0), "layer is 0.0 (float); it must be an integer"),
    ],
)
def test_query_arguments_of_the_wrong_type_name_themselves(run_dir, args, message):
    sf = SimilarFeatures.load(run_dir)
    with pytest.raises(ConfigError) as err:
        sf.query(*args)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^k is True \(bool\); it must be an integer$"):
        sf.query(0, 4, 0, k=True)
    assert sf.query(np.int64(0), np.int32(4), np.int64(0), k=np.int64(2)) == sf.query(0, 4, 0, k=2)
