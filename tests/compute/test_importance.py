"""Token importance against a brute-force loop that masks one token at a time and runs the model on each."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from ne.compute.importance import ImportanceCache, mask_token_id, token_importance
from ne.errors import ConfigError
from ne.models import load_model
from ne.models.base import LayerOutput, UnitModel


@pytest.fixture(scope="module")
def model(tiny_model_cfg):
    torch.set_num_threads(2)
    return load_model(tiny_model_cfg)


@pytest.fixture(scope="module")
def context(model):
    ids = model.encode("def square(x):\n    return x * x\n\nprint(square(3))  # nine")
    return [model.bos_token_id] + ids


def brute_force(model, tokens, pos, layer, neuron, mask):
    """1 - act_masked / act_key, one full-context forward per masked token, never BOS."""

    def act(toks):
        t = torch.tensor([toks])
        return float(model.run(t, torch.ones_like(t), [layer])[layer].act[0, pos, neuron])

    key = act(tokens)
    out = []
    for i in range(pos + 1):
        if i == 0 and tokens[0] == model.bos_token_id:
            out.append(np.nan)
            continue
        masked = list(tokens)
        masked[i] = mask
        out.append(1.0 - act(masked) / key)
    return np.array(out)


def test_equals_brute_force(model, context):
    pos, layer, neuron = 12, 1, 7
    mask = mask_token_id(model)
    got = token_importance(model, context, pos, layer, neuron, mask)
    want = brute_force(model, context, pos, layer, neuron, mask)
    assert got.shape == (pos + 1,)
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-4, atol=1e-4)
    assert np.abs(want[1:]).max() > 1e-3, "the test would pass vacuously if no token mattered"


def test_causal_cut_is_exact(model, context):
    """For a causal model the context is cut after the key token; that must not change any value."""
    pos, layer, neuron = 9, 0, 3
    mask = mask_token_id(model)
    model.is_causal = False
    try:
        full = token_importance(model, context, pos, layer, neuron, mask)
    finally:
        model.is_causal = True
    cut = token_importance(model, context, pos, layer, neuron, mask)
    np.testing.assert_allclose(cut, full, rtol=1e-4, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(cut[1:], brute_force(model, context, pos, layer, neuron, mask)[1:], atol=1e-4, rtol=1e-4)


def test_window_is_a_slice_and_one_forward(model, context, monkeypatch):
    pos, layer, neuron, start = 14, 1, 11, 6
    mask = mask_token_id(model)
    full = token_importance(model, context, pos, layer, neuron, mask)
    calls = []
    real = model.run
    monkeypatch.setattr(model, "run", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    part = token_importance(model, context, pos, layer, neuron, mask, start=start)
    np.testing.assert_allclose(part, full[start:], rtol=1e-5, atol=1e-6)
    # Causal model: the context is cut after the key token.
    assert calls == [(pos - start + 2, pos + 1)], "all maskings (and the unmasked row) in one batch"


def test_mask_token_is_pad_or_eos_never_an_arbitrary_id(model):
    assert mask_token_id(model) == model.pad_token_id == 50256  # GPT-2: no pad token, so EOS
    assert mask_token_id(model, 220) == 220


def test_cache_runs_each_example_once(model, context, monkeypatch):
    cache = ImportanceCache(model)
    calls = []
    real = model.run
    monkeypatch.setattr(model, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = cache(context, 7, 10, 0, 1)
    b = cache(context, 7, 10, 0, 1)
    cache(context, 7, 10, 0, 2)
    assert a is b and len(calls) == 2


class _Silent(UnitModel):
    """A model whose neurons never fire, and that has no pad token."""

    name, n_layers, d_model, d_mlp, n_ctx_max = "silent", 1, 2, 3, 16
    bos_token_id, pad_token_id, device, is_causal = None, None, torch.device("cpu"), False
    act_fn = staticmethod(torch.relu)

    def W_in(self, layer):
        return torch.zeros(2, 3)

    def b_in(self, layer):
        return torch.zeros(3)

    def run(self, tokens, attention_mask, layers):
        b, p = tokens.shape
        return {0: LayerOutput(h=torch.zeros(b, p, 2), act=torch.zeros(b, p, 3))}

    def encode(self, text):
        return []

    def decode_tokens(self, ids):
        return [str(i) for i in ids]


def test_zero_activation_gives_nan_and_missing_pad_is_a_config_error():
    m = _Silent()
    assert np.isnan(token_importance(m, [1, 2, 3], 2, 0, 0, mask_token=0)).all()
    with pytest.raises(ConfigError, match="importance.mask_token"):
        mask_token_id(m)


@pytest.mark.ray
def test_ray_job_precomputes_adds_and_resumes(tiny_model_cfg, tmp_path, local_ray):
    from jobs.importance import run_importance
    from ne.rundir.reader import RunData
    from tests.viewer.test_viewer import set_status
    from tests.viewer.viewer_run import build_lm_run

    cfg = build_lm_run(tmp_path / "run", tiny_model_cfg, n_contexts=16, k=4, layers=(1,), with_index=False)
    cfg.importance.window_before = 6
    cfg.importance.neurons_per_task = 3
    folder = tmp_path / "run" / "importance" / "layer=1"
    summary = run_importance(cfg, neurons=[0, 1, 2, 3])
    assert summary.new_neurons == 4 and summary.neurons == {1: 4}
    parts = sorted(folder.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    stamps = {p: p.stat().st_mtime_ns for p in parts}

    # A later run for another neuron adds a part and keeps the earlier ones.
    assert run_importance(cfg, neurons=[4, 2]).new_neurons == 1
    assert sorted(p.name for p in folder.glob("part-*.parquet"))[-1] == "part-00002.parquet"
    assert all(p.stat().st_mtime_ns == stamps[p] for p in parts)

    # An interrupted run (one part lost, the stage not done) redoes only what is missing.
    parts[1].unlink()
    set_status(tmp_path / "run", "importance", "running")
    assert run_importance(cfg, neurons=[0, 1, 2, 3, 4]).new_neurons == 1  # neuron 3: the lost part's
    assert parts[0].stat().st_mtime_ns == stamps[parts[0]]

    data = RunData(cfg.run_dir)
    model = load_model(tiny_model_cfg)
    n_examples = 0
    for neuron in [0, 1, 2, 3, 4]:
        nd = data.neuron(1, neuron)
        assert set(nd.importance) == {e.rank for e in nd.examples}
        for e in nd.examples:
            start, values = nd.importance[e.rank]
            assert start == max(0, e.pos - 6)
            want = token_importance(model, e.tokens, e.pos, 1, neuron, mask_token_id(model), start)
            np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6, equal_nan=True)
            n_examples += 1
    assert n_examples > 0
    table = pd.concat(pd.read_parquet(p) for p in folder.glob("*.parquet"))
    assert not table.duplicated(["neuron", "rank"]).any()

    with pytest.raises(ConfigError, match=r"--neuron 99999 is out of range; the layers of .* have neurons 0\.\.255"):
        run_importance(cfg, neurons=[99999])
    with pytest.raises(ConfigError, match=r"--layer 0 is not in .*; it has layers \[1\]"):
        run_importance(cfg, layers=[0])
    other = copy.deepcopy(cfg)
    other.importance.window_before = 3
    with pytest.raises(ConfigError, match="importance.window_before is 3 in this config but was 6.*--force importance"):
        run_importance(other, neurons=[0])
