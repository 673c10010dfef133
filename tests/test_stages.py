"""The stage graph: no stale or mixed results, integrity checks, the writer's lock, and `ne status`.

Each test of a "silent wrong result" reproduces one case that today's stage graph must refuse or repair;
all of them run on a small finished run (tiny random GPT-2-shaped model, pydoc text) copied per test.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from index.build import run_index
from index.query import SimilarFeatures
from jobs.cluster import run_cluster
from jobs.harvest import run_harvest
from ne import schema
from ne.cli import main
from ne.config import ClusterConfig, DataConfig, HarvestConfig, RunConfig, to_dict
from ne.errors import ConfigError, DataError
from ne.reader import RunData
from ne.stages import GRAPH, ancestors, descendants, owner_of, state_of
from ne.store import RunDir
from tests.conftest import REPO


def _cfg(run_dir, model_cfg) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir), model=model_cfg,
        data=DataConfig(source="pydoc", n_ctx=32, max_contexts=48, contexts_per_part=8),
        harvest=HarvestConfig(layers=[0, 1], k=8, frac=0.5, batch_size=8, num_workers=0),
        cluster=ClusterConfig(neurons_per_task=128),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_cfg) -> RunConfig:
    """A finished run: harvest in this process, clusters in this process, index."""
    cfg = _cfg(tmp_path_factory.mktemp("finished") / "run", tiny_model_cfg)
    run_harvest(cfg)
    run_cluster(cfg, in_process=True)
    run_index(cfg)
    return cfg


@pytest.fixture
def run_cfg(finished, tmp_path) -> RunConfig:
    """A private copy of the finished run."""
    shutil.copytree(finished.run_dir, tmp_path / "run")
    cfg = copy.deepcopy(finished)
    cfg.run_dir = str(tmp_path / "run")
    return cfg


def _with(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of cfg with dotted keys changed: _with(cfg, **{"harvest.frac": 0.9})."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def _index_agrees_with_clusters(cfg: RunConfig) -> None:
    """Every index row names a (layer, neuron, cluster) whose central example is the one it stores."""
    sf = SimilarFeatures.load(cfg.run_dir)
    run = RunDir(cfg.run_dir)
    for layer in (0, 1):
        cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
        central = cl[cl.is_central].set_index(["neuron", "cluster"])["rank"]
        ids = sf.ids[sf.ids.layer == layer]
        assert len(ids) == len(central)
        assert all(central[(r.neuron, r.cluster)] == r["rank"] for _, r in ids.iterrows())


# --- the graph itself --------------------------------------------------------------------------------------


def test_graph_is_consistent():
    for name, spec in GRAPH.items():
        assert all(up in GRAPH for up in spec.upstream)
        assert name not in ancestors(name)
        for d in descendants(name):
            assert name in ancestors(d)
        for out in spec.outputs:
            assert owner_of(out) == name
    assert descendants("examples") == ["cluster", "index", "occurrence", "coactivation", "importance"]
    assert owner_of("h/layer=3/part-00001.parquet") == "examples"
    assert owner_of("_work/cluster/metrics/layer=0/part-00000.parquet") == "cluster"


# --- silent wrong results, each refused or repaired now ----------------------------------------------------


def test_1_forced_upstream_stage_makes_every_downstream_stage_stale(run_cfg, capsys):
    new = _with(run_cfg, **{"harvest.frac": 0.9})
    run_harvest(new, force=["examples"])
    m = RunDir(run_cfg.run_dir).manifest()
    assert [state_of(m, s)[0] for s in ("examples", "cluster", "index")] == ["done", "stale", "stale"]
    assert "stage 'examples' was redone" in m["stages"]["cluster"]["reason"]
    # Nothing built on the old examples is served: no labels from the old clustering, no old index.
    neuron = RunData(run_cfg.run_dir).neuron(1, int(RunData(run_cfg.run_dir).neurons(1)[0]))
    assert neuron.examples and all(e.cluster is None for e in neuron.examples) and neuron.linkage is None
    with pytest.raises(DataError, match=r"stage 'index' of .* is stale \(stage 'examples' was redone.*\); run "
                                        r"`ne cluster --config CONFIG` then `ne index --config CONFIG`"):
        SimilarFeatures.load(run_cfg.run_dir)
    assert main(["similar", run_cfg.run_dir, "--layer", "1", "--neuron", "0"]) == 2
    assert "is stale" in capsys.readouterr().err
    warnings = " ".join(RunData(run_cfg.run_dir).status().warnings)
    assert "clusters is stale" in warnings and "ne cluster" in warnings
    # Redoing the stale stages gives a consistent run again.
    run_cluster(new, in_process=True)
    run_index(new)
    _index_agrees_with_clusters(new)


def test_2_reclustering_makes_the_index_stale(run_cfg):
    new = _with(run_cfg, **{"cluster.threshold": 0.3})
    run_cluster(new, force=["cluster"], in_process=True)
    with pytest.raises(DataError, match=r"stage 'index' .* is stale \(stage 'cluster' was redone"):
        SimilarFeatures.load(run_cfg.run_dir)
    assert not (Path(run_cfg.run_dir) / "index").exists()
    run_index(new)
    _index_agrees_with_clusters(new)


@pytest.mark.parametrize("key, value, stage", [
    ("harvest.k", 4, "examples"), ("data.n_ctx", 16, "contexts"), ("model.dtype", "bfloat16", "maxima"),
])
@pytest.mark.parametrize("job", ["cluster", "index"])
def test_3_changed_upstream_settings_are_errors(run_cfg, key, value, stage, job):
    old = repr(getattr(getattr(run_cfg, key.split(".")[0]), key.split(".")[1]))
    changed = _with(run_cfg, **{key: value})
    with pytest.raises(ConfigError, match=rf"{key} is {value!r} in this config but was {old} when stage "
                                          rf"'{stage}' .*ran\. Redo '{stage}' and everything after it .* with "
                                          rf"`ne harvest --config CONFIG --force {stage}`, or use a new run_dir"):
        run_cluster(changed, in_process=True) if job == "cluster" else run_index(changed)


def test_4_unknown_force_names_are_errors(run_cfg, capsys):
    with pytest.raises(ConfigError, match="--force 'clusters' names no stage; this command's stages are: cluster"):
        run_cluster(run_cfg, force=["clusters"], in_process=True)
    config = Path(run_cfg.run_dir).parent / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_cfg)))
    assert main(["harvest", "--config", str(config), "--force", "cluster"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage 'cluster' is run by `ne cluster`; this command runs contexts" in err
    assert main(["run", "--config", str(config), "--force", "indx"]) == 2
    assert "--force 'indx' names no stage" in capsys.readouterr().err


def test_6_a_missing_output_is_an_error_not_done(run_cfg):
    os.remove(Path(run_cfg.run_dir) / "index" / "faiss.index")
    with pytest.raises(DataError, match=r"index/faiss.index is missing; redo stage 'index': `ne index --config "
                                        r"CONFIG --force index`"):
        run_index(run_cfg)
    run_index(run_cfg, force=["index"])
    _index_agrees_with_clusters(run_cfg)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_7_a_flipped_bit_in_h_is_never_silent(run_cfg):
    """A bit flipped anywhere in an h part: the next stage that reads it stops and names the file; it never
    produces metrics that differ from the intact run's."""
    part = Path(run_cfg.run_dir) / "h" / "layer=1" / "part-00000.parquet"
    intact = part.read_bytes()
    metrics = pd.read_parquet(Path(run_cfg.run_dir) / "metrics.parquet")
    caught = 0
    offsets = np.linspace(4, len(intact) - 5, 24).astype(int)
    for offset in offsets:
        _flip(part, int(offset))
        try:
            run_cluster(run_cfg, force=["cluster"], in_process=True)
        except DataError as exc:
            assert "h/layer=1/part-00000.parquet" in str(exc) and "redo stage 'examples'" in str(exc)
            caught += 1
        else:
            pd.testing.assert_frame_equal(pd.read_parquet(Path(run_cfg.run_dir) / "metrics.parquet"), metrics)
        part.write_bytes(intact)
    assert caught == len(offsets)


def test_kill_a_forced_rerun_halfway_and_nothing_downstream_is_served(run_cfg, tmp_path):
    cfg = _with(run_cfg, **{"harvest.batch_size": 1, "harvest.frac": 0.6})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [sys.executable, "-m", "ne.cli", "harvest", "--config", str(config), "--force", "maxima"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = RunDir(cfg.run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not run.ls("_work", "examples", suffix=".done"):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run.ls("_work", "examples", suffix=".done"), "the kill must land in pass 2"
    m = run.manifest()
    assert [state_of(m, s)[0] for s in ("maxima", "examples", "cluster", "index")] == \
        ["done", "running", "stale", "stale"]
    assert RunData(cfg.run_dir).status().errors  # the examples are half-written: the viewer shows none
    with pytest.raises(DataError, match="is stale"):
        SimilarFeatures.load(cfg.run_dir)
    # The rerun resumes (the lock of the killed process is taken over) and the run is whole again.
    run_harvest(cfg)
    run_cluster(cfg, in_process=True)
    run_index(cfg)
    _index_agrees_with_clusters(cfg)


# --- integrity: damaged inputs of every stage ------------------------------------------------------------


@pytest.mark.parametrize("rel, stage, job", [
    ("contexts/part-00001.parquet", "contexts", "harvest"),
    ("maxima.parquet", "maxima", "harvest"),
    ("examples/layer=0/part-00000.parquet", "examples", "cluster"),
    ("h/layer=0/part-00000.parquet", "examples", "cluster"),
    ("weights/layer=1.safetensors", "weights", "cluster"),
    ("clusters/layer=1/part-00000.parquet", "cluster", "index"),
    ("metrics.parquet", "cluster", "index"),
])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_or_missing_inputs_name_the_file_and_the_stage(run_cfg, rel, stage, job, damage):
    path = Path(run_cfg.run_dir) / rel
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-100])
    run = {"harvest": run_harvest, "cluster": lambda c: run_cluster(c, in_process=True), "index": run_index}[job]
    what = "is missing" if damage == "missing" else "truncated"
    with pytest.raises(DataError, match=rf"{rel}.*{what}.*redo stage '{stage}'"):
        run(run_cfg)


def test_missing_h_part_during_a_forced_recluster(run_cfg):
    (Path(run_cfg.run_dir) / "h" / "layer=0" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match=r"h/layer=0/part-00000.parquet is missing; redo stage 'examples'"):
        run_cluster(run_cfg, force=["cluster"], in_process=True)


@pytest.mark.parametrize("manifest, message", [
    ("[1, 2]", "it holds a list, not an object"),
    ('{"stages": []}', "'stages' is a list"),
    ('{"stages": {"cluster": {"status": 5}}}', "stages.cluster.status is 5"),
    ('{"stages": {"cluster": {"status": "done", "files": {"a": {}}}}}', "stages.cluster.files\\['a'\\] has no size"),
])
def test_a_manifest_of_the_wrong_shape(run_cfg, manifest, message, capsys):
    (Path(run_cfg.run_dir) / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=rf"manifest.json is not a manifest of ne \({message}"):
        run_cluster(run_cfg, in_process=True)
    assert main(["status", run_cfg.run_dir]) == 2
    assert "is not a manifest of ne" in capsys.readouterr().err


def test_run_dir_that_is_a_file(tmp_path, tiny_model_cfg):
    (tmp_path / "f").write_text("x")
    cfg = _cfg(tmp_path / "f", tiny_model_cfg)
    with pytest.raises(ConfigError, match=r"run_dir '.*/f' is a file; give the path of a directory"):
        run_harvest(cfg)
    with pytest.raises(ConfigError, match="is a file"):
        SimilarFeatures.load(str(tmp_path / "f"))


# --- concurrency -----------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(run_cfg, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ne.store import RunDir\n"
         "with RunDir(sys.argv[1]).lock('ne cluster'):\n    print('held', flush=True); time.sleep(60)",
         run_cfg.run_dir], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=rf"run .* is in use by PID {holder.pid} on .* \(ne cluster, since"):
            run_index(run_cfg, force=["index"])
        config = Path(run_cfg.run_dir).parent / "cfg.yaml"
        config.write_text(yaml.safe_dump(to_dict(run_cfg)))
        assert main(["cluster", "--config", str(config)]) == 2  # no summary printed, exit code 2
        captured = capsys.readouterr()
        assert captured.out == "" and f"in use by PID {holder.pid}" in captured.err
    finally:
        holder.kill()
        holder.wait()
    run_index(run_cfg, force=["index"])  # the dead holder's lock is taken over


# --- ne status -------------------------------------------------------------------------------------------


def test_status_shows_each_stage_with_its_settings(run_cfg, capsys):
    run_cluster(_with(run_cfg, **{"cluster.threshold": 0.4}), force=["cluster"], in_process=True)
    assert main(["status", run_cfg.run_dir]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if not line.startswith("      ")}
    assert lines == {"contexts": "done", "sae": "done", "weights": "done", "maxima": "done", "examples": "done",
                     "cluster": "done", "index": "stale", "importance": "missing"}
    assert 'cluster.threshold=0.4' in out and 'harvest.k=8' in out and "files intact" in out
    os.remove(Path(run_cfg.run_dir) / "maxima.parquet")
    assert main(["status", run_cfg.run_dir]) == 0
    assert "maxima              damaged" in capsys.readouterr().out
    assert main(["status", str(Path(run_cfg.run_dir) / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
