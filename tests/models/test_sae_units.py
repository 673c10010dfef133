"""SAE latents as units: SAELens SAEs read through `ne.models.sae_units`, and a run on the latents of its own SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason='the SAE tests need sae-lens: pip install -e ".[test]"')

from sae_lens import (  # noqa: E402
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from ne.errors import ConfigError  # noqa: E402
from ne.lm_sae.config import LMSAEConfig, SAETrainerConfig  # noqa: E402
from ne.models import load_model  # noqa: E402
from ne.models.hooks import read_hook  # noqa: E402
from ne.models.sae_units import SAEUnits, load_sae  # noqa: E402

ARCHITECTURES = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 7}),
    "topk-rescaled": (TopKSAE, TopKSAEConfig, {"k": 7, "rescale_acts_by_decoder_norm": True}),
}


def saelens_sae(folder, kind: str, d_in: int, hook: str, seed: int = 0):
    """A random SAE of architecture `kind`, written by SAELens itself (`save_model`)."""
    cls, cfg_cls, extra = ARCHITECTURES[kind]
    torch.manual_seed(seed)
    sae = cls(cfg_cls(d_in=d_in, d_sae=48, metadata=SAEMetadata(hook_name=hook), **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
    sae.save_model(str(folder))
    return sae


def _tokens(model, n: int = 20) -> torch.Tensor:
    from pydoc_data.topics import topics

    ids = model.encode(topics["for"])[: n - 1]
    bos = [] if model.bos_token_id is None else [model.bos_token_id]
    return torch.tensor([bos + ids])


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
@pytest.mark.parametrize("backend, hook", [("tl", "blocks.1.hook_resid_pre"), ("hf", "blocks.2.hook_resid_post")])
def test_latents_equal_sae_lens_encode(tmp_path, tiny_model_cfg, kind, backend, hook):
    """act == sae.encode(x) on the residual stream captured independently, and h @ W_in + b_in is the
    pre-activation, so sum(h ⊙ w_j) + b_j is latent j's pre-activation as for an MLP neuron."""
    from ne.config import ModelConfig

    cfg = tiny_model_cfg if backend == "tl" else ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu")
    base = load_model(cfg)
    reference = saelens_sae(tmp_path, kind, base.d_model, hook)
    units = SAEUnits(base, load_sae(str(tmp_path)), str(tmp_path))
    tokens = _tokens(base)
    mask = torch.ones_like(tokens)
    if backend == "tl":
        _, cache = base.model.run_with_cache(tokens, names_filter=[hook])
        x = cache[hook]
    else:
        layer = int(hook.split(".")[1])
        x = base.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    out = units.run(tokens, mask, [units.layer])[units.layer]
    with torch.no_grad():
        torch.testing.assert_close(out.act, reference.encode(x), atol=1e-5, rtol=1e-5)
        pre = reference.process_sae_in(x) @ reference.W_enc + reference.b_enc
        if ARCHITECTURES[kind][2].get("rescale_acts_by_decoder_norm"):
            pre = pre * reference.W_dec.norm(dim=-1)
        torch.testing.assert_close(out.h @ units.W_in(units.layer) + units.b_in(units.layer), pre, atol=1e-4, rtol=1e-4)
    assert units.d_mlp == 48 and units.check_layers(None) == [int(hook.split(".")[1])]


def test_refused_architectures_and_unreachable_hooks(tmp_path, tiny_model_cfg):
    base = load_model(tiny_model_cfg)
    torch.manual_seed(0)
    GatedSAE(
        GatedSAEConfig(d_in=base.d_model, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre"))
    ).save_model(str(tmp_path / "gated"))
    with pytest.raises(
        ConfigError,
        match=r"is a 'gated' SAE; neuron embeddings need an encoder of the form "
        r"act\(h @ W_enc \+ b_enc\), which standard, jumprelu, topk SAEs have",
    ):
        load_sae(str(tmp_path / "gated"))
    saelens_sae(tmp_path / "z", "standard", base.d_model, "blocks.0.hook_nowhere")
    with pytest.raises(ConfigError, match=r"the SAE reads 'blocks.0.hook_nowhere', which tiny-gpt2 has no hook named"):
        SAEUnits(base, load_sae(str(tmp_path / "z")), "z")
    saelens_sae(tmp_path / "q", "standard", base.d_model, "blocks.0.attn.hook_q")
    with pytest.raises(
        ConfigError,
        match=r"the SAE reads blocks.0.attn.hook_q, whose activations have shape "
        r"\[\.\.\., 4, 16\] in tiny-gpt2, but its d_in is 64",
    ):
        SAEUnits(base, load_sae(str(tmp_path / "q")), "q")
    from ne.config import ModelConfig

    minilm = load_model(ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu"))
    saelens_sae(tmp_path / "mlp", "standard", minilm.d_model, "blocks.1.attn.hook_q")
    with pytest.raises(
        ConfigError,
        match=r"the SAE reads 'blocks.1.attn.hook_q', which the HFModel back end "
        r"cannot reach; it reaches blocks.L.hook_resid_pre, "
        r"blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.mlp.hook_post "
        r"for L < 6",
    ):
        SAEUnits(minilm, load_sae(str(tmp_path / "mlp")), "mlp")
    saelens_sae(tmp_path / "ok", "standard", base.d_model, "blocks.1.hook_resid_post")
    units = SAEUnits(base, load_sae(str(tmp_path / "ok")), "ok")
    with pytest.raises(
        ConfigError,
        match=r"harvest.layers is \[0\], but the SAE reads blocks.1.hook_resid_post: its "
        r"units are layer 1; set harvest.layers to \[1\] or null",
    ):
        units.check_layers([0])
    with pytest.raises(Exception, match="not a SAELens SAE directory"):
        load_sae(str(tmp_path / "nothing"))


def test_read_hook_of_tl_equals_its_own_cache(tiny_model_cfg):
    base = load_model(tiny_model_cfg)
    tokens = _tokens(base)
    _, cache = base.model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(
        read_hook(base, tokens, torch.ones_like(tokens), "blocks.1.hook_resid_post"), cache["blocks.1.hook_resid_post"]
    )


def test_a_run_on_latents_of_an_sae_trained_here(tmp_path, tiny_model_cfg):
    """Harvest, clusters, index and explain on the latents of an SAE the run trains itself; the examples'
    activations are what sae_lens computes from the SAE directory the run wrote."""
    from index.build import run_index
    from jobs.cluster import run_cluster
    from jobs.harvest import run_harvest
    from ne.config import DataConfig, HarvestConfig, RunConfig, UnitsSAEConfig
    from ne.explain import Explainer
    from ne.rundir.reader import RunData

    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        model=tiny_model_cfg,
        data=DataConfig(source="pydoc", n_ctx=32, max_contexts=32, contexts_per_part=8),
        harvest=HarvestConfig(k=8, frac=0.5, batch_size=8, num_workers=0),
        sae=UnitsSAEConfig(
            train_hook="blocks.1.hook_resid_pre",
            trainer=SAETrainerConfig(num_workers=0),
            train=LMSAEConfig(expansion=2, batch_size=64, buffer_tokens=256, l1_coeff=1e-3),
        ),
    )
    summary = run_harvest(cfg)
    assert summary.layers == [1] and summary.neurons == 128
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "run" / "sae"))
    base = load_model(tiny_model_cfg)
    data = RunData(cfg.run_dir)
    checked = 0
    for latent in data.neurons(1)[:10]:
        for e in data.neuron(1, int(latent)).examples[:3]:
            tokens = torch.as_tensor(e.tokens)[None]
            _, cache = base.model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
            act = loaded.encode(cache["blocks.1.hook_resid_pre"])[0, e.pos, int(latent)].item()
            assert e.act == pytest.approx(act, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked >= 10
    # Token importance needs nothing but the units' run(): masking a token changes the latent's activation.
    from ne.compute.importance import mask_token_id, token_importance
    from ne.models import load_units

    units = load_units(cfg)
    latent = int(data.neurons(1)[0])
    e = data.neuron(1, latent).examples[0]
    imp = token_importance(units, e.tokens, e.pos, 1, latent, mask_token_id(units), max(0, e.pos - 4))
    masked = np.array(e.tokens)
    masked[e.pos] = mask_token_id(units)
    out = units.run(torch.as_tensor(masked[: e.pos + 1])[None], torch.ones(1, e.pos + 1, dtype=torch.long), [1])
    assert imp[-1] == pytest.approx(1 - out[1].act[0, e.pos, latent].item() / e.act, rel=1e-4, abs=1e-5)
    run_cluster(cfg, in_process=True)
    run_index(cfg)
    tokens = Explainer.load(cfg.run_dir).explain("The for statement is used to iterate over a sequence.")
    assert any(u.cluster is not None for t in tokens for u in t.units)
    changed = RunConfig(**{**cfg.__dict__})
    changed.sae = UnitsSAEConfig(
        train_hook="blocks.1.hook_resid_pre",
        trainer=SAETrainerConfig(num_workers=0),
        train=LMSAEConfig(expansion=2, batch_size=64, buffer_tokens=256, l1_coeff=2e-3),
    )
    with pytest.raises(
        ConfigError,
        match=r"sae.train.l1_coeff is 0.002 in this config but was 0.001 when stage "
        r"'sae'.*--force sae",
    ):
        run_cluster(changed, in_process=True)
