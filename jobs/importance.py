"""The importance job: token importance of every example of a run, precomputed for the viewer.

Ray actors, each with one model replica, take one batch of neurons of one layer at a time and write
`importance/layer=L/part-B.parquet` (schema `ne.schema.IMPORTANCE`), with importance for the
`viewer.window_before` tokens before each key token and the key token itself. A part is written atomically,
so a rerun after an interruption computes only the missing parts; the stage "importance" is marked done
in the manifest at the end. Other settings (model, masking token, window, neurons) start afresh.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm.auto import tqdm

from jobs.ray_utils import init_ray, model_actor_options, run_on_actors
from ne import schema
from ne.config import RunConfig, to_dict
from ne.errors import DataError
from ne.importance import mask_token_id, token_importance
from ne.models import load_model
from ne.store import RunDir, fingerprint
from ne.viewer.data import RunData

log = logging.getLogger(__name__)

STAGE = "importance"


@dataclass(frozen=True)
class Batch:
    layer: int
    index: int
    neurons: tuple[int, ...]

    @property
    def file(self) -> str:
        return f"{schema.layer_dir(schema.IMPORTANCE_DIR, self.layer)}/{schema.part_name(self.index)}"


@ray.remote
class ImportanceWorker:
    def __init__(self, cfg: RunConfig, threads: int):
        torch.set_num_threads(threads)
        self.model = load_model(cfg.model)
        self.mask = mask_token_id(self.model, cfg.viewer.mask_token)
        self.before = cfg.viewer.window_before
        self.data = RunData(cfg.run_dir)

    def run(self, batch: Batch) -> int:
        table = importance_table(self.data, self.model, batch, self.mask, self.before)
        self.data.run.write_parquet(batch.file, table)
        return table.num_rows


def importance_table(data: RunData, model, batch: Batch, mask: int, before: int) -> pa.Table:
    """Importance of every example of the batch's neurons, sorted by neuron then rank."""
    rows = {name: [] for name in schema.IMPORTANCE.names}
    for neuron in batch.neurons:
        for e in data.neuron(batch.layer, neuron).examples:
            start = max(0, e.pos - before)
            values = token_importance(model, e.tokens, e.pos, batch.layer, neuron, mask, start)
            for name, value in zip(schema.IMPORTANCE.names,
                                   (batch.layer, neuron, e.rank, e.ctx_id, e.pos, start, values.tolist())):
                rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=schema.IMPORTANCE)


@dataclass
class ImportanceSummary:
    run_dir: str
    examples: int
    seconds: float

    def describe(self) -> str:
        return (f"importance done in {self.seconds:.1f} s: {self.examples} examples\n"
                f"outputs: {self.run_dir}/{schema.IMPORTANCE_DIR}/")


def run_importance(
    cfg: RunConfig, layers: list[int] | None = None, neurons: list[int] | None = None, neurons_per_task: int = 64,
    force: list[str] | tuple = (),
) -> ImportanceSummary:
    """Precompute (or resume) token importance for `layers` (default: all) and `neurons` (default: all)."""
    start = time.perf_counter()
    run = RunDir(cfg.run_dir)
    data = RunData(cfg.run_dir)
    examples = run.stage("examples")
    if not examples or examples.get("status") != "done":
        raise DataError(f"{run.url} has no finished harvest; run `ne harvest` with run_dir {run.url} first")
    have = data.layers()
    layers = have if layers is None else layers
    missing = sorted(set(layers) - set(have))
    if missing:
        raise DataError(f"layers {missing} are not in {run.url}; it has layers {have}")
    fp = fingerprint(examples["fingerprint"], to_dict(cfg.model), cfg.viewer.mask_token, cfg.viewer.window_before,
                     layers, neurons)
    entry = run.stage(STAGE)
    if STAGE in force or (entry and entry.get("fingerprint") != fp):
        run.remove(schema.IMPORTANCE_DIR)  # parts of other settings must not be mixed in
        run.mark(STAGE, "forced", "")
    if not run.is_done(STAGE, fp):
        run.mark(STAGE, "running", fp)
        batches = []
        for layer in layers:
            ids = [int(n) for n in data.neurons(layer) if neurons is None or int(n) in set(neurons)]
            for i in range(0, len(ids), neurons_per_task):
                batches.append(Batch(layer, i // neurons_per_task, tuple(ids[i : i + neurons_per_task])))
        todo = [b for b in batches if not run.exists(b.file)]
        _map(cfg, todo)
        rows = 0
        for b in batches:
            with run.fs.open(run.path(b.file), "rb") as f:
                rows += pq.read_metadata(f).num_rows
        run.mark(STAGE, "done", fp, rows=rows, layers=layers)
    return ImportanceSummary(run.url, run.stage(STAGE).get("rows", 0), time.perf_counter() - start)


def _map(cfg: RunConfig, todo: list[Batch]) -> None:
    if not todo:
        return
    init_ray()
    n_workers, threads, options = model_actor_options(
        min(max(cfg.harvest.num_workers, 1), len(todo)), cfg.harvest.use_gpu
    )
    workers = [ImportanceWorker.options(**options).remote(cfg, threads) for _ in range(n_workers)]
    bar = tqdm(total=len(todo), unit="batch", desc="importance")
    try:
        run_on_actors(workers, "run", todo, on_done=lambda _: bar.update(1))
    finally:
        bar.close()
        for worker in workers:
            ray.kill(worker)

