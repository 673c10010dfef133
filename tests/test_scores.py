"""The `scores` stage: every feature cluster's offline label as a detector of its held-out occurrences, against a
naive loop over every held-out token; resuming after an interruption."""

from __future__ import annotations

import numpy as np
import pytest

import jobs.occurrence as occurrence_job
import ne.scores
from ne import schema
from ne.compute.label import Rule
from ne.occurrence import read_occurrences
from ne.rundir.reader import RunData
from ne.rundir.store import RunDir
from tests.test_export import occurrence_run  # noqa: F401  (the fixture: a run with finished occurrences)


def naive_tokens(run: RunDir, skip: list[int]) -> dict[tuple[int, int], tuple[int, int, int]]:
    """{(ctx_id, pos): (token before, token, token after)} of every held-out token but BOS and padding, one by one."""
    out = {}
    table = run.read_parquet(schema.HELDOUT_DIR).to_pandas()
    for ctx, tokens in zip(table.ctx_id, table.tokens):
        tokens = [int(t) for t in tokens]
        for pos, token in enumerate(tokens):
            if token in skip:
                continue
            before = tokens[pos - 1] if pos > 0 else -1
            after = tokens[pos + 1] if pos + 1 < len(tokens) else -1
            out[(int(ctx), pos)] = (before, token, after)
    return out


def test_label_scores_equal_a_naive_loop(occurrence_run):  # noqa: F811
    run = RunDir(occurrence_run)
    assert run.manifest()["stages"]["scores"]["status"] == "done"
    model = run.manifest()["model"]
    tokens = naive_tokens(run, [t for t in (model["bos_token_id"], model["pad_token_id"]) if t is not None])
    where = list(tokens)
    toks_t3 = np.array([tokens[k] for k in where], np.int64)
    some_precision = some_recall = 0
    for layer in (0, 1):
        scores = run.read_parquet(schema.layer_dir(schema.SCORES_DIR, layer)).to_pandas()
        labels = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer)).to_pandas()
        assert list(zip(scores.neuron, scores.cluster)) == sorted(zip(labels.neuron, labels.cluster))
        fires: dict[tuple[int, int], set] = {}
        occ = read_occurrences(occurrence_run, layer).to_pandas()
        for r in occ.itertuples():
            fires.setdefault((r.unit, r.cluster), set()).add((r.ctx_id, r.pos))
        by_cluster = scores.set_index(["neuron", "cluster"])
        for r in labels.itertuples():
            rule = Rule(tuple(int(k) for k in r.key_tokens), int(r.context_offset), int(r.context_token))
            hit = rule.matches(toks_t3)
            matched = {k for k, h in zip(where, hit) if h}
            mine = fires.get((r.neuron, r.cluster), set())
            got = by_cluster.loc[(r.neuron, r.cluster)]
            assert (got.occurrences, got.matched_tokens, got.matched_occurrences) == (
                len(mine),
                len(matched),
                len(mine & matched),
            )
            if matched:
                assert got.precision == pytest.approx(len(mine & matched) / len(matched), rel=1e-6)
                some_precision += 0 < got.precision < 1
            else:
                assert np.isnan(got.precision)
            if mine:
                assert got.recall == pytest.approx(len(mine & matched) / len(mine), rel=1e-6)
                some_recall += got.recall > 0
            else:
                assert np.isnan(got.recall)
    assert some_precision > 10 and some_recall > 10  # the comparison is not vacuous


def test_an_interrupted_scores_stage_resumes(occurrence_run, tmp_path, monkeypatch):  # noqa: F811
    """Killed after layer 0's part: the rerun keeps it, writes layer 1's, and equals the uninterrupted stage; a
    rerun of the finished stage skips it."""
    import dataclasses
    import shutil

    from tests.jobs.test_occurrence import OCC

    shutil.copytree(occurrence_run, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    reference = {layer: run.read_parquet(schema.layer_dir(schema.SCORES_DIR, layer)).to_pandas() for layer in (0, 1)}
    cfg = RunData(run.url).config()
    cfg = dataclasses.replace(cfg, occurrence=OCC, harvest=dataclasses.replace(cfg.harvest, num_workers=0))
    real = ne.scores.score_layer

    def dies_at_layer_1(run_, layer, *args):
        if layer == 1:
            raise KeyboardInterrupt
        return real(run_, layer, *args)

    monkeypatch.setattr("ne.scores.score_layer", dies_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        occurrence_job.run_occurrence(cfg, force={"scores"})
    assert run.manifest()["stages"]["scores"]["status"] == "running"
    first = tmp_path / "run" / schema.part_path(schema.SCORES_DIR, 0, 0)
    kept = first.stat().st_mtime_ns
    assert not (tmp_path / "run" / schema.part_path(schema.SCORES_DIR, 0, 1)).exists()
    monkeypatch.setattr("ne.scores.score_layer", real)
    summary = occurrence_job.run_occurrence(cfg)
    assert "scores done" in summary.describe() and first.stat().st_mtime_ns == kept
    for layer in (0, 1):
        got = run.read_parquet(schema.layer_dir(schema.SCORES_DIR, layer)).to_pandas()
        assert got.equals(reference[layer])
    finished = run.manifest()["stages"]["scores"]["finished"]
    occurrence_job.run_occurrence(cfg)
    assert run.manifest()["stages"]["scores"]["finished"] == finished
