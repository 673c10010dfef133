"""The label stage (`jobs/label.py`, `ne.rundir.labels`): every cluster's label and its counts against naive loops,
resuming, and everywhere a cluster is shown (explain, similar, the report, the viewer, `ne run`'s ranking)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import jobs.label as label_job
from jobs.label import run_label
from ne import schema
from ne.cli import main
from ne.compute.label import NONE, Rule, shown
from ne.config import RunConfig, from_dict
from ne.models import load_token_decoder
from ne.rundir.contexts import tokens_at
from ne.rundir.labels import corpus_counts
from ne.rundir.reader import RunData
from ne.rundir.report import most_polysemantic
from ne.rundir.stages import state_of
from ne.rundir.store import RunDir
from ne.viewer import render


def _cfg(run_dir: str) -> RunConfig:
    cfg = from_dict(RunConfig, RunDir(run_dir).manifest()["config"])
    cfg.run_dir = run_dir
    return cfg


def test_corpus_counts_and_rates_equal_naive_counts(lm_run):
    run = RunDir(lm_run)
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas()
    uni, pairs = Counter(), Counter()
    for toks in contexts.tokens:
        toks = [int(t) for t in toks]
        uni.update(toks)
        pairs.update(zip(toks, toks[1:]))
    counts = corpus_counts(run)
    positions = sum(uni.values())
    assert counts.positions == positions and counts.unigrams.sum() == positions
    assert all(counts.unigrams[t] == n for t, n in uni.items())
    assert counts.pair_counts.sum() == sum(pairs.values()) and len(counts.pairs) == len(pairs)
    common = [t for t, _ in uni.most_common(4)]
    a, b = common[0], common[1]
    assert counts.rate(Rule((a, b))) == pytest.approx((uni[a] + uni[b]) / positions)
    assert counts.rate(Rule((a,), -1, b)) == pytest.approx(pairs[(b, a)] / positions)
    assert counts.rate(Rule((a, b), 1, common[2])) == pytest.approx(
        (pairs[(a, common[2])] + pairs[(b, common[2])]) / positions
    )
    assert counts.rate(Rule((), -1, b)) == pytest.approx(sum(n for (x, _), n in pairs.items() if x == b) / positions)
    assert counts.rate(Rule((), 1, b)) == pytest.approx(sum(n for (_, y), n in pairs.items() if y == b) / positions)


def _labels(run: RunDir, layer: int) -> pd.DataFrame:
    return run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer)).to_pandas()


def test_every_cluster_has_a_label_whose_counts_are_true(lm_run):
    run = RunDir(lm_run)
    decode = load_token_decoder(_cfg(lm_run).model)
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas()
    tokens = {int(c): [int(t) for t in toks] for c, toks in zip(contexts.ctx_id, contexts.tokens)}
    positions = sum(len(t) for t in tokens.values())
    bos = run.manifest()["model"]["bos_token_id"]
    for layer in (0, 1):
        labels = _labels(run, layer)
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
        cl = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
        both = ex.merge(cl, on=["layer", "neuron", "rank"])
        expected = both.groupby(["neuron", "cluster"]).agg(size=("rank", "size"), outlier=("outlier", "first"))
        assert list(zip(labels.neuron, labels.cluster)) == list(expected.index)  # sorted, one row per cluster
        assert labels["size"].tolist() == expected["size"].tolist()
        assert labels.outlier.tolist() == expected.outlier.tolist()
        for row in labels.itertuples():
            rule = Rule(tuple(row.key_tokens), row.context_offset, row.context_token)
            assert rule.context != bos

            def hit(ctx, pos, rule=rule):
                t = tokens[ctx]
                at = pos + rule.offset
                return (not rule.keys or t[pos] in rule.keys) and (
                    not rule.offset or (0 <= at < len(t) and t[at] == rule.context)
                )

            members = both[both.neuron == row.neuron]
            own = [hit(c, p) for c, p, k in zip(members.ctx_id, members.pos, members.cluster) if k == row.cluster]
            other = [hit(c, p) for c, p, k in zip(members.ctx_id, members.pos, members.cluster) if k != row.cluster]
            assert row.coverage == pytest.approx(np.mean(own))
            assert row.others == pytest.approx(np.mean(other), nan_ok=True) if other else np.isnan(row.others)
            if row.Index % 10 == 0:  # the corpus count is a slow loop: every tenth cluster
                corpus = sum(hit(c, p) for c, t in tokens.items() for p in range(len(t)))
                assert row.corpus == pytest.approx(corpus / positions)
            ids = [t for t in (*rule.keys, rule.context) if t != NONE]
            names = dict(zip(ids, shown(decode(ids))))
            assert row.label == rule.text(names.__getitem__) + (f" ({row.coverage:.0%})" if row.coverage < 0.5 else "")
        if layer == 0:
            break  # layer 1 only through the rows' shape above: the corpus count is a slow loop


def test_tokens_at_reads_neighbours_and_names_missing_contexts(lm_run):
    run = RunDir(lm_run)
    contexts = run.read_parquet(schema.CONTEXTS_DIR).to_pandas()
    ctx = contexts.ctx_id.to_numpy()[[3, 0, 3]]
    last = len(contexts.tokens[3]) - 1
    got = tokens_at(run, ctx, np.array([0, 5, last]))
    t0, t3 = list(contexts.tokens[0]), list(contexts.tokens[3])
    assert got.tolist() == [[NONE, t3[0], t3[1]], [t0[4], t0[5], t0[6]], [t3[last - 1], t3[last], NONE]]
    with pytest.raises(Exception, match=r"contexts \[99999\] of the examples are missing"):
        tokens_at(run, np.array([99999]), np.array([0]))


def test_the_stage_skips_when_done_and_resumes_per_layer(lm_run, tmp_path, monkeypatch):
    shutil.copytree(lm_run, tmp_path / "run")
    cfg = _cfg(str(tmp_path / "run"))
    run = RunDir(cfg.run_dir)
    before = {layer: _labels(run, layer) for layer in (0, 1)}
    part = tmp_path / "run" / schema.layer_dir(schema.LABELS_DIR, 0) / schema.part_name(0)
    stamp = os.stat(part).st_mtime_ns
    run_label(cfg)
    assert os.stat(part).st_mtime_ns == stamp  # finished: skipped
    real = label_job.label_layer

    def dies_on_layer_1(run, layer, *args):
        if layer == 1:
            raise KeyboardInterrupt
        return real(run, layer, *args)

    monkeypatch.setattr(label_job, "label_layer", dies_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        run_label(cfg, force=["label"])
    assert state_of(run.manifest(), "label")[0] == "running" and not (tmp_path / "run" / "report").exists()
    stamp = os.stat(part).st_mtime_ns
    monkeypatch.setattr(label_job, "label_layer", real)
    run_label(cfg)
    assert os.stat(part).st_mtime_ns == stamp  # layer 0 kept from the interrupted run, layer 1 done now
    for layer in (0, 1):
        pd.testing.assert_frame_equal(_labels(run, layer), before[layer])
    assert state_of(run.manifest(), "label")[0] == "done" and (tmp_path / "run" / "report" / "report.md").exists()


def test_labels_are_shown_wherever_a_cluster_is(lm_run, capsys):
    run = RunDir(lm_run)
    labels = {(layer, r.neuron, r.cluster): r.label for layer in (0, 1) for r in _labels(run, layer).itertuples()}
    assert main(["explain", lm_run, "--text", "The for statement is used to iterate over a list", "--json"]) == 0
    units = [u for t in json.loads(capsys.readouterr().out) for u in t["units"]]
    assert units and all(u["label"] == labels[(u["layer"], u["neuron"], u["cluster"])] for u in units)
    assert main(["explain", lm_run, "--text", "The for statement is used to iterate over a list", "--top", "1"]) == 0
    u = units[0]
    assert f"cluster {u['cluster']} {u['label']} (" in capsys.readouterr().out
    assert (
        main(
            [
                "similar",
                lm_run,
                "--layer",
                str(u["layer"]),
                "--neuron",
                str(u["neuron"]),
                "--cluster",
                str(u["cluster"]),
                "-k",
                "3",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        f"query: layer {u['layer']}, neuron {u['neuron']}, cluster {u['cluster']} {u['label']}: "
    )
    assert lines[1].startswith("answered by ")
    assert "label" in lines[2].split()
    for line in lines[3:]:
        layer, neuron, cluster = map(int, line.split()[:3])
        assert labels[(layer, neuron, cluster)] in line
    report = run.path("report", "report.md")
    text = open(report).read()
    assert "| labels |" in text and "C0: " in text
    tab = render.cluster_label(2, 7, False, '"*" / "[" after "_"')
    assert tab == r':green[Cluster 2] (7) · "\*" / "\[" after "\_"'


def test_most_polysemantic_ranks_substantial_separated_clusters():
    m = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1],
            "neuron": [1, 2, 3, 4],
            "n_examples": [92, 60, 100, 40],
            "n_clusters": [19, 3, 4, 3],
            "silhouette": [0.41, 0.7, 0.2, 0.6],
            "mean_dist": [0.8, 0.5, 0.6, 0.5],
        }
    )
    rows = [  # (layer, neuron, cluster sizes): neuron 1 is diffuse, neuron 3 badly separated
        (0, 1, [12, 9, 8, 8, 7, 6, 6, 5, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 1]),
        (0, 2, [30, 20, 10]),
        (0, 3, [40, 30, 20, 10]),
        (1, 4, [20, 15, 5]),
    ]
    clusters = pd.DataFrame(
        [
            {"layer": layer, "neuron": n, "cluster": c, "size": s, "outlier": s < 2, "label": f'"t{n}{c}"'}
            for layer, n, sizes in rows
            for c, s in enumerate(sizes)
        ]
    )
    top = most_polysemantic(m, clusters, 4)
    # Substantial: not an outlier, >= 10% of the neuron's examples and >= 5 of them, counted by a naive loop.
    naive = {
        n: sum(1 for s in sizes if s >= 2 and s >= max(5, 0.1 * m.n_examples[m.neuron == n].item()))
        for _, n, sizes in rows
    }
    assert naive == {1: 1, 2: 3, 3: 4, 4: 3}
    assert top.neuron.tolist() == [2, 4, 1, 3]  # separated ones first (by count), then neuron 3 (silhouette 0.2)
    assert top.substantial.tolist() == [naive[n] for n in top.neuron]
    assert top.labels.iloc[0] == 'C0: "t20" · C1: "t21" · C2: "t22"'


def test_viewer_tabs_and_similar_features_show_labels(lm_run, monkeypatch):
    import sys

    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    monkeypatch.setattr(sys, "argv", ["app.py", lm_run])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params["layer"], at.query_params["neuron"] = "0", str(int(RunData(lm_run).neurons(0)[0]))
    at.run()
    assert not at.exception
    layer, neuron = (int(x) for x in re.findall(r"\d+", at.header[0].value))
    labels = _labels(RunDir(lm_run), layer)
    mine = labels[labels.neuron == neuron]
    tabs = [t.label for t in at.tabs]
    assert len(tabs) == len(mine)
    for row, tab in zip(mine.itertuples(), tabs):
        assert tab.startswith(f":{render.cluster_colour(row.cluster)[0]}[Cluster {row.cluster}]")
        assert tab.endswith(f" · {render.markdown_escape(row.label)}")
    similar = [b.label for b in at.button if re.match(r"L\d+ · N\d+ · C\d+", b.label)]
    assert similar
    every = {
        (layer, r.neuron, r.cluster): r.label for layer in (0, 1) for r in _labels(RunDir(lm_run), layer).itertuples()
    }
    for text in similar:
        l2, n2, c2 = (int(x) for x in re.match(r"L(\d+) · N(\d+) · C(\d+)", text).groups())
        assert f"C{c2} · {render.markdown_escape(every[(l2, n2, c2)])} — similarity" in text
