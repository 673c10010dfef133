"""The `embedding_scores` stage against a naive loop: window embeddings summed token by token, and each unit's held-out
occurrences compared with its examples one by one (`embedding_deltas`); resuming after an interruption."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import jobs.occurrence as occurrence_job
from ne import schema
from ne.compute.scores import embedding_deltas
from ne.config import RunConfig, ScoresConfig, from_dict
from ne.embedding_scores import Windows
from ne.errors import ConfigError
from ne.occurrence import read_occurrences
from ne.rundir.reader import RunData
from ne.rundir.store import RunDir
from tests.test_export import occurrence_run  # noqa: F401  (the fixture: a run with finished occurrences)


def naive_windows(windows: Windows, table) -> dict[tuple[int, int], np.ndarray]:
    """{(ctx_id, pos): unit window embedding} of every token of `table`'s contexts, one window at a time."""
    before, after = windows.cfg.window_before, windows.cfg.window_after
    out = {}
    for ctx, tokens in zip(table.ctx_id, table.tokens):
        tokens = [int(t) for t in tokens]
        [(sums, counts)] = windows.encoder.states([windows.pieces(tokens)])
        for pos in range(len(tokens)):
            lo, hi = max(0, pos - before), min(len(tokens), pos + after + 1)
            n = counts[lo:hi].sum()
            mean = sums[lo:hi].astype(np.float64).sum(0) / max(n, 1)
            out[(int(ctx), pos)] = mean / np.linalg.norm(mean) if n else mean
    return out


def test_embedding_scores_equal_a_naive_loop(occurrence_run):  # noqa: F811
    run = RunDir(occurrence_run)
    assert run.manifest()["stages"]["embedding_scores"]["status"] == "done"
    windows = Windows(run, RunData(run.url).config())
    train = naive_windows(windows, run.read_parquet(schema.CONTEXTS_DIR).to_pandas())
    held = naive_windows(windows, run.read_parquet(schema.HELDOUT_DIR).to_pandas())
    compared = scored = 0
    for layer in (0, 1):
        got = run.read_parquet(schema.layer_dir(schema.EMBEDDING_SCORES_DIR, layer)).to_pandas()
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
        cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
        ex = ex.merge(cl, on=["layer", "neuron", "rank"])
        ex = ex[~ex.outlier]
        kept = sorted({(int(n), int(c)) for n, c in zip(ex.neuron, ex.cluster)})
        assert list(zip(got.neuron, got.cluster)) == kept
        occ = read_occurrences(occurrence_run, layer).to_pandas()
        by_cluster = got.set_index(["neuron", "cluster"])
        for neuron, mine in ex.groupby("neuron"):
            train_nd = np.array([train[(c, p)] for c, p in zip(mine.ctx_id, mine.pos)])
            fired = occ[occ.unit == neuron]
            test_md = np.array([held[(c, p)] for c, p in zip(fired.ctx_id, fired.pos)]).reshape(-1, train_nd.shape[1])
            deltas = embedding_deltas(test_md, fired.cluster.to_numpy(), train_nd, mine.cluster.to_numpy())
            deltas[~np.any(test_md != 0, axis=1)] = np.nan  # a window without text scores nothing
            for cluster in sorted(set(mine.cluster)):
                d = deltas[(fired.cluster == cluster).to_numpy()]
                d = d[np.isfinite(d)]
                row = by_cluster.loc[(neuron, cluster)]
                assert row.examples == (mine.cluster == cluster).sum()
                assert row.heldout == len(d)
                if len(d):
                    assert row.closer == pytest.approx(np.mean(d > 0), abs=1e-6)
                    assert row.margin == pytest.approx(d.mean(), abs=1e-5)
                    scored += 1
                else:
                    assert np.isnan(row.closer) and np.isnan(row.margin)
                compared += 1
    assert compared > 50 and scored > 20  # the comparison is not vacuous


def test_an_interrupted_embedding_scores_stage_resumes(occurrence_run, tmp_path, monkeypatch):  # noqa: F811
    """Killed after the first held-out part: the rerun keeps that part's work and the examples' sums, scores the rest,
    and equals the uninterrupted stage; a rerun of the finished stage skips it."""
    import ne.embedding_scores as stage
    from tests.jobs.test_occurrence import OCC

    shutil.copytree(occurrence_run, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    reference = {
        layer: run.read_parquet(schema.layer_dir(schema.EMBEDDING_SCORES_DIR, layer)).to_pandas() for layer in (0, 1)
    }
    cfg = RunData(run.url).config()
    cfg = dataclasses.replace(cfg, occurrence=OCC, harvest=dataclasses.replace(cfg.harvest, num_workers=0))
    real, calls = stage.score_part, []

    def dies_at_part_1(run_, part, *args):
        if part == 1:
            raise KeyboardInterrupt
        return real(run_, part, *args)

    def counted(run_, part, *args):
        calls.append(part)
        return real(run_, part, *args)

    monkeypatch.setattr(stage, "score_part", dies_at_part_1)
    with pytest.raises(KeyboardInterrupt):
        occurrence_job.run_occurrence(cfg, force={"embedding_scores"})
    assert run.manifest()["stages"]["embedding_scores"]["status"] == "running"
    assert (tmp_path / "run" / stage.WORK / schema.part_name(0)).exists() and (tmp_path / "run" / stage.SUMS).exists()
    monkeypatch.setattr(stage, "cluster_sums", lambda *a: pytest.fail("the examples' sums were kept"))
    monkeypatch.setattr(stage, "score_part", counted)
    summary = occurrence_job.run_occurrence(cfg)
    assert "embedding scores done" in summary.describe() and calls == [1, 2]
    assert not (tmp_path / "run" / stage.WORK).exists()  # half-done work goes when the stage is done
    for layer in (0, 1):
        got = run.read_parquet(schema.layer_dir(schema.EMBEDDING_SCORES_DIR, layer)).to_pandas()
        assert got.equals(reference[layer])
    finished = run.manifest()["stages"]["embedding_scores"]["finished"]
    occurrence_job.run_occurrence(cfg)
    assert run.manifest()["stages"]["embedding_scores"]["finished"] == finished


def test_scores_embedding_false_skips_the_stage(occurrence_run, tmp_path):  # noqa: F811
    from tests.jobs.test_occurrence import OCC

    shutil.copytree(occurrence_run, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run" / schema.EMBEDDING_SCORES_DIR)
    m = run.manifest()
    del m["stages"]["embedding_scores"]
    run.write_manifest(m)
    cfg = RunData(run.url).config()
    cfg = dataclasses.replace(
        cfg,
        occurrence=OCC,
        harvest=dataclasses.replace(cfg.harvest, num_workers=0),
        scores=ScoresConfig(embedding=False),
    )
    assert "embedding scores skipped: scores.embedding is false" in occurrence_job.run_occurrence(cfg).describe()
    assert not (tmp_path / "run" / schema.EMBEDDING_SCORES_DIR).exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("window_before", -1, "scores.window_before is -1; it must be at least 0"),
        ("batch_size", 0, "scores.batch_size is 0; it must be at least 1"),
        ("windows", 3, "unknown config key 'scores.windows'"),
    ],
)
def test_bad_scores_settings_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"scores": {key: value}})


def test_cluster_scores_reach_explain_and_the_viewer(occurrence_run, monkeypatch, capsys):  # noqa: F811
    """`RunData.cluster_scores` gives each cluster's rows of scores/ and embedding_scores/; `ne explain --json`
    carries them with every firing unit, and the viewer's cluster tab says them."""
    import json
    import sys
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from ne.cli import main

    data, run = RunData(occurrence_run), RunDir(occurrence_run)
    labels = run.read_parquet(schema.layer_dir(schema.SCORES_DIR, 1)).to_pandas().set_index(["neuron", "cluster"])
    emb = (
        run.read_parquet(schema.layer_dir(schema.EMBEDDING_SCORES_DIR, 1)).to_pandas().set_index(["neuron", "cluster"])
    )
    neuron = int(emb[emb.heldout > 0].index[0][0])
    got = data.cluster_scores(1, neuron)
    assert sorted(got) == sorted(c for n, c in labels.index if n == neuron)
    for cluster, scores in got.items():
        row = labels.loc[(neuron, cluster)]
        for name, want in (("label_precision", row.precision), ("label_recall", row.recall)):
            assert scores[name] == (None if np.isnan(want) else pytest.approx(want))
        if (neuron, cluster) in emb.index:
            e = emb.loc[(neuron, cluster)]
            assert scores["heldout"] == e.heldout
            assert scores["closer"] == (None if np.isnan(e.closer) else pytest.approx(e.closer))
    from ne.models.tokenizers import gpt2_tokenizer

    ids = [int(t) for t in run.read_parquet(schema.HELDOUT_DIR).to_pandas().tokens[0][:30]]
    text = gpt2_tokenizer().decode(ids, skip_special_tokens=True)
    assert main(["explain", occurrence_run, "--text", text, "--json"]) == 0
    units = [u for r in json.loads(capsys.readouterr().out) for u in r["units"] if u["cluster"] is not None]
    assert units and all(u["scores"] == data.cluster_scores(u["layer"], u["neuron"])[u["cluster"]] for u in units)

    monkeypatch.setattr(sys, "argv", ["app.py", occurrence_run])
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params["layer"], at.query_params["neuron"] = "1", str(neuron)
    at.run()
    assert not at.exception
    from ne.viewer import render

    shown = render.scores_text(got[min(got)])
    assert shown and shown.startswith("On held-out text: ")
    assert shown in " ".join(str(c.value) for c in at.caption)
