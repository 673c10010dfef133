"""The harvest job: Ray actors, one model replica each, process the corpus part by part.

Stages, each recorded in the manifest and skipped when finished:
  contexts  the corpus tokenised into `contexts/part-*.parquet` (the parts are the shards)
  sae       the run's own SAE, trained on the corpus when `sae.train_hook` is set (else nothing to do)
  weights   W_in and b_in of every harvested layer, so later stages never load the model
  maxima    pass 1: each neuron's exact maximum (or the table given as harvest.maxima_file)
  examples  pass 2: per neuron the first k contexts reaching frac × max, with h and activation windows
Workers write one file set per part under `_work/` and a `.done` marker last; an interrupted job reruns only
the parts without a marker, and the merge keeps the first k per neuron, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from tqdm.auto import tqdm

from jobs.lm_sae import train_run_sae
from jobs.ray_utils import check_resources, init_ray, model_actor_options, run_on_actors
from ne import schema
from ne.compute import harvest
from ne.config import HarvestConfig, RunConfig, to_dict
from ne.errors import ConfigError, DataError
from ne.models import UnitModel, load_model, load_units, sae_path, units_on
from ne.models.hooks import check_hook
from ne.rundir.contexts import context_parts, read_contexts, write_contexts
from ne.rundir.graph import HARVEST
from ne.rundir.maxima import signed_extremes
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir
from ne.rundir.weights import weights_file

log = logging.getLogger(__name__)

H_PART_BYTES = 128 * 2**20
"""Bytes of h per output part file: the merge holds at most one such part (plus one input part) in memory."""
EXAMPLE_NEURONS_PER_PART = 4096
"""Neurons per examples output part: the merge holds the final examples of at most this many neurons."""
NEURONS_PER_ROW_GROUP = 64


class PartProcessor:
    """One model replica (its MLP neurons or an SAE's latents); reads a contexts part from the run directory
    and writes its results there."""

    def __init__(self, cfg: RunConfig, threads: int, n_devices: int = 1, model: UnitModel | None = None):
        torch.set_num_threads(threads)
        self.model = model if model is not None else load_units(cfg, n_devices)
        self.run = RunDir(cfg.run_dir)

    def maxima(self, part: int, layers: list[int], batch_size: int, direction: str = "max") -> int:
        """Writes each neuron's maximum of sign × act (sign -1 for `min`) over the part."""
        contexts = read_contexts(self.run, part)
        maxima = harvest.shard_maxima(self.model, contexts, layers, batch_size, harvest.SIGNS[direction])
        self.run.write_parquet(schema.part_path(schema.work_dir("maxima"), part), maxima_table(maxima))
        return sum(len(t) for _, t in contexts)

    def examples(self, part: int, thresholds: dict, hcfg: HarvestConfig, n_ctx: int) -> int:
        contexts = read_contexts(self.run, part)
        window = (hcfg.window_before, hcfg.window_after)
        results = harvest.shard_examples(
            self.model,
            contexts,
            thresholds,
            hcfg.k,
            window,
            n_ctx,
            hcfg.batch_size,
            harvest.resolve_h_dtype(hcfg.h_dtype, self.model.d_model),
            harvest.SIGNS[hcfg.direction],
        )
        for layer, (examples, h) in results.items():
            self.run.write_parquet(schema.part_path(schema.work_dir("examples"), part, layer), examples)
            self.run.write_parquet(schema.part_path(schema.work_dir("h"), part, layer), h)
        self.run.write_json(schema.part_path(schema.work_dir("examples"), part) + ".done", {"contexts": len(contexts)})
        return sum(len(t) for _, t in contexts)


HarvestWorker = ray.remote(PartProcessor)


def maxima_table(maxima: dict[int, torch.Tensor], direction: str = "max") -> pa.Table:
    """`maxima` as maxima.parquet's table; for `min`, the column `min_act` (values as given, signed)."""
    layers = sorted(maxima)
    return pa.Table.from_arrays(
        [
            pa.array(np.concatenate([np.full(len(maxima[i]), i, np.int16) for i in layers])),
            pa.array(np.concatenate([np.arange(len(maxima[i]), dtype=np.int32) for i in layers])),
            pa.array(np.concatenate([maxima[i].numpy().astype(np.float32) for i in layers])),
        ],
        schema=schema.maxima_schema(direction),
    )


@dataclass
class HarvestSummary:
    run_dir: str
    n_contexts: int
    layers: list[int]
    neurons: int
    """Neurons per layer."""
    with_examples: dict[int, int] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        total_with = sum(self.with_examples.values())
        total_examples = sum(self.examples.values())
        lines = [
            f"harvest done in {self.seconds:.1f} s: {self.n_contexts} contexts, layers {self.layers}",
            f"outputs: {self.run_dir}/ (manifest.json, maxima.parquet, examples/, h/, contexts/)",
            f"neurons with examples: {total_with} of {self.neurons * len(self.layers)}; "
            f"examples per such neuron: {total_examples / max(total_with, 1):.1f} on average",
        ]
        for layer in self.layers:
            n = self.with_examples.get(layer, 0)
            lines.append(f"  layer {layer}: {n}/{self.neurons} neurons, {self.examples.get(layer, 0)} examples")
        return "\n".join(lines)


def run_harvest(cfg: RunConfig, force: Collection[str] = ()) -> HarvestSummary:
    """Run (or resume) the harvest stages of `cfg` into cfg.run_dir and summarise the result."""
    force = check_force(force, HARVEST)
    run = RunDir(cfg.run_dir)
    with run.lock("ne harvest"):
        return _harvest(run, cfg, force)


def _harvest(run: RunDir, cfg: RunConfig, force: Collection[str]) -> HarvestSummary:
    start = time.perf_counter()
    base = load_model(cfg.model, cfg.harvest.gpus_per_worker if cfg.harvest.num_workers == 0 else 1)
    if not cfg.sae.active:  # checked before the corpus is read, so bad settings fail at once
        base.check_layers(cfg.harvest.layers)
        check_direction(cfg.harvest.direction, base)
    n_contexts = write_contexts(run, cfg, base, force)
    parts = context_parts(run)
    model = _units(run, cfg, base, force)
    layers = model.check_layers(cfg.harvest.layers)
    check_direction(cfg.harvest.direction, model)
    run.set_manifest_entry(
        "model", {**model.manifest_entry(), "sae": sae_path(cfg), "sae_hook": getattr(model, "hook", None)}
    )
    _write_weights(run, cfg, model, layers, force)
    pool = WorkerPool(cfg, run, model)
    try:
        given = cfg.harvest.maxima_file
        maxima = Stage(
            run,
            "maxima",
            cfg,
            force,
            check=lambda: (
                read_maxima_file(given, layers, model.d_mlp, cfg.harvest.direction) if given else pool.check()
            ),
        )
        if maxima.needed():
            maxima.begin()
            _maxima_stage(run, cfg, pool, parts, layers, model.d_mlp, maxima)
        examples = Stage(run, "examples", cfg, force, check=pool.check)
        if examples.needed():
            examples.begin()
            _examples_stage(run, cfg, pool, parts, layers, model.d_mlp, examples)
    finally:
        pool.close()
    run.set_manifest_entry("config", to_dict(cfg))
    summary = HarvestSummary(run.url, n_contexts, layers, model.d_mlp)
    for layer in layers:
        neurons = run.read_parquet(f"{schema.layer_dir(schema.EXAMPLES_DIR, layer)}", columns=["neuron"])
        summary.examples[layer] = neurons.num_rows
        summary.with_examples[layer] = len(pc.unique(neurons.column("neuron")))
    summary.seconds = time.perf_counter() - start
    return summary


def check_direction(direction: str, model: UnitModel) -> None:
    if direction == "min" and not model.signed():
        act_fn = getattr(model.act_fn, "__name__", type(model.act_fn).__name__)
        raise ConfigError(
            f"harvest.direction is 'min' but the activations of {model.name} ({act_fn}) are never "
            "negative; use harvest.direction: max"
        )


def _maxima_stage(run: RunDir, cfg: RunConfig, pool: WorkerPool, parts, layers, d_mlp: int, stage: Stage) -> None:
    direction = cfg.harvest.direction
    if cfg.harvest.maxima_file:
        table = read_maxima_file(cfg.harvest.maxima_file, layers, d_mlp, direction)
    else:
        pool.map("maxima", parts, layers, cfg.harvest.batch_size, direction)
        table = merge_maxima(run, parts, direction)
    run.write_parquet(schema.MAXIMA, table)
    stage.done(rows=table.num_rows, layers=layers)


def _examples_stage(run: RunDir, cfg: RunConfig, pool: WorkerPool, parts, layers, d_mlp: int, stage: Stage) -> None:
    extremes = signed_extremes(run, layers, cfg.harvest.direction)
    thresholds = {
        layer: harvest.thresholds_from_maxima(torch.from_numpy(e), cfg.harvest.frac) for layer, e in extremes.items()
    }
    done = set(run.ls(schema.work_dir("examples"), suffix=".done"))
    todo = [p for p in parts if f"{schema.part_name(p)}.done" not in done]
    pool.map("examples", todo, thresholds, cfg.harvest, cfg.data.n_ctx)
    rows = sum(_merge_layer(run, layer, parts, cfg.harvest.k, d_mlp) for layer in layers)
    stage.done(rows=rows, layers=layers, h_dtype=harvest.resolve_h_dtype(cfg.harvest.h_dtype, pool.model.d_model))


def _units(run: RunDir, cfg: RunConfig, base, force: Collection[str]):
    """Stage "sae": train the run's own SAE when sae.train_hook asks for one (`jobs.lm_sae`); then the units to
    harvest."""
    hook = cfg.sae.train_hook
    stage = Stage(run, "sae", cfg, force, check=lambda: check_hook(base, hook, "sae.train_hook is") if hook else None)
    if stage.needed():
        stage.begin()
        info = train_run_sae(run, cfg, base) if hook else {}
        stage.done(**info)
    return units_on(base, cfg)


def _write_weights(run: RunDir, cfg: RunConfig, model, layers: list[int], force: Collection[str]) -> None:
    stage = Stage(run, "weights", cfg, force)
    if not stage.needed():
        return
    stage.begin()
    for layer in layers:
        run.write_bytes(schema.weights_path(layer), weights_file(model.input_weights(layer)))
    stage.done(layers=layers)


class WorkerPool:
    """Harvest workers, started on first use and kept for both passes: each loads the model once.

    With `harvest.num_workers: 0` the parts are processed here, with the driver's own model."""

    def __init__(self, cfg: RunConfig, run: RunDir, model: UnitModel):
        self.cfg, self.run, self.model = cfg, run, model
        self.workers: list = []
        self.local: PartProcessor | None = None

    def check(self) -> None:
        """The Ray resources the workers will ask for exist (GPUs asked for, a model split within a node)."""
        if self.cfg.harvest.num_workers:
            hcfg = self.cfg.harvest
            init_ray()
            check_resources(hcfg.use_gpu, hcfg.gpus_per_worker)

    def map(self, method: str, parts: list[int], *args) -> None:
        """Run `<method>(part, *args)` over parts, in process or on the actors, with a progress bar."""
        if not parts:
            return
        bar = tqdm(total=len(parts), unit="part", desc=f"harvest {method}")
        try:
            if self.cfg.harvest.num_workers == 0:
                self._map_local(method, parts, args, bar)
            else:
                self._map_ray(method, parts, args, bar)
        finally:
            bar.close()

    def _map_local(self, method, parts, args, bar) -> None:
        if self.local is None:
            self.local = PartProcessor(self.cfg, torch.get_num_threads(), model=self.model)
        for part in parts:
            getattr(self.local, method)(part, *args)
            bar.update(1)

    def _map_ray(self, method, parts, args, bar) -> None:
        if not self.workers:
            init_ray()
            hcfg = self.cfg.harvest
            n, threads, options = model_actor_options(
                "harvest", hcfg.num_workers, hcfg.use_gpu, len(parts), "parts", hcfg.gpus_per_worker
            )
            self.workers = [
                HarvestWorker.options(**options).remote(self.cfg, threads, int(options.get("num_gpus", 0)) or 1)
                for _ in range(n)
            ]
        tokens, started = 0, time.perf_counter()

        def done(n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tok/s")

        self.workers = run_on_actors(self.workers, method, parts, *[ray.put(a) for a in args], on_done=done)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def merge_maxima(run: RunDir, parts: list[int], direction: str = "max") -> pa.Table:
    """The parts' maxima of sign × act combined; written as real maxima (or minima, for `min`)."""
    sign = harvest.SIGNS[direction]
    merged: dict[int, np.ndarray] = {}
    for part in parts:
        table = run.read_parquet(schema.part_path(schema.work_dir("maxima"), part)).to_pandas()
        for key, group in table.groupby("layer"):
            layer = int(key)  # type: ignore[call-overload]  # pandas types a group key as a tuple
            values = group.sort_values("neuron").max_act.to_numpy(copy=True)
            merged[layer] = values if layer not in merged else np.maximum(merged[layer], values)
    return maxima_table({layer: sign * torch.as_tensor(v) for layer, v in merged.items()}, direction)


def read_maxima_file(path: str, layers: list[int], d_mlp: int, direction: str = "max") -> pa.Table:
    column = schema.extreme_column(direction)
    need = f"a Parquet file with columns layer, neuron, {column}"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise DataError(f"harvest.maxima_file {path!r} does not exist; give {need}")
    with fs.open(fs_path, "rb") as f:
        table = pq.read_table(f)
    missing = {"layer", "neuron", column} - set(table.column_names)
    if missing:
        raise DataError(f"harvest.maxima_file {path!r} lacks columns {sorted(missing)}; give {need}")
    df = table.to_pandas()
    out = {}
    for layer in layers:
        rows = df[df.layer == layer].drop_duplicates("neuron").sort_values("neuron")
        if len(rows) != d_mlp or not np.array_equal(rows.neuron.to_numpy(), np.arange(d_mlp)):
            raise DataError(
                f"harvest.maxima_file {path!r} has {len(rows)} neurons for layer {layer}; it needs all {d_mlp}"
            )
        out[layer] = torch.as_tensor(rows[column].to_numpy(np.float32))
    return maxima_table(out, direction)


def _merge_layer(run: RunDir, layer: int, parts: list[int], k: int, d_mlp: int) -> int:
    """Stream the parts in corpus order, keeping the first k examples per neuron and their h rows once.

    Which examples of a part are kept depends only on the parts before it, so its h rows go straight to
    the output (`H_PART_BYTES` per file) and its kept examples to `_work/kept/`; the examples are then
    written sorted by neuron, `EXAMPLE_NEURONS_PER_PART` neurons at a time. Memory holds one input part,
    one h output part and one slice of neurons, whatever the corpus or the model.
    """
    ex_dir, h_dir, kept_dir = (schema.layer_dir(schema.work_dir(kind), layer) for kind in ("examples", "h", "kept"))
    out_ex, out_h = schema.layer_dir(schema.EXAMPLES_DIR, layer), schema.layer_dir(schema.H_DIR, layer)
    for folder in (out_ex, out_h, kept_dir):
        run.remove(folder)
    counts = np.zeros(d_mlp, dtype=np.int64)
    h_out = _PartWriter(run, out_h)
    for part in parts:
        examples = harvest.merge_examples(run.read_parquet(schema.part_path(ex_dir, part)), k)
        neurons = examples.column("neuron").to_numpy()
        rank = examples.column("rank").to_numpy() + counts[neurons]
        keep = rank < k
        examples = examples.set_column(
            examples.schema.get_field_index("rank"), "rank", pa.array(rank.astype(np.int16))
        ).filter(pa.array(keep))
        np.add.at(counts, examples.column("neuron").to_numpy(), 1)
        run.write_parquet(schema.part_path(kept_dir, part), examples, row_group_size=NEURONS_PER_ROW_GROUP * k)
        h_out.add(harvest.select_h(run.read_parquet(schema.part_path(h_dir, part)), examples))
    h_out.close()
    rows = 0
    for i, lo in enumerate(range(0, d_mlp, EXAMPLE_NEURONS_PER_PART)):
        hi = min(lo + EXAMPLE_NEURONS_PER_PART, d_mlp)
        if not counts[lo:hi].any() and i > 0:
            continue  # part 0 is always written, so every layer has a (possibly empty) examples file
        examples = run.read_parquet(kept_dir, filters=[("neuron", ">=", lo), ("neuron", "<", hi)])
        examples = harvest.sort_examples(examples.cast(schema.EXAMPLES))
        run.write_parquet(schema.part_path(out_ex, i), examples, row_group_size=NEURONS_PER_ROW_GROUP * k)
        rows += examples.num_rows
    return rows


class _PartWriter:
    """Appends h rows (in h_id order) and writes them as parts of at most `H_PART_BYTES` each."""

    def __init__(self, run: RunDir, folder: str):
        self.run, self.folder = run, folder
        self.pending: list[pa.Table] = []
        self.rows, self.parts = 0, 0
        self.schema: pa.Schema | None = None
        """The first table's: every layer has at least one part, so `add` comes before `close`."""

    def add(self, table: pa.Table) -> None:
        self.schema = self.schema or table.schema
        if table.num_rows:
            self.pending.append(table)
            self.rows += table.num_rows
        per_part = self._rows_per_part()
        while self.rows >= per_part:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, per_part))
            rest = merged.slice(per_part)
            self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.rows or self.parts == 0:  # an empty layer still gets one (empty) part
            self._write(pa.concat_tables(self.pending) if self.pending else self._schema().empty_table())
        self.pending, self.rows = [], 0

    def _schema(self) -> pa.Schema:
        assert self.schema is not None, "add() a table before writing"
        return self.schema

    def _rows_per_part(self) -> int:
        h_type = self._schema().field("h").type
        return max(1, H_PART_BYTES // (h_type.list_size * h_type.value_type.bit_width // 8))

    def _write(self, table: pa.Table) -> None:
        self.run.write_parquet(schema.part_path(self.folder, self.parts), table.combine_chunks())
        self.parts += 1
