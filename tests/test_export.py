"""`ne export`: delphi's latent cache and Neuronpedia's import layout, read back and checked field by field against
`tests/fixtures/export_formats.json` (written from the two projects' sources, which it cites)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from ne import schema
from ne.cli import main
from ne.describe import PartWriter
from ne.export import RunView
from ne.models import load_token_decoder
from ne.occurrence import read_occurrences
from ne.rundir.reader import RunData
from ne.rundir.stages import Stage
from ne.rundir.store import RunDir
from tests.conftest import REPO
from tests.jobs.test_occurrence import OCC

FORMATS = json.loads((REPO / "tests" / "fixtures" / "export_formats.json").read_text())


def _clustered_examples(run: RunDir, layer: int) -> pd.DataFrame:
    """Examples of clusters of at least cluster.min_cluster_size, with their cluster (pandas, no export code)."""
    ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
    cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
    both = ex.merge(cl, on=["layer", "neuron", "rank"])
    return both[~both.outlier]


def _per_unit(run: RunDir) -> int:
    return max(
        int(run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer)).to_pandas().cluster.max()) + 1
        for layer in (0, 1)
    )


def _json_type_ok(value, spec) -> bool:
    if isinstance(spec, list):
        return any(_json_type_ok(value, s) for s in spec)
    if isinstance(spec, dict):
        return isinstance(value, list) and all(_json_type_ok(v, spec["array"]) for v in value)
    return {
        "string": lambda v: isinstance(v, str),
        "null": lambda v: v is None,
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }[spec](value)


def _check_fields(row: dict, table: str) -> None:
    spec = FORMATS["neuronpedia"]["tables"][table]
    assert set(row) == set(spec), (table, set(row) ^ set(spec))
    for name, kind in spec.items():
        assert _json_type_ok(row[name], kind), (table, name, row[name])


def _delphi_read(folder: Path) -> tuple[list[tuple[int, int]], pd.DataFrame, np.ndarray]:
    """A module of a delphi cache read the way delphi's TensorBuffer.load does: the file's first latent from its name,
    added back to locations[:, 2]. Returns the (start, end) ranges, the locations and the tokens."""
    spec = FORMATS["delphi"]["tensors"]
    ranges, rows, tokens = [], [], None
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0])):
        assert re.fullmatch(r"\d+_\d+", path.stem)
        start, end = map(int, path.stem.split("_"))
        ranges.append((start, end))
        data = load_file(str(path))
        assert set(data) == set(spec)
        for name, s in spec.items():
            assert str(data[name].dtype) in s["dtypes"] and data[name].ndim == s["rank"], name
        assert data["locations"].shape == (len(data["activations"]), spec["locations"]["columns"])
        loc = data["locations"].astype(np.int64)
        assert ((loc[:, 2] >= 0) & (loc[:, 2] <= end - start)).all()
        rows.append(
            pd.DataFrame(
                {
                    "seq": loc[:, 0],
                    "pos": loc[:, 1],
                    "latent": loc[:, 2] + start,
                    "act": data["activations"].astype(np.float32),
                }
            )
        )
        assert tokens is None or np.array_equal(tokens, data["tokens"])  # every file of a module holds all tokens
        tokens = data["tokens"]
    return ranges, pd.concat(rows, ignore_index=True), tokens


def test_delphi_export_reads_back(lm_run, tmp_path, capsys):
    out = tmp_path / "delphi"
    assert main(["export", lm_run, "--format", "delphi", str(out), "--splits", "3"]) == 0
    assert "from the run's examples" in capsys.readouterr().out
    run = RunDir(lm_run)
    c, d_mlp = _per_unit(run), run.manifest()["model"]["d_mlp"]
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas().sort_values("ctx_id")
    pad = run.manifest()["model"]["pad_token_id"]
    for layer in (0, 1):
        folder = out / "latents" / f"layers.{layer}.mlp"
        ranges, loc, tokens = _delphi_read(folder)
        assert ranges[0][0] == 0 and ranges[-1][1] == d_mlp * c - 1 and len(ranges) == 3
        assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))  # consecutive, end inclusive
        assert tokens.shape == (len(contexts), 48)
        for row, toks in zip(tokens, contexts.tokens):
            assert row[: len(toks)].tolist() == list(toks) and (row[len(toks) :] == pad).all()
        ex = _clustered_examples(run, layer)
        row_of = {int(x): i for i, x in enumerate(contexts.ctx_id)}
        expected = sorted(
            zip(
                [row_of[x] for x in ex.ctx_id],
                ex.pos,
                ex.neuron * c + ex.cluster,
                ex.act.astype(np.float16).astype(np.float32),
            )
        )
        assert sorted(zip(loc.seq, loc.pos, loc.latent, loc.act)) == expected
        config = json.loads((folder / "config.json").read_text())
        for name, kind in FORMATS["delphi"]["config_json"].items():
            assert _json_type_ok(config[name], kind), name
        assert config["cache_ctx_len"] == 48 and config["n_splits"] == 3 and config["ne_clusters_per_unit"] == c
        assert config["n_tokens"] == tokens.size and config["model_name"] == "gpt2"


@pytest.fixture(scope="module")
def occurrence_run(lm_run, tmp_path_factory) -> str:
    """A copy of `lm_run` with finished occurrence and co-activation stages (test_occurrence's settings), in process."""
    import jobs.occurrence as occurrence_job

    root = tmp_path_factory.mktemp("export_occ") / "run"
    shutil.copytree(lm_run, root)
    cfg = RunData(str(root)).config()
    occurrence_job.run_occurrence(
        dataclasses.replace(cfg, occurrence=OCC, harvest=dataclasses.replace(cfg.harvest, num_workers=0))
    )
    return str(root)


def test_delphi_export_from_held_out_occurrences(occurrence_run, tmp_path, capsys):
    """A run with a finished occurrence stage: the cache's tokens are the held-out contexts (heldout/, ctx_ids after
    the harvest's) its firings name, and its locations exactly the occurrence rows of kept clusters, each pointing
    at its held-out token (brute force over the tables)."""
    out = tmp_path / "delphi"
    assert main(["export", occurrence_run, "--format", "delphi", str(out), "--splits", "4"]) == 0
    assert "from the run's occurrences" in capsys.readouterr().out
    run = RunDir(occurrence_run)
    c, pad = _per_unit(run), run.manifest()["model"]["pad_token_id"]
    min_size = RunData(occurrence_run).config().cluster.min_cluster_size
    heldout = {
        int(i): list(t) for i, t in run.read_parquet(schema.HELDOUT_DIR).to_pandas()[["ctx_id", "tokens"]].values
    }
    occ = {layer: read_occurrences(occurrence_run, layer).to_pandas() for layer in (0, 1)}
    used = sorted({int(x) for t in occ.values() for x in t.ctx_id})
    assert min(used) >= run.manifest()["stages"]["contexts"]["info"]["n_contexts"]  # never a harvest context
    left_out = 0
    for layer in (0, 1):
        _, loc, tokens = _delphi_read(out / "latents" / f"layers.{layer}.mlp")
        assert [row[: len(heldout[x])].tolist() for row, x in zip(tokens, used)] == [heldout[x] for x in used]
        assert all((row[len(heldout[x]) :] == pad).all() for row, x in zip(tokens, used))
        cents = run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer)).to_pandas()
        kept = {(int(n), int(k)) for n, k, size in zip(cents.neuron, cents.cluster, cents["size"]) if size >= min_size}
        expected = []
        for r in occ[layer].itertuples():
            if (r.unit, r.cluster) in kept:
                expected.append((used.index(r.ctx_id), r.pos, r.unit * c + r.cluster, np.float32(np.float16(r.act))))
        assert len(expected) > 50
        left_out += len(occ[layer]) - len(expected)
        assert sorted(zip(loc.seq, loc.pos, loc.latent, loc.act)) == sorted(expected)
        for seq, pos in zip(loc.seq, loc.pos):  # every location is a held-out token of its context
            assert pos < len(heldout[used[seq]]) and tokens[seq][pos] == heldout[used[seq]][pos]
    assert left_out > 0  # firings of units without clusters (cluster -1) or of outlier clusters: no latent


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_neuronpedia_export_reads_back(lm_run, tmp_path):
    shutil.copytree(lm_run, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    stage = Stage(run, "describe", RunView(run, run.manifest()).cfg)  # one LLM description, as `ne describe` stores it
    stage.begin()
    writer = PartWriter(run, 10)
    writer.add(
        {
            "layer": 1,
            "neuron": 3,
            "cluster": 0,
            "description": "a test description",
            "model": "m",
            "prompt_sha": "x",
            "prompt_tokens": 1,
            "completion_tokens": 1,
        }
    )
    writer.flush()
    stage.done()
    out = tmp_path / "np"
    assert main(["export", str(tmp_path / "run"), "--format", "neuronpedia", str(out), "--model-id", "tiny-gpt2"]) == 0
    c = _per_unit(run)
    decode = load_token_decoder(RunView(run, run.manifest()).cfg.model)
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas().set_index("ctx_id").tokens
    spec = FORMATS["neuronpedia"]
    for layer in (0, 1):
        source = out / "tiny-gpt2" / f"{layer}-ne-clusters"
        for name in ("model", "sourceset", "source"):
            (row,) = [json.loads(line) for line in (source / f"{name}.jsonl").read_text().splitlines()]
            _check_fields(row, name)
        rows = {}
        for kind in ("features", "activations", "explanations"):
            files = sorted((source / kind).iterdir())
            assert files and all(re.fullmatch(spec["batch_file"], f.name) for f in files)
            rows[kind] = [r for f in files for r in _jsonl(f)]
            for r in rows[kind]:
                _check_fields(r, kind)
                assert r["modelId"] == "tiny-gpt2" and r["layer"] == f"{layer}-ne-clusters"
        ex = _clustered_examples(run, layer)
        clusters = ex.groupby(["neuron", "cluster"]).act.agg(["size", "max"])
        assert sorted(int(r["index"]) for r in rows["features"]) == sorted(n * c + k for n, k in clusters.index)
        assert len(rows["activations"]) == len(ex) and len({r["id"] for r in rows["activations"]}) == len(ex)
        by_key = {(int(r["index"]), int(r["dataIndex"]), r["qualifyingTokenIndex"]): r for r in rows["activations"]}
        for e in ex.itertuples():
            r = by_key[(e.neuron * c + e.cluster, e.ctx_id, e.pos - e.window_start)]
            window = list(contexts[e.ctx_id])[e.window_start : e.window_start + len(e.window)]
            assert r["tokens"] == decode(window) and r["maxValue"] == pytest.approx(e.act)
            assert r["values"][r["maxValueTokenIndex"]] == r["maxValue"] and sum(v != 0 for v in r["values"]) == 1
        labels = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer)).to_pandas()
        labels = labels[~labels.outlier]
        offline = {int(r["index"]): r["description"] for r in rows["explanations"] if r["notes"] == "ne offline label"}
        assert offline == {n * c + k: text for n, k, text in zip(labels.neuron, labels.cluster, labels.label)}
        llm = [r for r in rows["explanations"] if r["notes"] != "ne offline label"]
        assert [(r["index"], r["description"], r["notes"]) for r in llm] == (
            [(str(3 * c), "a test description", "ne describe, m")] if layer == 1 else []
        )


def test_bad_export_requests_are_one_line_errors(lm_run, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", lm_run, "--format", "delphi", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; give a new or empty directory, or --force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", lm_run, "--format", "parquet", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--format 'parquet' is not an export format; choose one of delphi, neuronpedia" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", lm_run, "--format", "delphi", str(out), "--force", "--splits", "1"]) == 0
    assert not (out / "keep.txt").exists() and (out / "latents" / "layers.0.mlp" / "config.json").exists()
    assert not list(tmp_path.glob("full.tmp-*"))  # written aside, then moved into place
    assert main(["export", lm_run, "--format", "neuronpedia", str(tmp_path / "y"), "--model-id", "Bad Id!"]) == 2
    assert "Neuronpedia model ids hold only" in capsys.readouterr().err and not (tmp_path / "y").exists()
