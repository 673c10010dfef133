"""The shuffling activation buffer: batches independent of workers and of resuming; the stream of contexts."""

from __future__ import annotations

import numpy as np
import torch

from ne.compute.parallel import Shard
from ne.config import DataConfig, RunConfig
from ne.lm_sae.buffer import ActivationBuffer, ShufflePlan, StreamContext, held_out, stream_contexts, stream_rows
from ne.models import load_model
from ne.rundir.store import RunDir

torch.set_num_threads(1)  # small tensors: one thread is as fast, and stays fast on a busy machine


def fake_stream(n_contexts: int = 40, seed: int = 0) -> list[StreamContext]:
    """Contexts of 3..20 tokens (BOS first), whose row `i` has the activation (ctx_id, i, 1)."""
    g = np.random.default_rng(seed)
    out, row = [], 0
    for place in range(n_contexts):
        tokens = np.arange(int(g.integers(3, 21)))
        out.append(StreamContext(place, 1000 + place, row, tokens, 1))
        row += len(tokens) - 1
    return out


def fake_rows(contexts: list[StreamContext]) -> list[torch.Tensor]:
    return [
        torch.stack(
            [
                torch.full((c.n_rows,), float(c.ctx_id)),
                torch.arange(c.n_rows, dtype=torch.float32),
                torch.ones(c.n_rows),
            ],
            dim=1,
        )
        for c in contexts
    ]


def batches_of(stream, world: int, capacity=64, batch=16, steps=20, resume_at: int | None = None):
    """Per step, the global batch's ids and every worker's rows; with `resume_at`, each worker's buffer is
    rebuilt at that step from the plan alone, as a resumed job does."""
    plan = ShufflePlan(iter(stream), capacity, batch, seed=3, steps=steps)
    buffers = [ActivationBuffer(fake_rows, Shard(r, world), 3) for r in range(world)]
    out = []
    for step, (added, ids) in enumerate(plan):
        if resume_at is not None and step < resume_at:
            continue
        for b in buffers:
            b.add(plan.live, keep=plan.pending()) if step == resume_at else b.add(added)
            assert len(b) <= capacity + 20  # the buffer holds at most `capacity` rows and one context
        out.append((ids, [b.take(ids) for b in buffers]))
    return out


def test_buffer_batches_are_independent_of_workers_and_of_resuming():
    stream = fake_stream()
    starts = {c.ctx_id: c.first_row for c in stream}
    one = batches_of(stream, 1)
    seen = torch.cat([ids for ids, _ in one])
    assert len(one) == 20 and len(seen) == 20 * 16 and len(seen.unique()) == len(seen)  # no row twice
    for ids, (rows,) in one:  # each row is the activation of the row id it stands for
        assert torch.equal(torch.tensor([starts[int(c)] for c in rows[:, 0]]) + rows[:, 1].long(), ids)
    assert max(rows[:, 0].max() - rows[:, 0].min() for _, (rows,) in one) > 10  # batches mix far-apart contexts
    for world in (2, 3):
        for (ids, (rows,)), (ids_n, parts) in zip(one, batches_of(stream, world)):
            assert torch.equal(ids, ids_n)
            together = torch.cat(parts)
            assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, rows.tolist()))
            for r, part in enumerate(parts):  # worker r holds the contexts at places ≡ r (mod world)
                assert all((int(c) - 1000) % world == r for c in part[:, 0])
    for world, at in ((1, 7), (2, 12)):
        resumed = batches_of(stream, world, resume_at=at)
        for (ids, (rows,)), (ids_r, parts) in zip(one[at:], resumed):
            assert torch.equal(ids, ids_r)
            assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, rows.tolist()))


def test_stream_covers_each_training_context_once(tmp_path, tiny_model_cfg):
    from ne.rundir.contexts import read_contexts, write_contexts

    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        model=tiny_model_cfg,
        data=DataConfig(source="pydoc", n_ctx=16, max_contexts=60, contexts_per_part=7),
    )
    run = RunDir(cfg.run_dir)
    write_contexts(run, cfg, load_model(tiny_model_cfg))
    stream = list(stream_contexts(run, seed=5, holdout_every=4, skip=1))
    everything = [c for p in range(9) for c in read_contexts(run, p)]
    kept = [c for c, out in zip(everything, held_out(np.array([c for c, _ in everything]), 4)) if not out]
    assert sorted(c.ctx_id for c in stream) == [c for c, _ in kept] and len(kept) == 45
    assert [c.ctx_id for c in stream] != sorted(c.ctx_id for c in stream)  # shuffled
    assert [c.first_row for c in stream] == list(np.cumsum([0] + [c.n_rows for c in stream[:-1]]))
    assert stream_rows(run, 4, 1) == sum(c.n_rows for c in stream) == sum(len(t) - 1 for _, t in kept)
    assert [c.ctx_id for c in stream_contexts(run, 5, 4, 1)] == [c.ctx_id for c in stream]  # seeded
