"""`ne explain`: the units firing on a text, each assigned to a feature cluster, against brute force."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ne import schema
from ne.cli import main
from ne.errors import ConfigError, DataError
from ne.explain import Explainer
from ne.models import load_model
from ne.rundir.store import RunDir
from ne.rundir.weights import read_w_in
from tests.viewer.test_viewer import set_status
from tests.viewer.viewer_run import build_lm_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_cfg):
    """A run of its own copy of the tiny model, which a test changes in place (and restores)."""
    folder = tmp_path_factory.mktemp("explain")
    weights = shutil.copy(tiny_model_cfg.weights, folder / "model.safetensors")
    return build_lm_run(folder / "run", dataclasses.replace(tiny_model_cfg, weights=str(weights)), with_index=False)


@pytest.fixture(scope="module")
def explainer(run):
    return Explainer.load(run.run_dir)


def _tables(run_dir: str, layer: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Examples joined with their clusters, the layer's h rows by h_id, and W_in: read with pandas."""
    r = RunDir(run_dir)
    ex = r.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
    cl = r.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
    h = r.read_parquet(schema.layer_dir(schema.H_DIR, layer)).to_pandas().set_index("h_id")
    return ex.merge(cl, on=["layer", "neuron", "rank"]), h, read_w_in(r, layer)


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_central_examples_explained_again_land_in_their_own_cluster(run, explainer):
    contexts = RunDir(run.run_dir).read_parquet(schema.CONTEXTS_DIR).to_pandas().set_index("ctx_id")
    checked = 0
    for layer in (0, 1):
        rows, h, w_in = _tables(run.run_dir, layer)
        sizes = rows.groupby(["neuron", "cluster"]).size()
        poly = [n for n, g in rows.groupby("neuron") if (g.groupby("cluster").size() >= 2).sum() >= 2]
        for neuron in poly[:6]:
            own = rows[rows.neuron == neuron]
            for central in own[own.is_central & (sizes.loc[neuron][own.cluster].to_numpy() >= 2)].itertuples():
                tokens = list(contexts.loc[central.ctx_id, "tokens"])
                explained = explainer.explain_tokens(tokens[1:], top=100_000)  # the run's own context, without BOS
                unit = next(u for u in explained[central.pos - 1].units if (u.layer, u.neuron) == (layer, neuron))
                assert unit.cluster == central.cluster
                # Brute force: cosine to the mean of the cluster's unit embeddings, from the run's tables.
                members = own[own.cluster == central.cluster]
                e = np.stack([np.asarray(h.loc[i, "h"]) for i in members.h_id]) * w_in[:, neuron]
                mean = _unit(_unit(e).mean(axis=0))
                x = _unit(np.asarray(h.loc[central.h_id, "h"]) * w_in[:, neuron])
                assert unit.similarity == pytest.approx(float(x @ mean), abs=2e-3)
                assert "[[" in unit.central_text
                checked += 1
    assert checked >= 6


def test_firing_units_equal_brute_force(run, explainer, tiny_model_cfg):
    from pydoc_data.topics import topics

    model = load_model(tiny_model_cfg)
    text = model.tokenizer.decode(model.encode(topics["for"])[: run.data.n_ctx - 1])  # one context's worth
    tokens = explainer.explain(text, top=100_000)
    ids = model.encode(text)
    assert len(ids) < run.data.n_ctx
    assert [t.token for t in tokens] == model.decode_tokens(ids) and [t.pos for t in tokens] == list(range(len(ids)))
    maxima = RunDir(run.run_dir).read_parquet(schema.MAXIMA).to_pandas()
    import torch

    out = model.run(torch.tensor([[model.bos_token_id, *ids]]), torch.ones(1, len(ids) + 1, dtype=torch.long), [0, 1])
    for layer in (0, 1):
        top = maxima[maxima.layer == layer].sort_values("neuron").max_act.to_numpy()
        act = out[layer].act[0, 1:].numpy()
        fires = (act >= run.harvest.frac * top) & (top > 0)
        for t in tokens:
            got = sorted(u.neuron for u in t.units if u.layer == layer)
            assert got == np.flatnonzero(fires[t.pos]).tolist()
            for u in t.units:
                assert u.of_max == pytest.approx(
                    out[u.layer].act[0, t.pos + 1, u.neuron].item() / top[u.neuron] if u.layer == layer else u.of_max,
                    rel=1e-5,
                )
    strengths = [u.of_max for t in tokens for u in t.units[:1]]
    assert strengths and all(t.units == sorted(t.units, key=lambda u: -u.of_max) for t in tokens)


def test_long_texts_are_explained_in_chunks_of_the_runs_context(run, explainer):
    ids = list(range(1000, 1000 + 3 * run.data.n_ctx))  # 3 contexts' worth of tokens, each chunk gets a BOS
    tokens = explainer.explain_tokens(ids, top=3)
    assert [t.pos for t in tokens] == list(range(len(ids)))
    step = run.data.n_ctx - 1
    direct = explainer.explain_tokens(ids[step : 2 * step], top=3)  # the second chunk alone
    assert [(u.layer, u.neuron) for t in direct for u in t.units] == [
        (u.layer, u.neuron) for t in tokens[step : 2 * step] for u in t.units
    ]


def test_bad_requests_are_one_line_errors(run, explainer, tmp_path, capsys):
    with pytest.raises(ConfigError, match="the text to explain is empty"):
        explainer.explain("   \n")
    with pytest.raises(ConfigError, match="--top is 0; ask for at least one unit"):
        explainer.explain("def f(x): return x", top=0)
    stale = tmp_path / "stale"
    shutil.copytree(run.run_dir, stale)
    set_status(stale, "cluster", "stale")
    with pytest.raises(DataError, match=r"stage 'cluster' of .* is stale .*; run `ne cluster --config CONFIG`"):
        Explainer.load(str(stale))
    assert main(["explain", str(stale), "--text", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_text_and_json(run, capsys):
    assert main(["explain", run.run_dir, "--text", "The for statement is used to iterate", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "× max" in out and "cluster" in out and "[[" in out
    assert main(["explain", run.run_dir, "--text", "The for statement", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["pos"] for r in records] == list(range(len(records)))
    unit = next(u for r in records for u in r["units"])
    assert set(unit) == {
        "layer",
        "neuron",
        "act",
        "of_max",
        "cluster",
        "similarity",
        "cluster_size",
        "central_text",
        "label",
        "scores",
    }


def test_arguments_of_the_wrong_type_or_outside_the_vocabulary(explainer):
    with pytest.raises(ConfigError, match=r"^top is '3' \(str\); it must be an integer$"):
        explainer.explain("def f(x): return x", top="3")
    with pytest.raises(
        ConfigError,
        match=r"^ids\[1\] is 1000000000; it must be in 0..50256 \(a token id of "
        r"tiny-gpt2\)$",
    ):
        explainer.explain_tokens([10, 10**9])
    with pytest.raises(ConfigError, match=r"^ids\[0\] is -1; it must be in 0..50256"):
        explainer.explain_tokens([-1])
    with pytest.raises(ConfigError, match=r"^ids\[0\] is 1.5 \(float\); it must be an integer"):
        explainer.explain_tokens([1.5])
    assert [t.pos for t in explainer.explain_tokens(np.array([10, 50256]))] == [0, 1]


def test_a_model_changed_in_place_is_refused(run, capsys):
    """Issue 17 item 5: the run's weights file changed in place (same size): no stage skips as finished, `ne
    explain` never runs the changed model against the old maxima, and `ne status` names the file."""
    import safetensors.torch

    from ne.rundir.stages import Stage, describe_status

    weights = Path(run.model.weights)
    intact = weights.read_bytes()
    state = safetensors.torch.load(intact)
    state["blocks.0.mlp.W_in"] = state["blocks.0.mlp.W_in"] * 1.5
    try:
        weights.write_bytes(safetensors.torch.save(state))
        changed = rf"{weights} \(its content differs from when it was read\): an input of stage 'weights' of .* changed"
        with pytest.raises(
            DataError,
            match=changed + r" since it ran. Redo 'weights' and everything after it .* with "
            r"`ne harvest --config CONFIG --force weights`, or restore",
        ):
            Stage(RunDir(run.run_dir), "weights", run).needed()  # what `ne run` asks before skipping it
        with pytest.raises(DataError, match=changed):
            Explainer.load(run.run_dir)
        assert main(["explain", run.run_dir, "--text", "The for statement"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        status = describe_status(RunDir(run.run_dir))
        assert "weights             changed" in status and "maxima              changed" in status
    finally:
        weights.write_bytes(intact)
    assert Explainer.load(run.run_dir).explain("The for statement")  # the same bytes again: usable
