"""The occurrence stage: held-out text, every feature cluster's occurrences in it against a naive loop over
`Explainer.explain_tokens`, resuming after an interruption, and its bad inputs."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest

import jobs.cluster as cluster_job
import jobs.harvest as harvest_job
import jobs.occurrence as occurrence_job
from ne import schema
from ne.cli import main
from ne.config import ModelConfig, OccurrenceConfig, load_config
from ne.errors import ConfigError, DataError
from ne.explain import Explainer
from ne.occurrence import heldout_parts, heldout_tokens, read_heldout, read_occurrences, write_heldout
from ne.rundir.store import RunDir
from tests.jobs.test_harvest import corpus, make_cfg  # noqa: F401  (the corpus fixture)
from tests.viewer.viewer_run import build_lm_run

OCC = OccurrenceConfig(contexts=9, contexts_per_part=4, frac=0.5)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_cfg):
    cfg = build_lm_run(tmp_path_factory.mktemp("occ") / "run", tiny_model_cfg)
    return dataclasses.replace(cfg, occurrence=OCC, harvest=dataclasses.replace(cfg.harvest, num_workers=0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.conftest import write_gated_hf

    return write_gated_hf(tmp_path_factory.mktemp("llama"), "llama")


def gated_run(root, llama_dir, paths, direction: str):
    cfg = make_cfg(
        root,
        ModelConfig(backend="hf", name=str(llama_dir), device="cpu"),
        paths,
        num_workers=0,
        k=8,
        direction=direction,
    )
    cfg.occurrence = OCC
    harvest_job.run_harvest(cfg)
    cluster_job.run_cluster(cfg, in_process=True)
    return cfg


@pytest.fixture(scope="module")
def gated(tmp_path_factory, llama_dir, corpus):  # noqa: F811
    return gated_run(tmp_path_factory.mktemp("gated") / "run", llama_dir, corpus, "max")


@pytest.fixture(scope="module")
def gated_min(tmp_path_factory, llama_dir, corpus):  # noqa: F811
    return gated_run(tmp_path_factory.mktemp("gated_min") / "run", llama_dir, corpus, "min")


@pytest.fixture(scope="module", params=["plain", "gated", "gated_min"])
def any_run(request):
    return request.getfixturevalue(request.param)


def occurrence_rows(run_dir: str, layers) -> pd.DataFrame:
    frames = [read_occurrences(run_dir, layer).to_pandas() for layer in layers]
    return pd.concat(frames).sort_values(["ctx_id", "pos", "layer", "unit"]).reset_index(drop=True)


def naive_rows(run_dir: str, frac: float) -> pd.DataFrame:
    """One held-out context at a time, through `Explainer.explain_tokens` (what `ne explain` runs on a text's
    tokens), every firing unit of every token."""
    explainer = Explainer.load(run_dir, frac=frac)
    run = RunDir(run_dir)
    first = int(explainer.model.bos_token_id is not None)
    rows = []
    for part in heldout_parts(run):
        for ctx_id, tokens in read_heldout(run, part):
            for t in explainer.explain_tokens(tokens[first:].tolist(), top=10**6):
                for u in t.units:
                    rows.append(
                        (
                            ctx_id,
                            t.pos + first,
                            u.layer,
                            u.neuron,
                            -1 if u.cluster is None else u.cluster,
                            u.act,
                            np.nan if u.similarity is None else u.similarity,
                        )
                    )
    frame = pd.DataFrame(rows, columns=["ctx_id", "pos", "layer", "unit", "cluster", "act", "similarity"])
    return frame.sort_values(["ctx_id", "pos", "layer", "unit"]).reset_index(drop=True)


def test_occurrences_equal_a_naive_explain_loop(any_run, monkeypatch):
    """Plain MLP, gated MLP (concat embedding), and a harvest.direction: min run: the same (context, position,
    layer, unit, cluster) rows as explaining each held-out context alone, activations and similarities equal."""
    cfg = any_run
    monkeypatch.setattr(Explainer, "central_text", lambda *a: None)  # display only: not what is compared
    summary = occurrence_job.run_occurrence(cfg)
    run = RunDir(cfg.run_dir)
    n_harvest = run.manifest()["stages"]["contexts"]["info"]["n_contexts"]
    info = summary.occurrence
    assert info["contexts"] == 9 and info["first_ctx_id"] >= n_harvest and len(heldout_parts(run)) == 3
    got, expected = occurrence_rows(cfg.run_dir, info["layers"]), naive_rows(cfg.run_dir, cfg.occurrence.frac)
    assert len(got) > 50 and (got.cluster >= 0).mean() > 0.9
    pd.testing.assert_frame_equal(
        got[["ctx_id", "pos", "layer", "unit", "cluster"]],
        expected[["ctx_id", "pos", "layer", "unit", "cluster"]],
        check_dtype=False,
    )
    np.testing.assert_allclose(got.act, expected.act, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.similarity, expected.similarity, rtol=1e-5, atol=1e-6)
    assert (np.sign(got.act) == (-1 if cfg.harvest.direction == "min" else 1)).all()
    # Held-out tokens by ctx_id, and reads of a few units, agree with the whole tables.
    ctx = sorted(got.ctx_id.unique())[:2]
    tokens = heldout_tokens(cfg.run_dir, ctx)
    whole = run.read_parquet(schema.HELDOUT_DIR).to_pandas().set_index("ctx_id")
    assert all(list(tokens[c]) == list(whole.loc[c, "tokens"]) for c in ctx)
    units = got[got.layer == 1].unit.unique()[:3]
    some = read_occurrences(cfg.run_dir, 1, units=units).to_pandas()
    assert len(some) == (got[got.layer == 1].unit.isin(units)).sum() and set(some.unit) == set(units)
    with pytest.raises(DataError, match=r"contexts \[0\] are not held-out contexts"):
        heldout_tokens(cfg.run_dir, [0])


def test_interrupted_stages_resume_without_loss_or_duplicates(plain, tmp_path, monkeypatch):
    """An occurrence stage stopped after two of its parts, then a co-activation stage stopped after one range:
    the reruns keep what was written, redo only the rest, and end equal to the uninterrupted run."""
    reference = dataclasses.replace(plain, run_dir=str(tmp_path / "reference"))
    shutil.copytree(plain.run_dir, reference.run_dir, ignore=shutil.ignore_patterns(*_occurrence_outputs()))
    cfg = dataclasses.replace(plain, run_dir=str(tmp_path / "run"))
    shutil.copytree(reference.run_dir, cfg.run_dir)
    _drop_occurrence_stages(reference.run_dir)
    _drop_occurrence_stages(cfg.run_dir)
    monkeypatch.setattr("ne.compute.coactivation.PAIR_ROW_BYTES", 2**20 // 40_000)  # several ranges of features
    occurrence_job.run_occurrence(
        dataclasses.replace(reference, coactivation=dataclasses.replace(reference.coactivation, memory_mb=1))
    )

    calls = {"n": 0}
    real = occurrence_job.OccurrenceProcessor.process

    def dies_after_two(self, item):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, item)

    monkeypatch.setattr(occurrence_job.OccurrenceProcessor, "process", dies_after_two)
    small = dataclasses.replace(cfg, coactivation=dataclasses.replace(cfg.coactivation, memory_mb=1))
    with pytest.raises(KeyboardInterrupt):
        occurrence_job.run_occurrence(small)
    run = RunDir(cfg.run_dir)
    assert run.manifest()["stages"]["occurrence"]["status"] == "running"
    written = {p: (tmp_path / "run" / p).stat().st_mtime_ns for p in run.files(schema.OCCURRENCES_DIR)}
    assert len(written) == 2 * 2  # two parts of both layers
    monkeypatch.setattr(occurrence_job.OccurrenceProcessor, "process", real)

    real_merge, merged = occurrence_job.merge_range, {"n": 0}

    def merge_once(*args):
        if merged["n"] == 1:
            raise KeyboardInterrupt
        merged["n"] += 1
        return real_merge(*args)

    monkeypatch.setattr(occurrence_job, "merge_range", merge_once)
    with pytest.raises(KeyboardInterrupt):
        occurrence_job.run_occurrence(small)
    assert {p: (tmp_path / "run" / p).stat().st_mtime_ns for p in written} == written  # kept, not redone
    assert len(run.files(schema.FEATURES_DIR)) == 1
    monkeypatch.setattr(occurrence_job, "merge_range", real_merge)
    occurrence_job.run_occurrence(small)
    assert run.manifest()["stages"]["coactivation"]["info"]["ranges"] > 2
    for folder in (schema.HELDOUT_DIR, schema.FEATURES_DIR):
        a, b = RunDir(reference.run_dir).read_parquet(folder).to_pandas(), run.read_parquet(folder).to_pandas()
        pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(coactivation_rows(reference.run_dir), coactivation_rows(cfg.run_dir))
    pd.testing.assert_frame_equal(occurrence_rows(reference.run_dir, [0, 1]), occurrence_rows(cfg.run_dir, [0, 1]))
    assert not (tmp_path / "run" / "_work").exists()
    # A rerun of finished stages skips them.
    finished = run.manifest()["stages"]["coactivation"]["finished"]
    occurrence_job.run_occurrence(small)
    assert run.manifest()["stages"]["coactivation"]["finished"] == finished


def _occurrence_outputs() -> tuple[str, ...]:
    from ne.rundir.graph import GRAPH

    return tuple(out.split("/")[0] for s in occurrence_job.STAGES for out in GRAPH[s].outputs)


def _drop_occurrence_stages(run_dir: str) -> None:
    run = RunDir(run_dir)
    m = run.manifest()
    for name in occurrence_job.STAGES:
        m["stages"].pop(name, None)
    run.write_manifest(m)


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(plain, gated, tmp_path, capsys, corpus):  # noqa: F811
    # No finished cluster stage.
    unclustered = tmp_path / "unclustered"
    shutil.copytree(plain.run_dir, unclustered)
    m = RunDir(str(unclustered)).manifest()
    m["stages"]["cluster"]["status"] = "running"
    RunDir(str(unclustered)).write_manifest(m)
    with pytest.raises(DataError, match=r"stage 'cluster' is running .* and 'occurrence' needs it; run `ne cluster"):
        occurrence_job.run_occurrence(dataclasses.replace(plain, run_dir=str(unclustered)))
    # A threshold out of range.
    for bad in ("0.0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=rf"occurrence.frac is {bad}; it must lie in \(0, 1\]"):
            load_config(None, [f"occurrence.frac={bad}"])
    # An empty held-out split: the harvest read the whole corpus.
    from ne.models import load_model

    model = load_model(plain.model)
    whole = dataclasses.replace(plain, data=dataclasses.replace(plain.data, max_contexts=None))
    with pytest.raises(
        DataError,
        match=r"the held-out split is empty: data.max_contexts is null, so the harvest "
        r"read the whole corpus; set data.max_contexts below",
    ):
        write_heldout(RunDir(plain.run_dir), whole, model, 10**7)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    named = dataclasses.replace(plain.occurrence, corpus=_corpus([str(empty)]))
    with pytest.raises(DataError, match="the held-out split is empty: occurrence.corpus gives no contexts"):
        write_heldout(RunDir(plain.run_dir), dataclasses.replace(plain, occurrence=named), model, 48)
    # A named corpus that overlaps the harvest's contexts (the very files it read).
    cfg = dataclasses.replace(
        gated, run_dir=str(tmp_path / "gated"), occurrence=dataclasses.replace(OCC, corpus=_corpus(corpus))
    )
    shutil.copytree(gated.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns(*_occurrence_outputs()))
    _drop_occurrence_stages(cfg.run_dir)
    with pytest.raises(
        DataError,
        match=r"occurrence.corpus overlaps the harvest: its context 0 \(document 0\) is "
        r"identical to a context the harvest used",
    ):
        occurrence_job.run_occurrence(cfg)
    assert RunDir(cfg.run_dir).manifest()["stages"]["occurrence"]["status"] == "running"  # nothing marked done
    # Through the CLI: one line on stderr, exit 2.
    config = tmp_path / "cfg.yaml"
    import yaml

    from ne.config import to_dict

    config.write_text(yaml.safe_dump(to_dict(cfg)))
    capsys.readouterr()
    assert main(["occurrence", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ne occurrence: error: occurrence.corpus overlaps the harvest")


def test_a_named_corpus_is_fingerprinted(plain, tmp_path):
    """The held-out corpus is an input of the occurrence stage: edited after the stage read it, a rerun refuses
    with the fix, as the contexts stage does for the run's own corpus."""
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    cfg = dataclasses.replace(
        plain,
        run_dir=str(tmp_path / "run"),
        occurrence=dataclasses.replace(OCC, contexts=2, corpus=_corpus([str(text)])),
    )
    shutil.copytree(plain.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns(*_occurrence_outputs()))
    _drop_occurrence_stages(cfg.run_dir)
    occurrence_job.run_occurrence(cfg)
    assert list(RunDir(cfg.run_dir).manifest()["stages"]["occurrence"]["inputs"]) == [str(text)]
    occurrence_job.run_occurrence(cfg)  # unchanged: skipped
    text.write_text("The quick brown fox jumps over the lazy cat. " * 40)  # the same size: only the hash tells
    with pytest.raises(
        DataError,
        match=rf"{text} \(its content differs from when it was read\): an input of stage "
        r"'occurrence' of .* changed since it ran",
    ):
        occurrence_job.run_occurrence(cfg)


def _corpus(paths):
    from ne.config import HeldOutCorpusConfig

    return HeldOutCorpusConfig(source="files", paths=list(paths))


# --- co-activation and similar features ---------------------------------------------------------------------


def brute_force_pairs(
    run_dir: str, layers, n_ctx: int, per_token: int | None
) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """(pairs with their counts, occurrences per feature, occurrences) by a pandas self-join on the token, among
    each token's `per_token` strongest occurrences (act / the unit's maximum; ties: the lower layer, unit)."""
    run = RunDir(run_dir)
    maxima = run.read_parquet(schema.MAXIMA).to_pandas().set_index(["layer", "neuron"]).max_act
    occ = pd.concat([read_occurrences(run_dir, layer).to_pandas() for layer in layers])
    occ = occ[occ.cluster >= 0].assign(token=lambda d: d.ctx_id * n_ctx + d.pos)
    occ["strength"] = occ.act.to_numpy() / maxima.loc[list(zip(occ.layer, occ.unit))].to_numpy()
    occ = occ.sort_values(["token", "strength", "layer", "unit"], ascending=[True, False, True, True])
    paired = occ[occ.groupby("token").cumcount() < (per_token or 10**9)]
    both = paired.merge(paired, on="token", suffixes=("", "_b"))
    both = both[(both.layer != both.layer_b) | (both.unit != both.unit_b)]
    pairs = both.groupby(["layer", "unit", "cluster", "layer_b", "unit_b", "cluster_b"]).size().rename("count")
    return pairs.reset_index(), occ.groupby(["layer", "unit", "cluster"]).size(), occ


def coactivation_rows(run_dir: str) -> pd.DataFrame:
    run = RunDir(run_dir)
    return pd.concat(
        [
            run.read_parquet(schema.layer_dir(schema.COACTIVATION_DIR, layer)).to_pandas()
            for layer in run.layers(schema.COACTIVATION_DIR)
        ],
        ignore_index=True,
    )


def expected_score(kind, c, na, nb, n):
    return {"count": c, "jaccard": c / (na + nb - c), "cosine": c / np.sqrt(na * nb), "pmi": np.log(c * n / (na * nb))}[
        kind
    ]


@pytest.mark.ray
@pytest.mark.parametrize("score", ["count", "pmi"])
def test_coactivation_job_equals_brute_force(plain, tmp_path, monkeypatch, local_ray, score):
    """The occurrences found by Ray actors equal those found in process (once); then Ray tasks with ranges of a few
    thousand pair rows against a pandas self-join: every pair's count and score
    among each token's 6 strongest occurrences, each feature's best 5, and every feature's occurrences, density
    and activation quantiles (numpy's)."""
    occurrence_job.run_occurrence(plain)
    co_cfg = dataclasses.replace(plain.coactivation, memory_mb=1, score=score, max_per_token=6, partners=5)
    cfg = dataclasses.replace(
        plain,
        run_dir=str(tmp_path / "run"),
        coactivation=co_cfg,
        harvest=dataclasses.replace(plain.harvest, num_workers=1),
    )
    shutil.copytree(plain.run_dir, cfg.run_dir)
    monkeypatch.setattr("ne.compute.coactivation.PAIR_ROW_BYTES", 2**20 // 4_000)
    on_actors = score == "count"  # once is enough: the occurrences do not depend on the score
    redo = "occurrence" if on_actors else "coactivation"
    summary = occurrence_job.run_occurrence(cfg, force=[redo], in_process=False)
    if on_actors:
        pd.testing.assert_frame_equal(occurrence_rows(cfg.run_dir, [0, 1]), occurrence_rows(plain.run_dir, [0, 1]))
    info = summary.coactivation
    assert info["ranges"] > 2
    pairs, n, occ = brute_force_pairs(cfg.run_dir, [0, 1], cfg.data.n_ctx, co_cfg.max_per_token)
    n_tokens = summary.occurrence["tokens"]
    kept = pairs[pairs["count"] >= co_cfg.min_count].copy()
    kept["score"] = expected_score(
        score,
        kept["count"].to_numpy(),
        n.loc[list(zip(kept.layer, kept.unit, kept.cluster))].to_numpy(),
        n.loc[list(zip(kept.layer_b, kept.unit_b, kept.cluster_b))].to_numpy(),
        n_tokens,
    )
    kept["score"] = kept.score.astype(np.float32)
    kept = kept.sort_values(
        ["layer", "unit", "cluster", "score", "count", "layer_b", "unit_b", "cluster_b"],
        ascending=[True, True, True, False, False, True, True, True],
    )
    kept = kept[kept.groupby(["layer", "unit", "cluster"]).cumcount() < co_cfg.partners]
    got = coactivation_rows(cfg.run_dir).rename(columns={"neuron": "unit", "neuron_b": "unit_b"})
    keys = ["layer", "unit", "cluster", "layer_b", "unit_b", "cluster_b"]
    merged = kept.merge(got, on=keys, how="outer", suffixes=("", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all() and len(got) == len(kept) == info["pairs"] > 100
    assert (merged["count"] == merged["count_got"]).all()
    np.testing.assert_allclose(merged.score_got, merged.score, rtol=1e-5)
    assert kept.groupby(["layer", "unit", "cluster"]).size().max() == co_cfg.partners  # the cut binds
    # Each feature's statistics.
    features = (
        RunDir(cfg.run_dir).read_parquet(schema.FEATURES_DIR).to_pandas().set_index(["layer", "neuron", "cluster"])
    )
    assert len(features) == info["features"] and features.index.is_unique
    seen = features[features.occurrences > 0]
    assert len(seen) == len(n) == info["features_seen"]
    for (layer, unit, cluster), row in seen.sample(40, random_state=0).iterrows():
        acts = occ[(occ.layer == layer) & (occ.unit == unit) & (occ.cluster == cluster)].act.to_numpy(np.float64)
        assert row.occurrences == len(acts) and row.density == pytest.approx(len(acts) / n_tokens)
        np.testing.assert_allclose(
            [row.act_q10, row.act_q50, row.act_q90], np.quantile(acts, [0.1, 0.5, 0.9]), rtol=1e-6
        )
        assert row.act_peak == pytest.approx(acts.max())
    assert features[features.occurrences == 0].act_q50.isna().all()


def test_similar_features_answer_by_behaviour(plain, tmp_path, capsys):
    from index.query import SimilarFeatures

    occurrence_job.run_occurrence(plain)
    run = RunDir(plain.run_dir)
    table = coactivation_rows(plain.run_dir)
    sizes = table.groupby(["layer", "neuron", "cluster"]).size()
    layer, neuron, cluster = sizes[sizes >= 6].index[0]
    sf = SimilarFeatures.load(plain.run_dir)
    hits = sf.query(layer=layer, neuron=neuron, cluster=cluster, k=5)
    mine = table[(table.layer == layer) & (table.neuron == neuron) & (table.cluster == cluster)]
    best = mine.sort_values(
        ["score", "count", "layer_b", "neuron_b", "cluster_b"], ascending=[False, False, True, True, True]
    ).head(5)
    assert [(h.layer, h.neuron, h.cluster, h.count) for h in hits] == list(
        zip(best.layer_b, best.neuron_b, best.cluster_b, best["count"])
    )
    assert all(h.by == "behaviour" for h in hits) and [h.similarity for h in hits] == pytest.approx(list(best.score))
    vector = sf.query(layer, neuron, cluster, k=5, by="vector")
    assert vector and all(h.by == "vector" for h in vector)
    # A feature that never fired in the held-out text is answered by vector; asked by behaviour, it has none.
    features = run.read_parquet(schema.FEATURES_DIR).to_pandas()
    quiet = features[features.occurrences == 0].iloc[0]
    q = (int(quiet.layer), int(quiet.neuron), int(quiet.cluster))
    assert [h.by for h in sf.query(*q, k=3)] == ["vector"] * 3
    assert sf.query(*q, k=3, by="behaviour") == []
    # Unknown layer, neuron or cluster.
    with pytest.raises(ConfigError, match=r"layer 7 is not in this run; it has layers \[0, 1\]"):
        sf.query(7, 0, 0)
    with pytest.raises(ConfigError, match=r"neuron 999 is out of range; layer 0 has neurons 0..255"):
        sf.query(0, 999, 0)
    with pytest.raises(ConfigError, match=rf"cluster 99 is out of range; neuron {neuron} of layer {layer} has "):
        sf.query(layer, neuron, 99)
    # `ne similar` says which answer it gave.
    assert (
        main(
            [
                "similar",
                plain.run_dir,
                "--layer",
                str(layer),
                "--neuron",
                str(neuron),
                "--cluster",
                str(cluster),
                "-k",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("answered by behaviour") and out[2].split()[:6] == [
        "layer",
        "neuron",
        "cluster",
        "score",
        "together",
        "by",
    ]
    assert [tuple(map(int, line.split()[:3])) for line in out[3:]] == [(h.layer, h.neuron, h.cluster) for h in hits[:3]]
    assert main(["similar", plain.run_dir, "--layer", str(layer), "--neuron", str(neuron), "--by", "vector"]) == 0
    assert "answered by vector" in capsys.readouterr().out
    # A run without an index still answers by behaviour (and says a vector query needs the index).
    no_index = tmp_path / "no_index"
    shutil.copytree(plain.run_dir, no_index)
    m = RunDir(str(no_index)).manifest()
    m["stages"].pop("index")
    RunDir(str(no_index)).write_manifest(m)
    shutil.rmtree(no_index / "index")
    alone = SimilarFeatures.load(str(no_index))
    assert [(h.layer, h.neuron, h.cluster, h.ctx_id, h.pos) for h in alone.query(layer, neuron, cluster, k=5)] == [
        (h.layer, h.neuron, h.cluster, h.ctx_id, h.pos) for h in hits
    ]
    with pytest.raises(
        DataError, match=r"no search by vector: stage .index. of .* is missing; run `ne index --config CONFIG`"
    ):
        alone.query_vector(np.ones(64))


def test_viewer_shows_density_and_what_fires_together(plain, monkeypatch):
    import sys

    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    occurrence_job.run_occurrence(plain)
    table = coactivation_rows(plain.run_dir)
    layer, neuron, cluster = table.groupby(["layer", "neuron", "cluster"]).size().idxmax()
    features = (
        RunDir(plain.run_dir).read_parquet(schema.FEATURES_DIR).to_pandas().set_index(["layer", "neuron", "cluster"])
    )
    monkeypatch.setattr(sys, "argv", ["app.py", plain.run_dir])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params.update(layer=str(layer), neuron=str(neuron), cluster=str(cluster))
    at.run()
    assert not at.exception
    stats = features.loc[(layer, neuron, cluster)]
    assert "In held-out text" in " ".join(m.value for m in at.markdown)
    assert [m.value for m in at.metric][-3] == f"{int(stats.occurrences):,}"
    radio = at.radio(key=f"by_{layer}_{neuron}_{cluster}")
    assert radio.options == ["fires together", "vector"] and radio.value == "fires together"
    mine = table[(table.layer == layer) & (table.neuron == neuron) & (table.cluster == cluster)].head(5)
    labels = [b.label for b in at.button if b.key and b.key.startswith(f"sim_{layer}_{neuron}_{cluster}_")]
    from ne.rundir.reader import RunData
    from ne.viewer.render import markdown_escape

    data = RunData(plain.run_dir)

    def label(r) -> str:  # each hit shows its cluster's offline label
        text = data.labels(int(r.layer_b), int(r.neuron_b)).get(int(r.cluster_b))
        return f" · {markdown_escape(text)}" if text else ""

    assert labels == [
        f"L{r.layer_b} · N{r.neuron_b} · C{r.cluster_b}{label(r)} — together on {r.count} tokens, count {r.score:.3g}"
        for r in mine.itertuples()
    ]
    radio.set_value("vector").run()
    labels = [b.label for b in at.button if b.key and b.key.startswith(f"sim_{layer}_{neuron}_{cluster}_")]
    assert labels and all("similarity" in label for label in labels)
