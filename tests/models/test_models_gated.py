"""Gated MLPs (Llama, Mistral, Qwen, Gemma, OLMo) through every back end:
act == act_fn(h @ W_gate + b_gate) * (h @ W_up + b_up), checked against the models' own modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from ne.config import ModelConfig
from ne.errors import ConfigError
from ne.models import load_model
from ne.models.tokenizers import gpt2_tokenizer
from tests.conftest import GATED_SHAPE, TINY_ARCH
from tests.models.test_models import batch

CONVERTERS = {"llama": "convert_llama_weights", "gemma": "convert_gemma_weights"}


def assert_gated_identity(model, out, mask, atol=1e-5):
    valid = mask.bool()
    for layer, o in out.items():
        ref = model.act_fn(o.h @ model.W_in(layer) + model.b_in(layer)) * (o.h @ model.W_up(layer) + model.b_up(layer))
        torch.testing.assert_close(o.act[valid], ref[valid], atol=atol, rtol=1e-4)


def hf_config(path) -> ModelConfig:
    return ModelConfig(backend="hf", name=str(path), device="cpu")


def tl_arch(model_type: str) -> dict:
    """The TransformerLens architecture of `write_gated_hf`'s models."""
    s = GATED_SHAPE
    return dict(
        n_layers=s["num_hidden_layers"],
        d_model=s["hidden_size"],
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=s["intermediate_size"],
        d_vocab=s["vocab_size"],
        n_ctx=s["max_position_embeddings"],
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=16,
        gated_mlp=True,
        final_rms=True,
        eps=1e-6,
        act_fn="silu" if model_type == "llama" else "gelu_pytorch_tanh",
    )


def tl_state(hf_dir, model_type: str) -> dict[str, torch.Tensor]:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions
    from transformers import AutoModelForCausalLM

    convert = getattr(weight_conversions, CONVERTERS[model_type])
    state = convert(AutoModelForCausalLM.from_pretrained(hf_dir), HookedTransformerConfig(**tl_arch(model_type)))
    return {k: v.detach().contiguous() for k, v in state.items()}


# --- hf --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {"mlp_bias": True}),
        ("gemma", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("gemma2", {}),
        ("olmo", {}),
        ("olmo2", {}),
    ],
)
def test_hf_gated_identity_against_the_models_own_modules(tmp_path, model_type, extra):
    from tests.conftest import write_gated_hf

    model = load_model(hf_config(write_gated_hf(tmp_path, model_type, **extra)))
    assert model.gated and model.signed() and (model.n_layers, model.d_model, model.d_mlp) == (2, 64, 192)
    tokens, mask = batch(model)
    out = model.run(tokens, mask, [0, 1])
    assert_gated_identity(model, out, mask)
    # Independently of our normalisation and folding: the MLP module's own input and its own maps.
    seen = {}
    hooks = [
        model.model.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i in (0, 1)
    ]
    try:
        model.model(input_ids=tokens, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    valid = mask.bool()
    for i in (0, 1):
        mlp, x = model.model.layers[i].mlp, seen[i]
        torch.testing.assert_close(
            out[i].act[valid], (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))[valid], atol=1e-5, rtol=1e-4
        )
        site = model.gated_sites[i]
        folded = out[i].h if site.scale() is None else out[i].h * site.scale()
        torch.testing.assert_close(folded[valid], x[valid], atol=1e-5, rtol=1e-4)  # h is the MLP input, unweighted


def test_hf_mixture_of_experts_is_refused_by_name(tmp_path):
    from tests.conftest import write_gated_hf

    path = write_gated_hf(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    msg = r"model type 'mixtral' has mixture-of-experts MLPs \(MixtralSparseMoeBlock\)"
    with pytest.raises(ConfigError, match=msg):
        load_model(hf_config(path))


# --- TransformerLens: safetensors + config, and by name ----------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_tl_gated_safetensors_identity_and_agrees_with_hf(tmp_path, model_type):
    """A random HF model, converted by TransformerLens and folded by it, gives the HF model's h and act."""
    from tests.conftest import write_gated_hf

    hf_dir = write_gated_hf(tmp_path, model_type)
    save_file(tl_state(hf_dir, model_type), str(tmp_path / "tl.safetensors"))
    tl = load_model(
        ModelConfig(
            backend="safetensors",
            name=f"tiny-{model_type}",
            architecture=tl_arch(model_type),
            weights=str(tmp_path / "tl.safetensors"),
            tokenizer="gpt2",
            device="cpu",
        )
    )
    hf = load_model(hf_config(hf_dir))
    assert tl.gated and (tl.d_model, tl.d_mlp) == (hf.d_model, hf.d_mlp)
    tokens, mask = batch(tl)
    out, ref = tl.run(tokens, mask, [0, 1]), hf.run(tokens, mask, [0, 1])
    assert_gated_identity(tl, out, mask)
    valid = mask.bool()
    for layer in (0, 1):
        torch.testing.assert_close(out[layer].act[valid], ref[layer].act[valid], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[layer].h[valid], ref[layer].h[valid], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tl.W_in(layer), hf.W_in(layer), atol=1e-6, rtol=1e-5)  # the gate, folded
        torch.testing.assert_close(tl.W_up(layer), hf.W_up(layer), atol=1e-6, rtol=1e-5)


def test_tl_gated_by_name(monkeypatch, tmp_path):
    """load_by_name with a built Llama standing in for the download (the hub is out of reach here)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ne.models import tl
    from tests.conftest import write_gated_hf

    hf_dir = write_gated_hf(tmp_path, "llama")
    state = tl_state(hf_dir, "llama")

    def fake_from_pretrained(name, **kwargs):
        model = HookedTransformer(HookedTransformerConfig(**tl_arch("llama"), device="cpu"))
        model.load_and_process_state_dict(state, fold_ln=kwargs["fold_ln"])
        model.tokenizer = gpt2_tokenizer()
        return model

    monkeypatch.setattr(tl.HookedTransformer, "from_pretrained", fake_from_pretrained)
    model = load_model(ModelConfig(backend="transformer_lens", name="meta-llama/Llama-3.1-8B", device="cpu"))
    tokens, mask = batch(model)
    out, ref = model.run(tokens, mask, [0, 1]), load_model(hf_config(hf_dir)).run(tokens, mask, [0, 1])
    assert_gated_identity(model, out, mask)
    torch.testing.assert_close(out[1].act[mask.bool()], ref[1].act[mask.bool()], atol=1e-5, rtol=1e-4)


def test_tl_mixture_of_experts_and_output_bias_are_refused():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ne.models.tl import wrap_hooked_transformer

    arch = {**tl_arch("llama"), "d_vocab": 100}
    moe = HookedTransformer(HookedTransformerConfig(**arch, num_experts=4, experts_per_token=2, device="cpu"))
    with pytest.raises(ConfigError, match="model moe has MoE MLPs; only dense MLPs"):
        wrap_hooked_transformer(moe, "moe", gpt2_tokenizer())
    gated = HookedTransformer(HookedTransformerConfig(**arch, device="cpu"))
    with torch.no_grad():
        gated.blocks[1].mlp.b_in.fill_(0.5)
    with pytest.raises(ConfigError, match="layer 1: its GatedMLP adds a non-zero b_in"):
        wrap_hooked_transformer(gated, "biased", gpt2_tokenizer())


# --- signs and devices -----------------------------------------------------------------------------------


def test_signed_activations(tmp_path, tiny_model_cfg):
    from tests.conftest import write_tiny_model

    assert load_model(tiny_model_cfg).signed()  # GELU dips below zero
    relu = write_tiny_model(tmp_path, {**TINY_ARCH, "act_fn": "relu"})
    assert not load_model(relu).signed()


def test_more_gpus_than_visible_is_an_error(tiny_model_cfg):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the split is possible here")
    with pytest.raises(ConfigError, match=r"harvest.gpus_per_worker is 2 but this process sees \d+ CUDA GPUs"):
        load_model(dataclasses.replace(tiny_model_cfg), n_devices=2)
