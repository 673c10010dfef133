"""The activation stream and its shuffling buffer.

The stream is the run's contexts in a seeded order (the parts shuffled, then the contexts of each part), less
the held-out ones; a context gives one row per token (BOS excluded), and row ids number the stream's rows.

The buffer holds up to `capacity` rows (plus at most one context): it fills up, shuffles what it holds, emits
the first half as batches and keeps the rest, so rows from far apart in the stream share batches. Which row
lands in which batch (`ShufflePlan`) depends on the stream, the seed, the capacity and the batch size, never on
the number of workers. Worker r of N computes the activations of the contexts at stream places ≡ r (mod N)
only and takes its rows of every global batch (`ActivationBuffer`): the union of the workers' rows is the
one-worker batch, and the model's forward passes are split between the workers.

Resuming at step s needs no stored activations: the plan is replayed up to s (row ids only) and the activations
of the rows still pending are recomputed from their contexts, which the plan keeps while any of their rows is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from jaxtyping import Float
from torch import Tensor

from ne import schema
from ne.compute.harvest import pad_batch
from ne.compute.parallel import Shard
from ne.errors import DataError
from ne.models.base import UnitModel
from ne.models.hooks import read_hook
from ne.rundir.contexts import context_parts, read_contexts
from ne.rundir.store import RunDir


@dataclass
class StreamContext:
    place: int
    """Its place in the stream: worker place % N computes its activations."""
    ctx_id: int
    first_row: int
    """Row id of its first row: its rows are first_row .. first_row + n_rows - 1."""
    tokens: np.ndarray
    skip: int
    """Leading tokens that give no row (the BOS token)."""

    @property
    def n_rows(self) -> int:
        return len(self.tokens) - self.skip


def held_out(ctx_ids: np.ndarray, every: int) -> np.ndarray:
    """Which contexts the evaluation keeps for itself: ctx_id % every == every - 1 (none when every is 0)."""
    return (ctx_ids % every == every - 1) if every else np.zeros(len(ctx_ids), dtype=bool)


def _generator(seed: int, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sum(s * 7919**i for i, s in enumerate(salt, 1)))


def stream_contexts(run: RunDir, seed: int, holdout_every: int, skip: int) -> Iterator[StreamContext]:
    """The training stream's contexts in order, one part in memory at a time."""
    parts = context_parts(run)
    place = row = 0
    for p in torch.randperm(len(parts), generator=_generator(seed)).tolist():
        contexts = read_contexts(run, parts[p])
        out = held_out(np.array([c for c, _ in contexts], dtype=np.int64), holdout_every)
        for i in torch.randperm(len(contexts), generator=_generator(seed, parts[p] + 1)).tolist():
            ctx_id, tokens = contexts[i]
            if out[i] or len(tokens) <= skip:
                continue
            yield StreamContext(place, ctx_id, row, tokens, skip)
            place += 1
            row += len(tokens) - skip


def stream_rows(run: RunDir, holdout_every: int, skip: int) -> int:
    """Rows in the training stream, read from the contexts' lengths part by part."""
    total = 0
    for part in context_parts(run):
        table = run.read_parquet(f"{schema.CONTEXTS_DIR}/{schema.part_name(part)}", columns=["ctx_id", "tokens"])
        lengths = pc.list_value_length(table.column("tokens")).to_numpy()
        keep = ~held_out(table.column("ctx_id").to_numpy(), holdout_every)
        total += int(np.clip(lengths[keep] - skip, 0, None).sum())
    return total


class ShufflePlan:
    """The global batches as row ids, step by step: `for added, ids in plan` gives each step's batch and the
    contexts that entered the buffer just before it (at the first batch after a fill; else none)."""

    def __init__(self, contexts: Iterable[StreamContext], capacity: int, batch_size: int, seed: int, steps: int):
        self.contexts, self.capacity, self.batch_size = iter(contexts), capacity, batch_size
        self.seed, self.steps = seed, steps
        self.live: list[StreamContext] = []
        """Contexts with a row still held or pending, in stream order."""
        self._pending: list[Tensor] = []

    def pending(self) -> Tensor:
        """Row ids not yet consumed: the batch just given, the fill's later batches and the rows held."""
        return torch.cat(self._pending).sort().values

    def __iter__(self) -> Iterator[tuple[list[StreamContext], Tensor]]:
        held = torch.empty(0, dtype=torch.long)
        step = fill = 0
        exhausted = False
        while step < self.steps:
            added: list[StreamContext] = []
            size = len(held)
            while size < self.capacity and not exhausted:
                context = next(self.contexts, None)
                if context is None:
                    exhausted = True
                else:
                    added.append(context)
                    size += context.n_rows
            held = torch.cat([held, *(torch.arange(c.first_row, c.first_row + c.n_rows) for c in added)])
            held = held[torch.randperm(len(held), generator=_generator(self.seed, fill, 1))]
            n = len(held) // self.batch_size if exhausted else max(1, len(held) // 2 // self.batch_size)
            n = min(n, self.steps - step)
            if n == 0:  # the driver checks the stream's length first: a worker that finds it shorter reads elsewhere
                raise DataError(
                    f"the activation stream ran out at step {step} of {self.steps}; every worker must "
                    "read the same run directory (a URL, or a file system every node shares)"
                )
            batches = list(held[: n * self.batch_size].split(self.batch_size))
            held = held[n * self.batch_size :]
            self._keep_live(added, [held, *batches])
            for i, ids in enumerate(batches):
                self._pending = [*batches[i:], held]
                yield (added if i == 0 else []), ids
            step += n
            fill += 1

    def _keep_live(self, added: list[StreamContext], pending: list[Tensor]) -> None:
        contexts = self.live + added
        starts = torch.tensor([c.first_row for c in contexts], dtype=torch.long)
        used = torch.zeros(len(contexts), dtype=torch.bool)
        used[torch.searchsorted(starts, torch.cat(pending), right=True) - 1] = True
        self.live = [c for c, u in zip(contexts, used.tolist()) if u]


class ActivationBuffer:
    """This worker's rows of the buffer: the activations of its own contexts, by row id."""

    def __init__(
        self,
        compute: Callable[[list[StreamContext]], list[Tensor]],
        shard: Shard,
        d_in: int,
        device: torch.device | str = "cpu",
    ):
        self.compute, self.shard = compute, shard
        self.ids = torch.empty(0, dtype=torch.long, device=device)
        self.rows: Float[Tensor, "n d"] = torch.empty(0, d_in, device=device)
        self.used = torch.zeros(0, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return int((~self.used).sum())

    def add(self, contexts: list[StreamContext], keep: Tensor | None = None) -> None:
        """Compute and hold the rows of this worker's contexts among `contexts` (only those in `keep`, if given)."""
        mine = [c for c in contexts if c.place % self.shard.world == self.shard.rank]
        live = ~self.used
        ids, rows = self.ids[live], self.rows[live]  # rows already taken are dropped here, once per fill
        if mine:
            new_ids = torch.cat([torch.arange(c.first_row, c.first_row + c.n_rows) for c in mine]).to(ids.device)
            new_rows = torch.cat(self.compute(mine)).to(rows.device, rows.dtype)
            if keep is not None:
                wanted = torch.isin(new_ids, keep.to(ids.device))
                new_ids, new_rows = new_ids[wanted], new_rows[wanted]
            ids, rows = torch.cat([ids, new_ids]), torch.cat([rows, new_rows])
        self.ids, self.rows = ids, rows
        self.used = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)

    def take(self, batch: Tensor) -> Float[Tensor, "n d"]:
        """This worker's rows of a global batch, in batch order."""
        if not len(self.ids):
            return self.rows[:0]
        batch = batch.to(self.ids.device)
        pos = torch.searchsorted(self.ids, batch).clamp_(max=len(self.ids) - 1)
        pos = pos[self.ids[pos] == batch]
        self.used[pos] = True
        return self.rows[pos]


@torch.no_grad()
def hook_rows(model: UnitModel, hook: str, contexts: list[StreamContext], per_batch: int) -> list[Tensor]:
    """Each context's activations at `hook`, one row per token after its skipped ones, as float32."""
    out = []
    for start in range(0, len(contexts), per_batch):
        chunk = contexts[start : start + per_batch]
        tokens, mask = pad_batch([c.tokens for c in chunk], model.pad_token_id)
        x = read_hook(model, tokens, mask, hook).float()
        out += [x[j, c.skip : len(c.tokens)] for j, c in enumerate(chunk)]
    return out
