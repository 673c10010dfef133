"""Training an SAE on a model's activations streamed from a run's corpus: the loop every worker runs.

Each step takes this worker's rows of the global batch from the shuffling buffer (`ne.lm_sae.buffer`),
computes its share of the global loss (local sums over global counts) and sums gradients over the workers
(`ne.compute.parallel.Shard`, one all-reduce), so one worker and N workers take the same steps up to float rounding.
The activation scale and b_dec's initial value come from the first fill of the buffer, summed over the workers.
A checkpoint (`TrainState`) holds the step, the parameters, Adam's state, the NE loss's running averages and the
scale; resuming from one replays the buffer's plan and recomputes the pending rows, so a resumed run takes the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from ne.compute.lm_sae import LMSAE, init_sae, sae_from_state
from ne.compute.parallel import SINGLE, Shard
from ne.compute.sae import NeuronEmbeddingLoss
from ne.errors import ConfigError
from ne.lm_sae.buffer import ActivationBuffer, ShufflePlan, hook_rows, stream_contexts
from ne.lm_sae.config import LMSAEConfig
from ne.models.base import UnitModel
from ne.models.hooks import read_hook
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

LOSSES = ("mse", "sparsity", "l_n", "l0")


@dataclass
class TrainState:
    step: int
    """Optimiser steps taken."""
    sae: dict[str, Tensor]
    opt: dict
    scale: float
    """Training sees activations × scale (mean norm sqrt(d_in) over the first fill)."""
    ne: dict[str, Tensor] | None = None
    """The NE loss's running averages, with loss `ne`."""
    sums: list[float] = field(default_factory=lambda: [0.0] * len(LOSSES))
    """Sums over steps of each of LOSSES (global batch means), for the summary."""
    seconds: float = 0.0
    """Training time, summed over every attempt."""
    resumed_from: int = 0
    """The step this attempt started from (0 unless it resumed from a checkpoint)."""

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**d)

    def summary(self) -> dict[str, float]:
        """Mean of every loss term over the steps taken, the scale and the step count."""
        n = max(self.step, 1)
        return {
            **{k: v / n for k, v in zip(LOSSES, self.sums)},
            "scale": self.scale,
            "steps": self.step,
            "resumed_from": self.resumed_from,
        }


def hook_width(model: UnitModel, hook: str) -> int:
    """The activation width at `hook`, from a one-token forward pass; an SAE reads one vector per token."""
    token = model.bos_token_id if model.bos_token_id is not None else model.pad_token_id
    probe = torch.tensor([[token]])
    shape = read_hook(model, probe, torch.ones_like(probe), hook).shape
    if len(shape) != 3:
        raise ConfigError(
            f"sae.train_hook is {hook!r}, whose activations have shape [batch, pos, "
            f"{', '.join(map(str, shape[2:]))}] in {model.name}; an SAE reads one vector per token, so "
            "choose a hook of shape [batch, pos, d] (residual stream, MLP output or neurons)"
        )
    return int(shape[-1])


def sae_step(
    sae: LMSAE,
    opt: torch.optim.Optimizer,
    x: Float[Tensor, "n d"],
    n_global: int,
    cfg: LMSAEConfig,
    ne_loss: NeuronEmbeddingLoss | None,
    ne_on: bool,
    shard: Shard,
) -> Tensor:
    """One optimiser step on this worker's rows `x` of a global batch of `n_global`; returns the global batch's
    loss terms (LOSSES), summed over the workers."""
    pre = sae.pre_acts(x)
    f = sae.activate(pre)
    mse = (sae.decode(f) - x).square().sum() / (n_global * x.shape[1])
    sparsity = sae.sparsity(pre, f, n_global, cfg)
    loss = mse + sparsity
    l_n = x.new_zeros(())
    if ne_loss is not None:
        ne_loss.update(sae, x, f.detach(), shard)
        if ne_on:
            l_n = ne_loss(sae, x, f, shard)
            loss = loss + cfg.ne_coeff * l_n
    opt.zero_grad(set_to_none=False)
    loss.backward()
    shard.sum_grads(sae)
    opt.step()
    sae.constrain()
    terms = torch.stack([mse.detach(), sparsity.detach(), l_n.detach(), (f > 0).sum() / n_global])
    return shard.sum(terms)


def first_fill_stats(rows: Float[Tensor, "n d"], shard: Shard) -> tuple[float, Float[Tensor, " d"]]:
    """(scale, mean of the scaled rows) over every worker's rows of the first fill: scale makes the mean
    norm sqrt(d)."""
    packed = shard.sum(
        torch.cat(
            [
                rows.double().sum(0),
                rows.double().norm(dim=1).sum()[None],
                rows.new_tensor([len(rows)], dtype=torch.float64),
            ]
        )
    )
    total, norms, n = packed[:-2], packed[-2], packed[-1]
    scale = float(math.sqrt(rows.shape[1]) * n / norms)
    return scale, (total / n * scale).to(rows.dtype)


def _resumed(cfg: LMSAEConfig, state: TrainState | None, device):
    """The SAE, its optimizer and NE loss as `state` left them; all None without a state (built at step 0)."""
    if state is None:
        return None, None, None
    sae, opt, ne_loss = _build(cfg, sae_from_state(cfg, state.sae), device)
    opt.load_state_dict(state.opt)
    if ne_loss is not None and state.ne is not None:
        ne_loss.load_state_dict(state.ne)
    return sae, opt, ne_loss


def train_sae(
    model: UnitModel,
    run: RunDir,
    hook: str,
    cfg: LMSAEConfig,
    holdout_every: int,
    seed: int,
    steps: int,
    shard: Shard = SINGLE,
    state: TrainState | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 100,
    device: torch.device | str = "cpu",
) -> tuple[LMSAE, TrainState]:
    """Train (or resume from `state`) an SAE on `model`'s activations at `hook` for `steps` steps; `checkpoint`
    is called with the state every `checkpoint_every` steps (not after the last)."""
    t0 = time.time()
    skip = int(model.bos_token_id is not None)
    plan = ShufflePlan(stream_contexts(run, seed, holdout_every, skip), cfg.buffer_tokens, cfg.batch_size, seed, steps)
    buffer = ActivationBuffer(
        lambda cs: hook_rows(model, hook, cs, cfg.contexts_per_batch), shard, hook_width(model, hook), device
    )
    ne_start = math.ceil(cfg.ne_start * steps)
    sae, opt, ne_loss = _resumed(cfg, state, device)
    start = state.step if state is not None else 0
    sums = torch.tensor(state.sums if state else [0.0] * len(LOSSES), dtype=torch.float64)
    scale = state.scale if state is not None else 0.0
    seconds = state.seconds if state is not None else 0.0

    def current(step: int) -> TrainState:
        assert sae is not None and opt is not None, "built at the first step"
        return TrainState(
            step,
            {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()},
            copy.deepcopy(opt.state_dict()),
            scale,
            {k: v.cpu().clone() for k, v in ne_loss.state_dict().items()} if ne_loss else None,
            sums.tolist(),
            seconds + time.time() - t0,
            start,
        )

    for step, (added, ids) in enumerate(plan):
        if step < start:
            continue
        if step == start and state is not None:
            buffer.add(plan.live, keep=plan.pending())
        elif added:
            buffer.add(added)
        if sae is None:
            scale, mean = first_fill_stats(buffer.rows, shard)
            sae, opt, ne_loss = _build(cfg, init_sae(cfg, mean, torch.Generator().manual_seed(seed)), device)
        assert opt is not None
        x = buffer.take(ids) * scale
        sums += sae_step(sae, opt, x, len(ids), cfg, ne_loss, step >= ne_start, shard).double().cpu()
        if (step + 1) % max(1, steps // 10) == 0 and shard.rank == 0:
            log.info(
                "SAE step %d/%d: %s",
                step + 1,
                steps,
                {k: round(float(v) / (step + 1), 5) for k, v in zip(LOSSES, sums)},
            )
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(current(step + 1))
    assert sae is not None, "a plan has at least one step"
    return sae, current(steps)


def _build(cfg: LMSAEConfig, sae: LMSAE, device) -> tuple[LMSAE, torch.optim.Optimizer, NeuronEmbeddingLoss | None]:
    sae = sae.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    ne_loss = None
    if cfg.loss == "ne":
        m, d = sae.W_enc.shape
        ne_loss = NeuronEmbeddingLoss(m, d, cfg.ne_momentum).to(device)
    return sae, opt, ne_loss
