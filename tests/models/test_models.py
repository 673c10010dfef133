"""Every back end: act == act_fn(h @ W_in + b_in) on a real forward pass, checked against independent runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from ne.compute.device import resolve_device
from ne.compute.harvest import pad_batch
from ne.config import ModelConfig
from ne.errors import ConfigError, DataError
from ne.models import load_model, load_token_decoder
from ne.models.tokenizers import gpt2_tokenizer
from tests.conftest import TINY_ARCH, gpt2_state_dict

TEXTS = ["The cat sat on the mat, and then it slept.", "Neurons fire for many reasons!"]


def batch(model, texts=TEXTS):
    prefix = [] if model.bos_token_id is None else [model.bos_token_id]
    return pad_batch([prefix + model.encode(t) for t in texts], model.pad_token_id)


def assert_identity(model, out, mask, atol=1e-5):
    """act == act_fn(h @ W_in + b_in) on every real (unpadded) position."""
    valid = mask.bool()
    for layer, o in out.items():
        assert o.h.shape[-1] == model.d_model and o.act.shape[-1] == model.d_mlp
        ref = model.act_fn(o.h @ model.W_in(layer) + model.b_in(layer))
        torch.testing.assert_close(o.act[valid], ref[valid], atol=atol, rtol=1e-4)


def unfolded_tl(state, arch=TINY_ARCH):
    """The same weights in TransformerLens with no processing at all: the reference for folding."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**arch, device="cpu"))
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model


# --- hf: MiniLM ---------------------------------------------------------------------------------------


def test_minilm_identity_and_h_is_the_mlp_input(minilm):
    tokens, mask = batch(minilm)
    assert tokens[0, 0] == minilm.bos_token_id == 101  # [CLS]
    assert (minilm.n_layers, minilm.d_model, minilm.d_mlp, minilm.n_ctx_max) == (6, 384, 1536, 512)
    out = minilm.run(tokens, mask, list(range(6)))
    assert_identity(minilm, out, mask)
    # Independent check: BERT's own layer output is LayerNorm(act @ W_out + b_out + residual), where the
    # residual is the attention LayerNorm's output γ ⊙ h + β (h is that LayerNorm's normalised input).
    hidden = minilm.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = mask.bool()
    for layer, o in out.items():
        norm = minilm.model.encoder.layer[layer].attention.output.LayerNorm
        residual = o.h * norm.weight + norm.bias
        assert o.h[valid].mean(-1).abs().max() < 1e-4 and (o.h[valid].var(-1, unbiased=False) - 1).abs().max() < 1e-2
        block_out = minilm.model.encoder.layer[layer].output(o.act, residual)
        torch.testing.assert_close(block_out[valid], hidden[layer + 1][valid], atol=1e-5, rtol=1e-4)


def test_minilm_padding_does_not_change_valid_positions(minilm):
    tokens, mask = batch(minilm)
    assert not mask.all()
    padded = minilm.run(tokens, mask, [0, 5])
    for row in range(len(TEXTS)):
        n = int(mask[row].sum())
        alone = minilm.run(tokens[row : row + 1, :n], mask[row : row + 1, :n], [0, 5])
        for layer in (0, 5):
            torch.testing.assert_close(padded[layer].act[row, :n], alone[layer].act[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(padded[layer].h[row, :n], alone[layer].h[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["minilm", "tiny"])
def test_run_returns_only_requested_layers_and_stops_early(which, request):
    model = request.getfixturevalue(which)
    blocks = model.model.encoder.layer if which == "minilm" else model.model.blocks
    calls = []
    handle = blocks[-1].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        tokens, mask = batch(model)
        assert list(model.run(tokens, mask, [0])) == [0]
        assert calls == []  # the last block never started
        assert sorted(model.run(tokens, mask, [model.n_layers - 1, 0])) == [0, model.n_layers - 1]
        assert calls == [1]
    finally:
        handle.remove()


def test_layer_out_of_range(minilm):
    tokens, mask = batch(minilm)
    with pytest.raises(ConfigError, match="layer 6, but all-MiniLM-L6-v2 has layers 0..5"):
        minilm.run(tokens, mask, [6])


def test_hf_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not a local Hugging Face model directory"):
        load_model(ModelConfig(backend="hf", name=str(tmp_path / "nope"), device="cpu"))


# --- safetensors / TransformerLens ---------------------------------------------------------------------


def test_safetensors_identity_and_folding_matches_unfolded_model(tiny, tiny_model_cfg):
    assert (tiny.n_layers, tiny.d_model, tiny.d_mlp, tiny.n_ctx_max) == (2, 64, 256, 128)
    assert tiny.bos_token_id == tiny.pad_token_id == 50256
    assert tiny.encode("Hello world") == [15496, 995]
    tokens, mask = batch(tiny)
    out = tiny.run(tokens, mask, [0, 1])
    assert_identity(tiny, out, mask)
    # h is the normalised input of W_in: LayerNorm's weight and bias live in W_in/b_in now.
    valid = mask.bool()
    for o in out.values():
        h = o.h[valid]
        torch.testing.assert_close(h.mean(-1), torch.zeros(len(h)), atol=1e-5, rtol=0)
        torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(len(h)), atol=1e-3, rtol=0)
    # Same activations as the unprocessed model, computed by TransformerLens's own cache.
    ref = unfolded_tl(load_file(tiny_model_cfg.weights))
    _, cache = ref.run_with_cache(tokens, attention_mask=mask)
    for layer, o in out.items():
        torch.testing.assert_close(o.act[valid], cache[f"blocks.{layer}.mlp.hook_post"][valid], atol=1e-5, rtol=1e-4)


def test_bfloat16(tiny_model_cfg):
    model = load_model(dataclasses.replace(tiny_model_cfg, dtype="bfloat16"))
    tokens, mask = batch(model)
    out = model.run(tokens, mask, [1])
    assert out[1].act.dtype == model.W_in(1).dtype == torch.bfloat16
    assert_identity(model, out, mask, atol=0.05)


def test_by_name_wrapping(monkeypatch, tiny_model_cfg):
    """load_by_name with a built model standing in for the download: the path from_pretrained's result takes."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ne.models import tl

    state = load_file(tiny_model_cfg.weights)
    calls = {}

    def fake_from_pretrained(name, **kwargs):
        calls.update(kwargs, name=name)
        model = HookedTransformer(HookedTransformerConfig(**TINY_ARCH, device="cpu"))
        model.load_and_process_state_dict(state, fold_ln=kwargs["fold_ln"])
        model.tokenizer = gpt2_tokenizer()
        return model

    monkeypatch.setattr(tl.HookedTransformer, "from_pretrained", fake_from_pretrained)
    model = load_model(ModelConfig(backend="transformer_lens", name="gpt2-small", device="cpu"))
    assert calls["name"] == "gpt2" and calls["fold_ln"] is True
    tokens, mask = batch(model)
    out = model.run(tokens, mask, [0, 1])
    assert_identity(model, out, mask)
    _, cache = unfolded_tl(state).run_with_cache(tokens, attention_mask=mask)
    torch.testing.assert_close(
        out[1].act[mask.bool()], cache["blocks.1.mlp.hook_post"][mask.bool()], atol=1e-5, rtol=1e-4
    )


def test_unfolded_model_is_refused():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ne.models.tl import wrap_hooked_transformer

    model = HookedTransformer(HookedTransformerConfig(**{**TINY_ARCH, "d_vocab": 100}, device="cpu"))
    with pytest.raises(ConfigError, match="normalization_type 'LN'.*fold_ln=True"):
        wrap_hooked_transformer(model, "raw", gpt2_tokenizer())


def test_unknown_model_name_suggests_close_matches():
    msg = r"model.name 'gpt2-smal' is not a TransformerLens model; did you mean .*gpt2-small"
    with pytest.raises(ConfigError, match=msg):
        load_model(ModelConfig(backend="transformer_lens", name="gpt2-smal", device="cpu"))


def test_bad_weights_files(tmp_path, tiny_model_cfg):
    def load(path):
        return load_model(dataclasses.replace(tiny_model_cfg, weights=str(path)))

    with pytest.raises(DataError, match=r"model.weights file '.*missing.safetensors' does not exist"):
        load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(DataError, match="is not a valid safetensors file"):
        load(tmp_path / "junk.safetensors")
    state = gpt2_state_dict(TINY_ARCH)
    state["blocks.0.mlp.W_inn"] = state.pop("blocks.0.mlp.W_in")
    state["blocks.1.mlp.b_in"] = torch.zeros(7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        DataError,
        match=r"missing tensors: blocks.0.mlp.W_in; unknown tensors: blocks.0.mlp.W_inn; "
        r"wrong shapes: blocks.1.mlp.b_in \(7,\) \(expected \(256,\)\)",
    ):
        load(tmp_path / "bad.safetensors")


def test_bad_architecture_and_tokenizer(tiny_model_cfg):
    with pytest.raises(ConfigError, match="d_vocab is 1000 but tokenizer 'gpt2' has 50257 tokens"):
        load_model(dataclasses.replace(tiny_model_cfg, architecture={**TINY_ARCH, "d_vocab": 1000}))
    with pytest.raises(ConfigError, match="not a valid HookedTransformerConfig.*n_layerz"):
        load_model(dataclasses.replace(tiny_model_cfg, architecture={**TINY_ARCH, "n_layerz": 2}))
    with pytest.raises(ConfigError, match="model.tokenizer is 'gpt3'"):
        load_model(dataclasses.replace(tiny_model_cfg, tokenizer="gpt3"))


# --- hf: GPT-2 ------------------------------------------------------------------------------------------


def test_hf_gpt2_identity_and_agrees_with_transformer_lens(tmp_path):
    """A random HF GPT-2 through the hf back end, and its TL conversion through the safetensors back end."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    arch = {**TINY_ARCH, "n_ctx": 64}
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    gpt2_tokenizer().save_pretrained(tmp_path / "hf")
    model = load_model(ModelConfig(backend="hf", name=str(tmp_path / "hf"), device="cpu"))
    assert (model.n_layers, model.d_model, model.d_mlp, model.n_ctx_max) == (2, 64, 256, 64)
    assert model.bos_token_id == model.pad_token_id == 50256
    tokens, mask = batch(model)
    out = model.run(tokens, mask, [0, 1])
    assert_identity(model, out, mask)

    state = convert_gpt2_weights(hf, HookedTransformerConfig(**arch))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "gpt2.safetensors"))
    tl_model = load_model(
        ModelConfig(
            backend="safetensors",
            name="gpt2-random",
            architecture=arch,
            weights=str(tmp_path / "gpt2.safetensors"),
            tokenizer="gpt2",
            device="cpu",
        )
    )
    tl_out = tl_model.run(tokens, mask, [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(tl_out[layer].act[mask.bool()], out[layer].act[mask.bool()], atol=1e-5, rtol=1e-4)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="model.device is 'tpu0'"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device is 'cuda:1' but this machine has no CUDA GPU"):
            resolve_device("cuda:1")


# --- tokenizers alone, for display ------------------------------------------------------------------------


def _no_weights(monkeypatch):
    """Loading any weights fails the test: decoding must need the tokenizer only."""
    import transformers
    from transformer_lens import HookedTransformer

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(HookedTransformer, "from_pretrained", refuse)
    monkeypatch.setattr(HookedTransformer, "__init__", refuse)


@pytest.mark.parametrize("which", ["minilm", "tiny"])
def test_token_decoder_matches_the_model_without_loading_weights(which, request, monkeypatch, tiny_model_cfg):
    model = request.getfixturevalue(which)
    cfg = tiny_model_cfg if which == "tiny" else ModelConfig(backend="hf", name="all-MiniLM-L6-v2")
    ids = batch(model)[0][0].tolist()
    _no_weights(monkeypatch)
    assert load_token_decoder(cfg)(ids) == model.decode_tokens(ids)


def test_token_decoder_by_name(monkeypatch):
    """GPT-2 family names decode with the offline BPE; other names ask the hub (or its cache) for the tokenizer."""
    import transformers

    asked = []
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: asked.append(name) or gpt2_tokenizer()
    )
    _no_weights(monkeypatch)
    ids = gpt2_tokenizer()("Hello world, again")["input_ids"]
    assert (
        "".join(load_token_decoder(ModelConfig(backend="transformer_lens", name="gpt2-small"))(ids))
        == "Hello world, again"
    )
    assert asked == []
    load_token_decoder(ModelConfig(backend="transformer_lens", name="pythia-70m"))
    assert asked == ["EleutherAI/pythia-70m"]
