"""The importance job: token importance of a run's examples, precomputed for the viewer.

Ray actors, each with one model replica, take one batch of neurons of one layer at a time and write
`importance/layer=L/part-B.parquet` (schema `ne.schema.IMPORTANCE`): importance of the
`importance.window_before` tokens before each key token and of the key token itself. Runs add to what is
there: a neuron already computed is skipped, new neurons go to new parts, and nothing is ever deleted
unless the stage is forced or its settings (mask token, window) are changed with `--force importance`.
A part is written atomically, so an interrupted run resumes with the neurons it had not finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm.auto import tqdm

from jobs.ray_utils import check_resources, init_ray, model_actor_options, run_on_actors
from ne import schema
from ne.compute.importance import check_mask_token, mask_token_id, token_importance
from ne.config import RunConfig
from ne.errors import ConfigError
from ne.models import load_units
from ne.rundir.reader import RunData
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir
from ne.schema import NeuronBatch, neuron_batches

log = logging.getLogger(__name__)


@ray.remote
class ImportanceWorker:
    def __init__(self, cfg: RunConfig, threads: int, n_devices: int = 1):
        torch.set_num_threads(threads)
        self.model = load_units(cfg, n_devices)
        self.mask = mask_token_id(self.model, cfg.importance.mask_token)
        self.before = cfg.importance.window_before
        self.data = RunData(cfg.run_dir)

    def run(self, batch: NeuronBatch) -> int:
        table = importance_table(self.data, self.model, batch, self.mask, self.before)
        self.data.run.write_parquet(batch.file(schema.IMPORTANCE_DIR), table)
        return table.num_rows


def importance_table(data: RunData, model, batch: NeuronBatch, mask: int, before: int) -> pa.Table:
    """Importance of every example of the batch's neurons, sorted by neuron then rank."""
    rows: dict[str, list] = {name: [] for name in schema.IMPORTANCE.names}
    for neuron in batch.neurons:
        for e in data.neuron(batch.layer, neuron).examples:
            start = max(0, e.pos - before)
            values = token_importance(model, e.tokens, e.pos, batch.layer, neuron, mask, start)
            for name, value in zip(
                schema.IMPORTANCE.names, (batch.layer, neuron, e.rank, e.ctx_id, e.pos, start, values.tolist())
            ):
                rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=schema.IMPORTANCE)


@dataclass
class ImportanceSummary:
    run_dir: str
    new_neurons: int
    """Neurons computed by this call (the others were there already)."""
    neurons: dict[int, int]
    """Neurons with importance, per layer, after this call."""
    seconds: float

    def describe(self) -> str:
        total = sum(self.neurons.values())
        return (
            f"importance done in {self.seconds:.1f} s: {self.new_neurons} neurons computed now, {total} in all "
            f"({', '.join(f'layer {k}: {v}' for k, v in sorted(self.neurons.items()))})\n"
            f"outputs: {self.run_dir}/{schema.IMPORTANCE_DIR}/"
        )


def run_importance(
    cfg: RunConfig,
    layers: list[int] | None = None,
    neurons: list[int] | None = None,
    force: Collection[str] = (),
) -> ImportanceSummary:
    """Add token importance for `layers` (default: all) and `neurons` (default: all with examples)."""
    force = check_force(force, ("importance",))
    run = RunDir(cfg.run_dir)
    with run.lock("ne importance"):
        start = time.perf_counter()
        stage = Stage(run, "importance", cfg, force, check=lambda: _check(cfg))
        needed = stage.needed()
        layers, wanted = _check_request(run, layers, neurons)
        if needed:
            stage.begin()
        data = RunData(run.url)
        batches: list[NeuronBatch] = []
        for layer in layers:
            have = covered(run, layer)
            todo = [int(n) for n in data.neurons(layer) if (wanted is None or int(n) in wanted) and int(n) not in have]
            parts = run.ls(schema.layer_dir(schema.IMPORTANCE_DIR, layer), suffix=".parquet")
            first = max((int(name[5:10]) for name in parts), default=-1) + 1
            batches += neuron_batches(layer, todo, cfg.importance.neurons_per_task, first)
        if batches or needed:
            if not needed:
                stage.begin(extend=True)
            _map(cfg, batches)
            per_layer = {layer: len(covered(run, layer)) for layer in run.layers(schema.IMPORTANCE_DIR)}
            stage.done(neurons={str(k): v for k, v in per_layer.items()})
        per_layer = {int(k): v for k, v in stage.info.get("neurons", {}).items()}
        return ImportanceSummary(run.url, sum(len(b.neurons) for b in batches), per_layer, time.perf_counter() - start)


def _check(cfg: RunConfig) -> None:
    """The mask token is a token of the model's vocabulary, and the GPUs asked for exist."""
    from ne.models import load_model_tokenizer

    check_mask_token(cfg.importance.mask_token, len(load_model_tokenizer(cfg.model)), cfg.model.name)
    init_ray()
    check_resources(cfg.importance.use_gpu, cfg.harvest.gpus_per_worker, "importance.use_gpu")


def _check_request(run: RunDir, layers: list[int] | None, neurons: list[int] | None):
    """(layers, neuron set or None), each checked against the run's range."""
    m = run.manifest()
    have = m["stages"]["examples"]["info"]["layers"]
    layers = have if layers is None else sorted(set(layers))
    missing = sorted(set(layers) - set(have))
    if missing:
        raise ConfigError(f"--layer {missing[0]} is not in {run.url}; it has layers {have}")
    if neurons is None:
        return layers, None
    d_mlp = m.get("model", {}).get("d_mlp")
    bad = [n for n in neurons if n < 0 or (d_mlp is not None and n >= d_mlp)]
    if bad:
        raise ConfigError(f"--neuron {bad[0]} is out of range; the layers of {run.url} have neurons 0..{d_mlp - 1}")
    return layers, set(neurons)


def covered(run: RunDir, layer: int) -> set[int]:
    """Neurons of `layer` whose importance is stored."""
    folder = schema.layer_dir(schema.IMPORTANCE_DIR, layer)
    if not run.ls(folder, suffix=".parquet"):
        return set()
    return set(np.unique(run.read_parquet(folder, columns=["neuron"]).column("neuron").to_numpy()).tolist())


def _map(cfg: RunConfig, todo: list[NeuronBatch]) -> None:
    if not todo:
        return
    init_ray()
    n_workers, threads, options = model_actor_options(
        "importance",
        cfg.importance.num_workers,
        cfg.importance.use_gpu,
        len(todo),
        "neuron batches",
        cfg.harvest.gpus_per_worker,
    )
    n_devices = int(options.get("num_gpus", 0)) or 1  # a model split for the harvest is split here too
    workers = [
        ImportanceWorker.options(**options).remote(cfg, threads, n_devices)  # type: ignore[attr-defined]
        for _ in range(n_workers)
    ]
    bar = tqdm(total=len(todo), unit="batch", desc="importance")
    try:
        run_on_actors(workers, "run", todo, on_done=lambda _: bar.update(1))
    finally:
        bar.close()
        for worker in workers:
            ray.kill(worker)
