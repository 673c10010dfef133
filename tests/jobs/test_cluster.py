"""The cluster job on a synthetic run directory: outputs against direct computation, resume, Ray."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import pdist, squareform

import jobs.cluster as job
from jobs.label import run_label
from ne import schema
from ne.compute.cluster import cluster_neuron, cut, relabel_by_size
from ne.config import RunConfig
from ne.errors import ConfigError, DataError
from ne.rundir.store import RunDir
from ne.rundir.weights import read_w_in
from tests.planted import write_synthetic_run


def _cfg(path, per_task=3):
    cfg = RunConfig(run_dir=str(path))
    cfg.cluster.neurons_per_task = per_task
    return cfg


def _outputs(path, layers=(0, 2)) -> dict[str, pd.DataFrame]:
    run = RunDir(str(path))
    keys = {
        "clusters": ["layer", "neuron", "rank"],
        "dendrograms": ["layer", "neuron"],
        "centroids": ["layer", "neuron", "cluster"],
    }
    out = {}
    for name, k in keys.items():
        tables = [run.read_parquet(schema.layer_dir(name, layer)).to_pandas() for layer in layers]
        out[name] = pd.concat(tables).sort_values(k).reset_index(drop=True)
    out["metrics"] = run.read_parquet(schema.METRICS).to_pandas()
    return out


def _assert_same(a, b):
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "run"
    truth = write_synthetic_run(str(path))
    summary = job.run_cluster(_cfg(path), in_process=True)
    return path, truth, summary


def test_run_without_harvest_is_an_error(tmp_path):
    with pytest.raises(DataError, match="stage .contexts. is missing.*ne harvest"):
        job.run_cluster(_cfg(tmp_path / "empty"), in_process=True)


def test_outputs_equal_direct_clustering(reference):
    path, truth, summary = reference
    out = _outputs(path)
    cfg = _cfg(path).cluster
    assert summary.neurons == 14 and summary.with_examples == 10
    assert len(out["metrics"]) == 14
    run = RunDir(str(path))
    examples = pd.concat(
        [run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas() for layer in (0, 2)]
    )
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas()
    tokens = dict(zip(contexts.ctx_id, contexts.tokens))
    for (layer, neuron), (_, h) in truth.items():
        rows = out["clusters"].query("layer == @layer and neuron == @neuron")
        assert rows["rank"].tolist() == list(range(len(h)))
        if len(h) == 0:
            continue
        e = h.astype(np.float64) * read_w_in(RunDir(str(path)), layer)[:, neuron]
        dist = squareform(pdist(e, "cosine")) if len(h) > 1 else np.zeros((1, 1))
        ref = cluster_neuron(dist, cfg)
        assert rows["cluster"].tolist() == ref.labels.tolist()
        assert np.flatnonzero(rows["is_central"]).tolist() == sorted(ref.central.tolist())
        dendro = out["dendrograms"].query("layer == @layer and neuron == @neuron")
        z = np.asarray(dendro["linkage"].iloc[0]).reshape(-1, 4)
        np.testing.assert_allclose(z, ref.linkage, atol=1e-5)
        # The neuron's own cut is stored, and cutting its stored dendrogram there (as the viewer draws it)
        # gives its stored clusters.
        threshold = dendro["threshold"].iloc[0]
        if len(h) > 1:
            assert threshold == pytest.approx(ref.threshold, abs=1e-5)
            assert relabel_by_size(cut(z, threshold)).tolist() == rows["cluster"].tolist()
        metrics = out["metrics"].query("layer == @layer and neuron == @neuron").iloc[0]
        assert metrics["threshold"] == pytest.approx(threshold, abs=1e-6, nan_ok=True)
        # Nearest-neighbour agreement on the key token, from the contexts, by a naive loop.
        ex = examples.query("layer == @layer and neuron == @neuron").sort_values("rank")
        key = [tokens[c][p] for c, p in zip(ex.ctx_id, ex.pos)]
        if len(h) > 1:
            nearest = [min((j for j in range(len(h)) if j != i), key=lambda j: (dist[i, j], j)) for i in range(len(h))]
            assert metrics["nn_same_token"] == pytest.approx(np.mean([key[i] == key[j] for i, j in enumerate(nearest)]))
        else:
            assert np.isnan(metrics["nn_same_token"])
        assert metrics["n_examples"] == len(h)
        assert metrics["n_clusters"] == len(set(ref.labels[~ref.outlier].tolist()))
        assert rows["outlier"].tolist() == ref.outlier.tolist()
        # Each cluster's centroid: the mean of its members' unit embeddings, made unit length.
        cents = out["centroids"].query("layer == @layer and neuron == @neuron").sort_values("cluster")
        assert cents.cluster.tolist() == list(range(ref.n_clusters))
        assert cents["size"].tolist() == np.bincount(ref.labels).tolist()
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        for c, vector in zip(cents.cluster, cents.vector):
            mean = unit[ref.labels == c].mean(axis=0)
            np.testing.assert_allclose(np.asarray(vector, np.float64), mean / np.linalg.norm(mean), atol=2e-3)
    run_label(_cfg(path))  # the report comes with the labels, the stage after cluster
    report = (path / "report" / "report.md").read_text()
    assert "most polysemantic" in report and (path / "report" / "separation.png").stat().st_size > 1000
    assert "each space at its own per-neuron cut" in report and "the key token and the token before it" in report
    stage = RunDir(str(path)).manifest()["stages"]["cluster"]
    assert stage["status"] == "done" and stage["info"]["neurons"] == 14
    assert not (path / "_work").exists()


def test_interrupted_run_resumes_per_batch(reference, tmp_path, monkeypatch):
    path = tmp_path / "run"
    write_synthetic_run(str(path))
    real, calls = job.cluster_batch, []

    def failing(url, batch, cfg, layer_h, *rest):
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        calls.append(batch)
        return real(url, batch, cfg, layer_h, *rest)

    monkeypatch.setattr(job, "cluster_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        job.run_cluster(_cfg(path), in_process=True)
    assert RunDir(str(path)).manifest()["stages"]["cluster"]["status"] == "running"
    first = calls[0]
    (path / job.batch_files(first)[0]).unlink()  # a lost part: that batch must be redone too
    calls.clear()
    monkeypatch.setattr(job, "cluster_batch", lambda *a: (calls.append(a[1]), real(*a))[1])
    job.run_cluster(_cfg(path), in_process=True)
    assert len(calls) == 6 - 3 + 1 and first in calls
    _assert_same(_outputs(path), _outputs(reference[0]))
    calls.clear()
    job.run_cluster(_cfg(path), in_process=True)  # finished: nothing to redo
    assert calls == []


def test_changed_settings_need_force(reference, tmp_path):
    path = tmp_path / "run"
    write_synthetic_run(str(path))
    job.run_cluster(_cfg(path), in_process=True)
    other = _cfg(path)
    other.cluster.threshold = 0.2
    with pytest.raises(ConfigError, match="cluster.threshold is 0.2 in this config but was 0.5.*--force cluster"):
        job.run_cluster(other, in_process=True)
    summary = job.run_cluster(other, force=["cluster"], in_process=True)
    assert summary.median_clusters >= reference[2].median_clusters


@pytest.mark.ray
def test_ray_run_equals_in_process(reference, tmp_path, local_ray):
    path = tmp_path / "run"
    write_synthetic_run(str(path))
    job.run_cluster(_cfg(path, per_task=4))
    _assert_same(_outputs(path), _outputs(reference[0]))


@pytest.mark.ray
def test_ray_over_more_layers_than_it_holds_at_once(tmp_path, local_ray):
    """Four layers, of which at most two are held: every batch still gets its own layer's h."""
    layers = (0, 1, 2, 3)
    for name in ("ray", "one"):
        write_synthetic_run(str(tmp_path / name), layers=layers)
    job.run_cluster(_cfg(tmp_path / "ray", per_task=2))
    job.run_cluster(_cfg(tmp_path / "one", per_task=5), in_process=True)
    _assert_same(_outputs(tmp_path / "ray", layers), _outputs(tmp_path / "one", layers))


def test_incomplete_harvest_files_are_named(tmp_path):
    path = tmp_path / "run"
    write_synthetic_run(str(path))
    run = RunDir(str(path))
    h = run.read_parquet(schema.layer_dir(schema.H_DIR, 2))
    run.write_parquet(f"{schema.layer_dir(schema.H_DIR, 2)}/{schema.part_name(0)}", h.slice(0, h.num_rows - 1))
    with pytest.raises(
        DataError,
        match=r"h/layer=2/part-00000.parquet has \d+ bytes where \d+ were written.*"
        r"redo stage 'examples'",
    ):
        job.run_cluster(_cfg(path), in_process=True)
    path = tmp_path / "other"
    write_synthetic_run(str(path))
    (path / "weights" / "layer=0.safetensors").unlink()
    with pytest.raises(DataError, match=r"weights/layer=0.safetensors is missing; redo stage 'weights'"):
        job.run_cluster(_cfg(path), in_process=True)


def test_a_run_too_small_for_any_silhouette_says_so_instead_of_nan(tmp_path):
    """As from a one-line corpus: neurons with 0, 1 and 2 examples, so no silhouette is defined in either space."""
    path = str(tmp_path / "run")
    write_synthetic_run(path, d_mlp=3)
    summary = job.run_cluster(RunConfig(run_dir=path), in_process=True)
    text = summary.describe()
    assert "nan" not in text.lower()
    assert (
        "the silhouettes of neuron and pre-MLP embeddings cannot be compared: no neuron has 2 to n - 1 clusters" in text
    )
