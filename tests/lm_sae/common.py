"""Helpers of the language-model SAE tests: real text, random SAEs, and a tiny run that trains one."""

from __future__ import annotations

import torch

from ne.compute.lm_sae import LMSAE
from ne.config import DataConfig, HarvestConfig, ModelConfig, RunConfig, UnitsSAEConfig
from ne.lm_sae.config import LMSAEConfig, SAETrainerConfig
from ne.lm_sae.train import train_sae
from ne.rundir.store import RunDir


def sample_tokens(model, n: int = 12, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contexts of real text, the second shorter (padded), BOS first where the model uses one."""
    from pydoc_data.topics import topics

    from ne.compute.harvest import pad_batch

    bos = [] if model.bos_token_id is None else [model.bos_token_id]
    ids = model.encode(topics["for"])
    return pad_batch([bos + ids[: n - 1], bos + ids[n : 2 * n - 4]][:rows], model.pad_token_id)


def random_sae(arch: str, d: int = 12, m: int = 40, seed: int = 0) -> LMSAE:
    g = torch.Generator().manual_seed(seed)
    sae = LMSAE(d, m, arch, k=5, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.3)
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(m, generator=g) * 0.2)
    return sae


def tiny_run_cfg(run_dir: str, model_cfg: ModelConfig, **train) -> RunConfig:
    train = {"architecture": "topk", "expansion": 2, "k": 8, "batch_size": 64, "buffer_tokens": 256, **train}
    return RunConfig(
        run_dir=run_dir,
        model=model_cfg,
        data=DataConfig(source="pydoc", n_ctx=32, max_contexts=48, contexts_per_part=8),
        harvest=HarvestConfig(k=8, frac=0.5, batch_size=8, num_workers=0),
        sae=UnitsSAEConfig(
            train_hook="blocks.1.hook_resid_pre",
            train=LMSAEConfig(**train),
            trainer=SAETrainerConfig(num_workers=0, checkpoint_every=3),
        ),
    )


def train_tiny(cfg: RunConfig, model, steps=12, **kwargs):
    return train_sae(
        model,
        RunDir(cfg.run_dir),
        cfg.sae.train_hook,
        cfg.sae.train,
        cfg.sae.eval.holdout_every,
        cfg.seed,
        steps,
        **kwargs,
    )
