"""Data-parallel arithmetic shared by every training loop, with no Ray inside.

Every worker walks the same global batches (same seed, same permutation) and takes rows `rank::world` of
each. Each worker's loss is its share of the global loss (local sum / global count) and gradients are
summed, so one worker and N workers compute the same update up to float rounding. With `world == 1` and no
process group nothing is communicated, which is how the library and its tests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        """This process's place in the initialised process group, or the single-process shard."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def rows(self, batch_idx: Tensor) -> Tensor:
        """This worker's slice of a global batch."""
        return batch_idx[self.rank :: self.world]

    def sum(self, t: Tensor) -> Tensor:
        """Sum a tensor over workers, in place, and return it."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_grads(self, module: torch.nn.Module) -> None:
        """Sum every parameter's gradient over workers (one flat all-reduce)."""
        if self.world == 1:
            return
        params = [p for p in module.parameters() if p.grad is not None]
        flat = self.sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


SINGLE = Shard()
"""The shard of a process that trains alone."""


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The global batches of one epoch: a seeded permutation of range(n), cut into batch_size pieces."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))


def build_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """`adam` and `sgd` add weight_decay × p to the gradient; `adamw` decays p apart from the gradient."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
