"""Training in process: resuming to the same weights, the NE loss's late start, the settings the stage records,
the configs, and the one-line errors of bad settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ne.errors import ConfigError, DataError
from ne.lm_sae.config import LMSAEConfig, LMSAEEvalConfig, SAECompareConfig
from ne.lm_sae.train import TrainState
from ne.models import load_model
from ne.rundir.store import RunDir
from tests.conftest import MINILM
from tests.lm_sae.common import tiny_run_cfg, train_tiny

torch.set_num_threads(1)  # small tensors: one thread is as fast, and stays fast on a busy machine


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_cfg):
    """A run directory holding the tokenised corpus (48 contexts of 32 tokens) of the tiny model."""
    from ne.rundir.contexts import write_contexts

    cfg = tiny_run_cfg(str(tmp_path_factory.mktemp("corpus") / "run"), tiny_model_cfg)
    write_contexts(RunDir(cfg.run_dir), cfg, load_model(tiny_model_cfg))
    return cfg


def test_training_resumes_to_the_same_weights_and_the_ne_loss_starts_late(tiny_run, tiny):
    saved: list[TrainState] = []
    cfg = dataclasses.replace(
        tiny_run,
        sae=dataclasses.replace(tiny_run.sae, train=dataclasses.replace(tiny_run.sae.train, loss="ne", ne_start=0.5)),
    )
    sae, final = train_tiny(cfg, tiny, steps=8, checkpoint=saved.append, checkpoint_every=4)
    assert [s.step for s in saved] == [4] and final.step == 8 and final.summary()["l0"] == 8.0
    resumed, again = train_tiny(cfg, tiny, steps=8, state=TrainState.from_dict(saved[0].to_dict()))
    assert again.resumed_from == 4 and again.sums == pytest.approx(final.sums, rel=1e-5)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    # Until the NE loss switches on (step 4 of 8), it only tracks its averages: the standard SAE takes the same
    # steps, from the same initialisation on the same batches.
    plain = dataclasses.replace(
        cfg, sae=dataclasses.replace(cfg.sae, train=dataclasses.replace(cfg.sae.train, loss="none"))
    )
    _, last = train_tiny(plain, tiny, steps=8, checkpoint=saved.append, checkpoint_every=4)
    assert torch.equal(saved[0].sae["W_enc"], saved[1].sae["W_enc"])
    assert final.sums[2] > 0 and last.sums[2] == 0 and not torch.equal(final.sae["W_enc"], last.sae["W_enc"])


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_settings_are_one_line_errors(tiny_run, tiny, tmp_path):
    from jobs.harvest import run_harvest
    from jobs.lm_sae import planned_steps

    for key, value, message in [
        ("expansion", 0, r"sae.train.expansion is 0; it must be at least 1"),
        ("k", 0, r"sae.train.k is 0; it must be at least 1"),
        (
            "buffer_tokens",
            32,
            r"sae.train.buffer_tokens \(32\) is smaller than sae.train.batch_size \(64\): the "
            r"buffer must hold a whole batch",
        ),
        ("ne_start", 1.0, r"sae.train.ne_start is 1.0; it is a fraction of the steps in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LMSAEConfig(**{"batch_size": 64, key: value})
    with pytest.raises(ConfigError, match=r"sae.eval.holdout_every is 1, which holds out every context"):
        LMSAEEvalConfig(holdout_every=1)
    with pytest.raises(ConfigError, match=r"sae.compare.seeds is set but sae.compare.ne_coeffs is empty"):
        SAECompareConfig(seeds=[0])
    with pytest.raises(
        ConfigError,
        match=r"sae.train.k is 200 but the SAE has only 128 latents \(expansion 2 × 64, "
        r"the width of blocks.1.hook_resid_pre\); lower k or raise expansion",
    ):
        LMSAEConfig(architecture="topk", expansion=2, k=200).check_width(64, "blocks.1.hook_resid_pre")
    long = tiny_run_cfg(tiny_run.run_dir, tiny_run.model, train_tokens=10**6)
    with pytest.raises(
        DataError,
        match=r"sae.train.train_tokens is 1,000,000 but the corpus gives 1,3\d\d training "
        r"tokens \(BOS excluded",
    ):
        planned_steps(RunDir(tiny_run.run_dir), long, tiny)
    lacking = dataclasses.replace(
        tiny_run,
        run_dir=str(tmp_path / "run"),
        sae=dataclasses.replace(tiny_run.sae, train_hook="blocks.1.hook_nothing"),
    )
    with pytest.raises(
        ConfigError,
        match=r"^sae.train_hook is 'blocks.1.hook_nothing', which tiny-gpt2 has no hook "
        r"named",
    ):
        run_harvest(lacking)
    from ne.lm_sae.train import hook_width

    with pytest.raises(
        ConfigError,
        match=r"sae.train_hook is 'blocks.0.attn.hook_q', whose activations have shape "
        r"\[batch, pos, 4, 16\] in tiny-gpt2; an SAE reads one vector per token",
    ):
        hook_width(tiny, "blocks.0.attn.hook_q")


def test_the_sae_stage_records_only_settings_that_change_the_sae():
    from ne.rundir.graph import GRAPH
    from ne.rundir.stages import settings_of

    base = tiny_run_cfg("run", MINILM)  # TopK, no NE loss

    def recorded(**train):
        sae = dataclasses.replace(base.sae, train=dataclasses.replace(base.sae.train, **train))
        return settings_of(dataclasses.replace(base, sae=sae), GRAPH["sae"].settings)

    assert recorded(ne_coeff=5.0) == recorded(l1_coeff=0.5) == recorded(contexts_per_batch=3) == recorded()
    assert recorded(k=4) != recorded() != recorded(loss="ne") != recorded(loss="ne", ne_coeff=5.0)
    assert recorded(architecture="standard", l1_coeff=0.5) != recorded(architecture="standard")


def test_configs_load_strictly():
    from ne.config import load_config
    from tests.conftest import REPO

    for name in ("lm-sae.yaml", "lm-sae-gpt2.yaml", "sae-demo.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.sae.train_hook
    assert load_config(REPO / "configs" / "lm-sae.yaml").sae.compare.active
