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
from ne.rundir.graph import GRAPH, ancestors, descendants, owner_of
from ne.rundir.reader import RunData
from ne.rundir.stages import state_of
from ne.rundir.store import RunDir
from tests.conftest import REPO


def _cfg(run_dir, model_cfg) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        model=model_cfg,
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
    assert descendants("examples") == [
        "cluster",
        "label",
        "index",
        "occurrence",
        "coactivation",
        "scores",
        "embedding_scores",
        "importance",
        "describe",
        "detection",
        "sae_eval",
    ]
    assert owner_of("report/report.md") == "label"
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
    with pytest.raises(
        DataError,
        match=r"stage 'index' of .* is stale \(stage 'examples' was redone.*\); run "
        r"`ne cluster --config CONFIG` then `ne index --config CONFIG`",
    ):
        SimilarFeatures.load(run_cfg.run_dir)
    assert main(["similar", run_cfg.run_dir, "--layer", "1", "--neuron", "0"]) == 2
    assert "is stale" in capsys.readouterr().err
    warnings = " ".join(RunData(run_cfg.run_dir).status().warnings)
    assert "stage 'cluster' of" in warnings and "is stale" in warnings and "ne cluster --config" in warnings
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


@pytest.mark.parametrize(
    "key, value, stage",
    [
        ("harvest.k", 4, "examples"),
        ("data.n_ctx", 16, "contexts"),
        ("model.dtype", "bfloat16", "maxima"),
    ],
)
@pytest.mark.parametrize("job", ["cluster", "index"])
def test_3_changed_upstream_settings_are_errors(run_cfg, key, value, stage, job):
    old = repr(getattr(getattr(run_cfg, key.split(".")[0]), key.split(".")[1]))
    changed = _with(run_cfg, **{key: value})
    with pytest.raises(
        ConfigError,
        match=rf"{key} is {value!r} in this config but was {old} when stage "
        rf"'{stage}' .*ran\. Redo '{stage}' and everything after it .* with "
        rf"`ne harvest --config CONFIG --force {stage}`, or use a new run_dir",
    ):
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
    with pytest.raises(
        DataError,
        match=r"index/faiss.index is missing; redo stage 'index': `ne index --config "
        r"CONFIG --force index`",
    ):
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
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunDir(cfg.run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not run.ls("_work", "examples", suffix=".done"):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run.ls("_work", "examples", suffix=".done"), "the kill must land in pass 2"
    m = run.manifest()
    assert [state_of(m, s)[0] for s in ("maxima", "examples", "cluster", "index")] == [
        "done",
        "running",
        "stale",
        "stale",
    ]
    assert RunData(cfg.run_dir).status().errors  # the examples are half-written: the viewer shows none
    with pytest.raises(DataError, match="is stale"):
        SimilarFeatures.load(cfg.run_dir)
    # The rerun resumes (the lock of the killed process is taken over) and the run is whole again.
    run_harvest(cfg)
    run_cluster(cfg, in_process=True)
    run_index(cfg)
    _index_agrees_with_clusters(cfg)


# --- integrity: damaged inputs of every stage ------------------------------------------------------------


@pytest.mark.parametrize(
    "rel, stage, job",
    [
        ("contexts/part-00001.parquet", "contexts", "harvest"),
        ("maxima.parquet", "maxima", "harvest"),
        ("examples/layer=0/part-00000.parquet", "examples", "cluster"),
        ("h/layer=0/part-00000.parquet", "examples", "cluster"),
        ("weights/layer=1.safetensors", "weights", "cluster"),
        ("clusters/layer=1/part-00000.parquet", "cluster", "index"),
        ("metrics.parquet", "cluster", "index"),
    ],
)
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


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("[1, 2]", "it holds a list, not an object"),
        ('{"stages": []}', "'stages' is a list"),
        ('{"stages": {"cluster": {"status": 5}}}', "stages.cluster.status is 5"),
        (
            '{"stages": {"cluster": {"status": "done", "files": {"a": {}}}}}',
            "stages.cluster.files\\['a'\\] has no size",
        ),
        ('{"stages": {"cluster": {"status": "done", "info": {}}}}', "stages.cluster has no fingerprint"),  # item 22
        ('{"stages": {"cluster": {"status": "done", "fingerprint": "0f"}}}', "stages.cluster is done but has no info"),
    ],
)
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
        [
            sys.executable,
            "-c",
            "import sys, time; from ne.rundir.store import RunDir\n"
            "with RunDir(sys.argv[1]).lock('ne cluster'):\n    print('held', flush=True); time.sleep(60)",
            run_cfg.run_dir,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
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
    assert lines == {
        "contexts": "done",
        "sae": "done",
        "weights": "done",
        "maxima": "done",
        "examples": "done",
        "cluster": "done",
        "label": "missing",
        "index": "stale",
        "occurrence": "missing",
        "coactivation": "missing",
        "scores": "missing",
        "embedding_scores": "missing",
        "importance": "missing",
        "describe": "missing",
        "detection": "missing",
    }
    assert "cluster.threshold=0.4" in out and "harvest.k=8" in out and "files intact" in out
    os.remove(Path(run_cfg.run_dir) / "maxima.parquet")
    assert main(["status", run_cfg.run_dir]) == 0
    assert "maxima              damaged" in capsys.readouterr().out
    assert main(["status", str(Path(run_cfg.run_dir) / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- never lose a user's data, never answer from changed or damaged inputs ---------------------------------


def _config_file(cfg: RunConfig) -> str:
    path = Path(cfg.run_dir).parent / f"{Path(cfg.run_dir).name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return str(path)


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_in_it_removed(tmp_path, tiny_model_cfg, capsys):
    """Item 1: `run_dir` at a folder of the user's whose subfolders share names with stage outputs."""
    user = tmp_path / "u"
    for sub in ("index", "report", "notes"):
        (user / sub).mkdir(parents=True)
        (user / sub / "keep.txt").write_text(sub)
    cfg = _cfg(user, tiny_model_cfg)
    with pytest.raises(
        ConfigError,
        match=r"run_dir '.*/u' is not empty and holds no manifest.json, so it is not a "
        r"run of ne; pick an empty or new folder for the run",
    ):
        run_harvest(cfg)
    assert main(["run", "--config", _config_file(cfg)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.relative_to(user).as_posix() for p in user.rglob("*") if p.is_file()) == [
        "index/keep.txt",
        "notes/keep.txt",
        "report/keep.txt",
    ]


def test_a_stage_removes_only_what_the_manifest_records_as_its_own(run_cfg):
    """Item 1, inside a run: a file of the user's where a stage writes is an error before anything changes, and
    redoing a stage upstream removes only the files the stale stage recorded."""
    run = RunDir(run_cfg.run_dir)
    mine = Path(run_cfg.run_dir) / "dendrograms" / "mine.md"
    mine.write_text("my notes")
    before = run.manifest()
    with pytest.raises(
        DataError,
        match=r"dendrograms/mine.md was not written by this run .* stage 'cluster' writes "
        r"dendrograms; move it out of",
    ):
        run_cluster(run_cfg, force=["cluster"], in_process=True)
    assert run.manifest()["stages"] == before["stages"] and mine.read_text() == "my notes"
    assert (Path(run_cfg.run_dir) / "metrics.parquet").exists()
    mine.unlink()
    notes = Path(run_cfg.run_dir) / "index" / "notes.txt"
    notes.write_text("mine")
    from ne.rundir.stages import Stage

    Stage(run, "cluster", run_cfg, force=["cluster"]).begin()  # what `ne cluster --force cluster` does first
    assert notes.read_text() == "mine" and not (Path(run_cfg.run_dir) / "index" / "faiss.index").exists()
    assert not (Path(run_cfg.run_dir) / "clusters").exists()  # the stage's own outputs: recorded, so removed


def test_checks_run_before_a_forced_stage_removes_anything(run_cfg):
    """Item 3: settings that fail only once the work starts are checked before the finished result is removed."""
    import torch

    run = RunDir(run_cfg.run_dir)
    before = run.manifest()["stages"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cluster.use_gpu is true but this machine has no CUDA GPU"):
            run_cluster(_with(run_cfg, **{"cluster.use_gpu": True}), force=["cluster"], in_process=True)
    from jobs.importance import run_importance

    with pytest.raises(
        ConfigError,
        match=r"importance.mask_token is 99999999 but the tokenizer of tiny-gpt2 has "
        r"token ids 0..50256",
    ):
        run_importance(_with(run_cfg, **{"importance.mask_token": 99999999}), force=["importance"])
    assert run.manifest()["stages"] == before
    assert (Path(run_cfg.run_dir) / "metrics.parquet").exists() and run.ls("clusters", "layer=0")


def test_a_changed_corpus_file_is_noticed(tmp_path, tiny_model_cfg):
    """Item 4: the contexts stage records its corpus files (size, time, hash); a rerun after one changed is an
    error naming it, one merely touched or copied back is not, and `ne status` says `changed`."""
    from pydoc_data.topics import topics

    from ne.models import load_model
    from ne.rundir.contexts import write_contexts
    from ne.rundir.stages import describe_status

    (tmp_path / "corpus").mkdir()
    a = tmp_path / "corpus" / "a.txt"
    a.write_text(topics["for"])
    cfg = _cfg(tmp_path / "run", tiny_model_cfg)
    cfg.data = DataConfig(
        source="files", paths=[str(tmp_path / "corpus" / "*.txt")], n_ctx=32, max_contexts=6, contexts_per_part=3
    )
    run, model = RunDir(cfg.run_dir), load_model(tiny_model_cfg)
    n = write_contexts(run, cfg, model)
    a.write_text(topics["for"].replace("for", "FOR"))  # the same size: only the hash tells
    with pytest.raises(
        DataError,
        match=rf"{a} \(its content differs from when it was read\): an input of stage "
        r"'contexts' of .* changed since it ran. Redo 'contexts' and everything after "
        r"it .* with `ne harvest --config CONFIG --force contexts`, or restore",
    ):
        write_contexts(run, cfg, model)
    assert "contexts            changed" in describe_status(run)
    a.write_text(topics["for"])  # the same bytes again, at a new time: not a change
    os.utime(a, (0, 12345))
    assert write_contexts(run, cfg, model) == n
    (tmp_path / "corpus" / "b.txt").write_text("more")
    with pytest.raises(DataError, match=r"b.txt \(the stage did not read it\)"):
        write_contexts(run, cfg, model)


def test_a_damaged_parquet_page_is_damage_for_status_and_a_rerun(run_cfg, capsys):
    """Item 24: a flipped byte inside a data page (not the footer) of a finished part."""
    rel = "examples/layer=0/part-00000.parquet"
    part = Path(run_cfg.run_dir) / rel
    _flip(part, len(part.read_bytes()) // 4)
    assert main(["status", run_cfg.run_dir]) == 0
    out = capsys.readouterr().out
    assert "examples            damaged" in out and f"{rel} is corrupt" in out
    with pytest.raises(DataError, match=rf"{rel} is corrupt .*redo stage 'examples'"):
        run_harvest(run_cfg)  # not skipped as finished


def test_range_reads_are_verified_by_chunk(run_cfg, monkeypatch):
    """Item 8: a weights file read by byte range; a flipped exponent bit in neuron 200's row is an error for the
    batches that read it, and the other batches read their rows unchanged."""
    import json

    import torch

    from ne.rundir import store
    from ne.rundir.stages import Stage
    from ne.rundir.weights import read_layer_weights, weights_file

    monkeypatch.setattr(store, "CHUNK", 4096, raising=False)  # many chunks in a small file
    run = RunDir(run_cfg.run_dir)
    w_in = np.random.default_rng(0).normal(size=(64, 1024)).astype(np.float32)
    stage = Stage(run, "weights", run_cfg, force=["weights"])  # the weights stage, redone with a wider layer
    stage.begin()
    for layer in (0, 1):
        run.write_bytes(
            schema.weights_path(layer), weights_file({"W_in": torch.from_numpy(w_in), "b_in": torch.zeros(1024)})
        )
    stage.done(layers=[0, 1])
    path = Path(run.path(schema.weights_path(0)))
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header + json.loads(data[8 : 8 + header])["W_in_T"]["data_offsets"][0]
    data[start + 200 * 64 * 4 + 3] ^= 0x40  # an exponent bit of W_in[0, 200] (float32, little-endian)
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_layer_weights(run, 0, 0, 128).gate, w_in[:, :128].T)
    with pytest.raises(
        DataError,
        match=r"weights/layer=0.safetensors is corrupt \(its content differs from what was "
        r"written in bytes [\d,]+\.\.[\d,]+\); redo stage 'weights'",
    ):
        read_layer_weights(run, 0, 192, 256)
    with pytest.raises(DataError, match="weights/layer=0.safetensors is corrupt"):
        read_layer_weights(run, 0)


def test_a_large_non_parquet_file_is_hashed_whole(run_cfg, capsys):
    """Item 9: a byte flipped in the middle of a weights file of 66 MiB (over the 64 MiB up to which files were
    once hashed whole; larger ones only at their ends): `ne status` and the reads notice it."""
    import json

    import torch

    from ne.rundir.stages import Stage
    from ne.rundir.weights import read_layer_weights, weights_file

    run = RunDir(run_cfg.run_dir)
    d_mlp = 66 * 2**20 // (64 * 4)
    w_in = torch.from_numpy(np.random.default_rng(0).normal(size=(64, d_mlp)).astype(np.float32))
    stage = Stage(run, "weights", run_cfg, force=["weights"])  # the weights stage, redone with a wide layer 0
    stage.begin()
    run.write_bytes(schema.weights_path(0), weights_file({"W_in": w_in, "b_in": torch.zeros(d_mlp)}))
    run.write_bytes(schema.weights_path(1), weights_file({"W_in": w_in[:, :256], "b_in": torch.zeros(256)}))
    stage.done(layers=[0, 1])
    del w_in
    path = Path(run.path(schema.weights_path(0)))
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        start = 8 + header + json.loads(f.read(header))["W_in_T"]["data_offsets"][0]
    middle = path.stat().st_size // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 0x40]))
    assert main(["status", run_cfg.run_dir]) == 0
    out = capsys.readouterr().out
    assert "weights             damaged" in out and "weights/layer=0.safetensors is corrupt" in out
    neuron = (middle - start) // (64 * 4)
    with pytest.raises(DataError, match=r"weights/layer=0.safetensors is corrupt .*redo stage 'weights'"):
        read_layer_weights(run, 0, neuron - 10, neuron + 10)


def test_a_deleted_contexts_part_is_an_error_for_every_reader(run_cfg, capsys):
    """Item 11: never empty example texts or a literal None."""
    (Path(run_cfg.run_dir) / "contexts" / "part-00002.parquet").unlink()
    want = r"contexts/part-00002.parquet is missing; redo stage 'contexts': `ne harvest --config CONFIG --force"
    sf = SimilarFeatures.load(run_cfg.run_dir)
    row = sf.ids.iloc[0]
    assert main(["similar", run_cfg.run_dir, "--layer", str(row.layer), "--neuron", str(row.neuron)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contexts/part-00002.parquet is missing; redo stage 'contexts'" in err
    with pytest.raises(DataError, match=want):
        RunData(run_cfg.run_dir).neuron(0, int(RunData(run_cfg.run_dir).neurons(0)[0]))
    assert main(["explain", run_cfg.run_dir, "--text", "The for statement is used to iterate over a sequence"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contexts/part-00002.parquet is missing" in err


def test_a_manifest_without_config_is_an_error(run_cfg, capsys):
    """Item 15: never the default settings in its place."""
    from ne.explain import Explainer

    run = RunDir(run_cfg.run_dir)
    m = run.manifest()
    del m["config"]
    run.write_manifest(m)
    with pytest.raises(
        DataError,
        match=r"manifest.json has no config, so the settings the run was made with are "
        r"unknown",
    ):
        RunData(run_cfg.run_dir).config()
    with pytest.raises(DataError, match="has no config"):
        Explainer.load(run_cfg.run_dir)
    assert main(["explain", run_cfg.run_dir, "--text", "x"]) == 2
    assert "has no config" in capsys.readouterr().err


def test_an_explainer_racing_a_redo_of_its_clusters_stops(run_cfg):
    """Item 10: `ne explain` while `ne cluster --force cluster` runs: an error, never units with "no clusters"."""
    from ne.explain import Explainer
    from ne.rundir.stages import Stage

    explainer = Explainer.load(run_cfg.run_dir)
    text = "The for statement is used to iterate over the elements of a sequence"
    assert any(u.cluster is not None for t in explainer.explain(text) for u in t.units)
    Stage(RunDir(run_cfg.run_dir), "cluster", run_cfg, force=["cluster"]).begin()  # the redo has started
    with pytest.raises(
        DataError,
        match=r"stage 'cluster' of .* was redone while this reader used it \(it is now "
        r"running\); read it again once `ne cluster --config CONFIG` has finished",
    ):
        explainer.explain(text)


@pytest.fixture(scope="module")
def reclustered(finished, tmp_path_factory):
    """A copy of the finished run, open in the viewer (the app, and a `RunData`) while its clusters are redone
    with a fixed cut at 0.2 and cluster.min_cluster_size 4 (the harvest recorded the default 2)."""
    from types import SimpleNamespace

    from streamlit.testing.v1 import AppTest

    cfg = copy.deepcopy(finished)
    cfg.run_dir = str(tmp_path_factory.mktemp("reclustered") / "run")
    shutil.copytree(finished.run_dir, cfg.run_dir)
    metrics = pd.read_parquet(Path(cfg.run_dir) / "metrics.parquet")
    spread = metrics[(metrics.layer == 0) & (metrics.n_examples == metrics.n_examples.max())]
    neuron = int(spread.sort_values("mean_dist").neuron.iloc[-1])
    viewer = RunData(cfg.run_dir)
    before = [e.cluster for e in viewer.neuron(0, neuron).examples]
    app = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    app.query_params["layer"], app.query_params["neuron"] = "0", str(neuron)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["app.py", cfg.run_dir])
        app.run()
    tabs = [t.label for t in app.tabs]
    new = _with(cfg, **{"cluster.cut": "fixed", "cluster.threshold": 0.2, "cluster.min_cluster_size": 4})
    run_cluster(new, force=["cluster"], in_process=True)
    return SimpleNamespace(cfg=new, viewer=viewer, app=app, neuron=neuron, before=before, tabs=tabs)


def _clusters_of(run_dir: str, layer: int, neuron: int) -> list[int]:
    table = pd.read_parquet(Path(run_dir) / schema.layer_dir(schema.CLUSTERS_DIR, layer))
    return table[table.neuron == neuron].sort_values("rank").cluster.tolist()


def test_an_open_viewer_shows_the_clusters_of_a_redone_stage(reclustered):
    """Item 7: what the viewer keeps (footers, row groups, neuron pages) is keyed by the stage's version, so a
    reload after re-clustering shows the new clusters, and no neuron is reported "corrupt or truncated"."""
    r = reclustered
    now = _clusters_of(r.cfg.run_dir, 0, r.neuron)
    assert now != r.before, "the re-clustering must change this neuron's clusters"
    assert [e.cluster for e in r.viewer.neuron(0, r.neuron).examples] == now
    for layer in (0, 1):
        for neuron in r.viewer.neurons(layer)[::7]:
            assert [e.cluster for e in r.viewer.neuron(layer, int(neuron)).examples] == _clusters_of(
                r.cfg.run_dir, layer, int(neuron)
            )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["app.py", r.cfg.run_dir])
        r.app.run()
    assert not r.app.exception and not r.app.error
    from ne.viewer.render import cluster_label

    sizes = pd.Series(now).value_counts()
    labels = [t.label for t in r.app.tabs]
    assert labels != r.tabs
    assert labels == [cluster_label(c, int(sizes[c]), bool(sizes[c] < 4)) for c in sorted(sizes.index)]


def test_explain_takes_each_setting_from_the_stage_that_ran_with_it(reclustered):
    """Item 6: after a re-cluster with cluster.min_cluster_size 4, `ne explain` joins only clusters of at least 4
    examples (where a unit has one), as that clustering treats smaller ones as outliers."""
    from ne.explain import Explainer

    explainer = Explainer.load(reclustered.cfg.run_dir)
    assert explainer.min_size == 4 and RunData(reclustered.cfg.run_dir).config().cluster.threshold == 0.2
    sizes = {}
    for layer in (0, 1):
        table = pd.read_parquet(Path(reclustered.cfg.run_dir) / schema.layer_dir(schema.CENTROIDS_DIR, layer))
        sizes.update({(layer, n): g["size"].to_numpy() for n, g in table.groupby("neuron")})
    text = "The for statement is used to iterate over the elements"
    units = [u for t in explainer.explain(text, top=1000) for u in t.units if u.cluster is not None]
    with_small = [u for u in units if (sizes[u.layer, u.neuron] >= 4).any() and (sizes[u.layer, u.neuron] < 4).any()]
    assert len(with_small) >= 5, "units with clusters on both sides of the minimum"
    assert all(u.cluster_size >= 4 for u in units if (sizes[u.layer, u.neuron] >= 4).any())
