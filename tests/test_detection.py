"""LLM detection scores of descriptions on held-out text (`ne describe --score`) against a chat-completions server
started in the test, whose judge knows where each cluster occurs: the sampled tokens against the occurrence table,
the texts against naive windows, the scores against the judge's answers; resume, and the errors."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest

from ne import schema
from ne.compute.scores import TOKEN_KEY
from ne.config import DescribeConfig
from ne.describe import read_descriptions, run_describe
from ne.detection import read_detection, run_detection
from ne.errors import DataError
from ne.models.tokenizers import decode_each, gpt2_tokenizer
from ne.occurrence import read_occurrences
from ne.rundir.reader import RunData
from ne.rundir.store import RunDir
from tests.test_describe import ChatServer
from tests.test_export import occurrence_run  # noqa: F401  (the fixture: a run with finished occurrences)

N = 4


def frame(rows: dict):
    """Rows as a table, so NaN scores compare equal."""
    import pandas as pd

    return pd.DataFrame([rows[k] for k in sorted(rows)])


def naive_window(tokens: list[int], pos: int, before: int, after: int, special: set) -> str:
    ids = [t for t in tokens[max(0, pos - before) : pos + after + 1] if t not in special]
    return "".join(decode_each(gpt2_tokenizer(), ids)).strip().replace("\n", "⏎")


class Judge:
    """Describes cluster n as "feature #n"; in detection, answers 1 for a text that is the window of an occurrence
    of the described cluster (by a naive table of every held-out occurrence's window)."""

    def __init__(self, run: RunDir, before: int, after: int):
        model = run.manifest()["model"]
        special = {t for t in (model["bos_token_id"], model["pad_token_id"]) if t is not None}
        table = run.read_parquet(schema.HELDOUT_DIR, columns=["ctx_id", "tokens"]).to_pydict()
        held = {int(c): [int(x) for x in t] for c, t in zip(table["ctx_id"], table["tokens"])}
        self.windows: dict[str, set] = {}
        for layer in (0, 1):
            for r in read_occurrences(run.url, layer).to_pandas().itertuples():
                text = naive_window(held[r.ctx_id], r.pos, before, after, special)
                self.windows.setdefault(text, set()).add((layer, r.unit, r.cluster))
        self.held, self.special, self.by_description, self.asked = held, special, {}, 0
        self.before, self.after = before, after

    def __call__(self, body: dict, n: int):
        prompt = body["messages"][-1]["content"]
        if "feature is described as" not in prompt:
            return ChatServer.reply(f"feature #{n}", 10, 2)
        self.asked += 1
        cluster = self.by_description[re.search(r'described as: "(.*)"\.', prompt).group(1)]
        texts = re.findall(r"^Text \d+: (.*)$", prompt, re.M)
        return ChatServer.reply(str([int(cluster in self.windows.get(t, ())) for t in texts]), 50, 5)


@pytest.fixture
def described(occurrence_run, tmp_path):  # noqa: F811
    """A copy of the run whose clusters of neurons 0..11 are described, with its judge and server."""
    shutil.copytree(occurrence_run, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    cfg = RunData(run.url).config()
    cfg = dataclasses.replace(cfg, run_dir=run.url)
    judge = Judge(run, before=16, after=4)
    server = ChatServer(judge)
    cfg.describe = DescribeConfig(
        base_url=server.url,
        model="judge",
        backoff_s=0.0,
        detection_examples=N,
        detection_batch=3,
        flush_every=4,
        window_before=16,
        window_after=4,
    )
    run_describe(cfg, neurons=list(range(12)))
    judge.by_description = {row["description"]: key for key, row in read_descriptions(run).items()}
    yield run, cfg, judge, server
    server.close()


def test_detection_samples_held_out_occurrences_and_scores_the_answers(described):
    run, cfg, judge, server = described
    summary = run_detection(cfg, neurons=list(range(12)))
    rows = read_detection(run)
    assert set(rows) == set(read_descriptions(run)) and summary.scored == len(rows)
    occ = {layer: read_occurrences(run.url, layer).to_pandas() for layer in (0, 1)}
    scored = perfect = 0
    for (layer, neuron, cluster), row in rows.items():
        o = occ[layer][occ[layer].unit == neuron]
        keys = o.ctx_id.to_numpy(np.int64) * TOKEN_KEY + o.pos.to_numpy(np.int64)
        mine = set(keys[o.cluster == cluster])
        others = set(keys[o.cluster != cluster])
        positives, negatives = set(row["positives"]), set(row["negatives"])
        assert row["description"] == read_descriptions(run)[(layer, neuron, cluster)]["description"]
        assert positives <= mine and len(positives) == min(N, len(mine))
        assert not negatives & mine and len(negatives) == len(positives)
        assert len(negatives & others) <= len(positives) // 2
        assert len(negatives & others) == min(len(others), len(positives) // 2)
        for key in negatives - others:  # where the unit does not fire, never BOS or padding
            assert judge.held[key // TOKEN_KEY][key % TOKEN_KEY] not in judge.special
        if not positives:
            assert np.isnan(row["balanced_accuracy"]) and row["prompt_tokens"] == 0
            continue

        def says(k, asked=(layer, neuron, cluster)):
            text = naive_window(judge.held[k // TOKEN_KEY], k % TOKEN_KEY, judge.before, judge.after, judge.special)
            return asked in judge.windows.get(text, ())

        tpr = np.mean([says(k) for k in positives])
        tnr = np.mean([not says(k) for k in negatives])
        assert row["true_positive_rate"] == pytest.approx(tpr) and tpr == 1.0
        assert row["true_negative_rate"] == pytest.approx(tnr)
        assert row["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2)
        assert row["prompt_tokens"] == 50 * -(-2 * len(positives) // 3)  # one request per 3 texts
        scored += 1
        perfect += tnr == 1.0
    assert scored > 10 and perfect > 5  # the comparison is not vacuous
    assert summary.mean_balanced_accuracy == pytest.approx(np.nanmean([r["balanced_accuracy"] for r in rows.values()]))

    asked = judge.asked  # a rerun asks nothing and keeps every row
    again = run_detection(cfg, neurons=list(range(12)))
    assert judge.asked == asked and again.scored == 0 and again.cached == len(rows)
    assert frame(read_detection(run)).equals(frame(rows))


def test_a_failed_detection_run_keeps_what_it_scored(described):
    run, cfg, judge, server = described
    healthy, calls = server.answer, []

    def breaks_after_6(body, n):
        calls.append(n)
        if len(calls) > 6:
            return 500, {}, {"error": "down"}
        return healthy(body, n)

    server.answer = breaks_after_6
    cfg.describe = dataclasses.replace(cfg.describe, max_retries=0, max_concurrency=1)
    with pytest.raises(DataError, match=r"detection scores made before the failure are kept; rerun to score the rest"):
        run_detection(cfg, neurons=list(range(12)))
    kept = read_detection(run)
    assert kept and RunDir(run.url).manifest()["stages"]["detection"]["status"] == "running"
    server.answer = healthy
    run_detection(cfg, neurons=list(range(12)))
    rows = read_detection(run)
    assert frame({k: rows[k] for k in kept}).equals(frame(kept)) and set(rows) == set(read_descriptions(run))


def test_detection_needs_descriptions_and_says_so(occurrence_run, tmp_path):  # noqa: F811
    shutil.copytree(occurrence_run, tmp_path / "run")
    cfg = dataclasses.replace(RunData(str(tmp_path / "run")).config(), run_dir=str(tmp_path / "run"))
    cfg.describe = DescribeConfig(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(DataError, match=r"stage 'describe' of .* is missing; run `ne describe"):
        run_detection(cfg)
    with pytest.raises(Exception, match=r"describe.detection_examples is 0; it must be at least 1"):
        DescribeConfig(base_url="http://127.0.0.1:9/v1", detection_examples=0)


def test_ne_describe_score_prints_the_score_and_the_cost(described, capsys):
    import yaml

    from ne.cli import main
    from ne.config import to_dict

    run, cfg, judge, server = described
    path = run.url + "/../cfg.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f)
    assert main(["describe", "--config", path, "--neuron", "1", "--neuron", "3", "--score"]) == 0
    out = capsys.readouterr().out
    rows = read_detection(run)
    assert {n for _, n, _ in rows} == {1, 3}
    mean = np.nanmean([r["balanced_accuracy"] for r in rows.values()])
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows.values())
    assert f"{len(rows)} descriptions scored now" in out and f"mean balanced accuracy {mean:.3f}" in out
    assert f"= {tokens:,}" in out.splitlines()[-1]
    assert main(["describe", "--config", path, "--neuron", "1", "--score", "--force", "nothing"]) == 2
    assert "--force 'nothing' names no stage" in capsys.readouterr().err


def test_scores_of_replaced_descriptions_are_never_served(described):
    """`ne describe --force describe` writes new descriptions: the old ones' scores are not read, and the next
    `--score` scores the new ones."""
    run, cfg, judge, server = described
    run_detection(cfg, neurons=list(range(12)))
    before = read_detection(run)
    run_describe(cfg, neurons=list(range(12)), force=["describe"])  # the judge numbers its answers on: new texts
    now = read_descriptions(run)
    assert all(now[k]["description"] != row["description"] for k, row in before.items())
    assert read_detection(run) == {}
    judge.by_description = {row["description"]: key for key, row in now.items()}
    summary = run_detection(cfg, neurons=list(range(12)))
    rows = read_detection(run)
    assert summary.scored == len(now) and set(rows) == set(now)
    assert all(rows[k]["description"] == now[k]["description"] for k in rows)
