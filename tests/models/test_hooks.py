"""Activations at any hook, on every back end: read them, replace them, and a hook the model lacks."""

from __future__ import annotations

import pytest
import torch

from ne.config import ModelConfig
from ne.errors import ConfigError
from ne.models import load_model
from ne.models.hooks import hooked, read_hook
from tests.lm_sae.common import sample_tokens

torch.set_num_threads(1)  # small tensors: one thread is as fast, and stays fast on a busy machine


def test_read_hook_equals_each_back_ends_own_activations(tiny, minilm, tmp_path):
    """TransformerLens: its cache; Hugging Face: hidden_states for the residual stream, the MLP neurons as
    `UnitModel.run` gives them, the MLP output as its output map applied to those neurons."""
    tokens, mask = sample_tokens(tiny, rows=1)
    hooks = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.mlp.hook_post"]
    _, cache = tiny.model.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:
        torch.testing.assert_close(read_hook(tiny, tokens, mask, hook), cache[hook])

    tokens, mask = sample_tokens(minilm)
    real = mask.bool()
    with torch.no_grad():
        states = minilm.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
        act = minilm.run(tokens, mask, [2])[2].act
        mlp_out = minilm.model.encoder.layer[2].output.dense(act)
    for hook, expected in [
        ("blocks.2.hook_resid_pre", states[2]),
        ("blocks.2.hook_resid_post", states[3]),
        ("blocks.2.mlp.hook_post", act),
        ("blocks.2.hook_mlp_out", mlp_out),
    ]:
        torch.testing.assert_close(read_hook(minilm, tokens, mask, hook)[real], expected[real], atol=1e-5, rtol=1e-4)

    from tests.conftest import write_gated_hf

    llama = load_model(ModelConfig(backend="hf", name=str(write_gated_hf(tmp_path)), device="cpu"))
    tokens, mask = sample_tokens(llama)
    with torch.no_grad():
        states = llama.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
        act = llama.run(tokens, mask, [0])[0].act
        mlp_out = llama.model.layers[0].mlp.down_proj(act)
    for hook, expected in [
        ("blocks.0.hook_resid_post", states[1]),
        ("blocks.0.mlp.hook_post", act),
        ("blocks.0.hook_mlp_out", mlp_out),
    ]:
        torch.testing.assert_close(read_hook(llama, tokens, mask, hook)[mask.bool()], expected[mask.bool()])


def test_a_splice_replaces_the_activation_downstream(tiny, minilm):
    """TransformerLens's own run_with_hooks gives the same logits; on MiniLM, replacing the last block's output
    changes the last hidden state by exactly the replacement."""
    tokens, _ = sample_tokens(tiny, rows=1)
    mask = torch.ones_like(tokens)

    def double(x):
        return 2 * x

    with torch.no_grad():
        expected = tiny.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: 2 * x)])
        with hooked(tiny, "blocks.0.hook_mlp_out", double):
            got = tiny.model(tokens)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, tiny.model(tokens))
        tokens, mask = sample_tokens(minilm)
        clean = minilm.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        with hooked(minilm, "blocks.5.hook_resid_post", lambda x: x + 1.0):
            shifted = minilm.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(shifted, clean + 1.0)


def test_a_hook_the_model_lacks_is_one_line(tiny, minilm):
    with pytest.raises(
        ConfigError,
        match=r"the SAE reads 'blocks.0.hook_nowhere', which tiny-gpt2 has no hook "
        r"named; see its hook_dict",
    ):
        read_hook(tiny, torch.tensor([[1]]), torch.tensor([[1]]), "blocks.0.hook_nowhere")
    with pytest.raises(
        ConfigError,
        match=r"the SAE reads 'blocks.7.hook_resid_pre', which the HFModel back end "
        r"cannot reach; it reaches blocks.L.hook_resid_pre, "
        r"blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.mlp.hook_post "
        r"for L < 6",
    ):
        read_hook(minilm, torch.tensor([[1]]), torch.tensor([[1]]), "blocks.7.hook_resid_pre")
