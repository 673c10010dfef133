"""The harvest job: Ray actors, one model replica each, process the corpus part by part.

Stages, each recorded in the manifest and skipped when finished:
  contexts  the corpus tokenised into `contexts/part-*.parquet` (the parts are the shards)
  weights   W_in and b_in of every harvested layer, so later stages never load the model
  maxima    pass 1: each neuron's exact maximum (or the table given as harvest.maxima_file)
  examples  pass 2: per neuron the first k contexts reaching frac × max, with h and activation windows
Workers write one file set per part under `_work/` and a `.done` marker last; an interrupted job reruns only
the parts without a marker, and the merge keeps the first k per neuron, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import safetensors.torch
import torch
from tqdm.auto import tqdm

from jobs.ray_utils import init_ray, model_actor_options, run_on_actors
from ne import harvest, schema
from ne.config import HarvestConfig, RunConfig, to_dict
from ne.data import context_parts, read_contexts, write_contexts
from ne.errors import DataError
from ne.models import load_model, load_units, sae_path
from ne.models.sae_units import SAEUnits, check_reachable, load_sae, sae_fingerprint
from ne.residual_sae import SAE_DIR, saelens_files, sample_activations, train_sae
from ne.stages import HARVEST, Stage, check_force
from ne.store import RunDir

log = logging.getLogger(__name__)

WORK = "_work"
H_ROWS_PER_PART = 65_536
NEURONS_PER_ROW_GROUP = 64


class PartProcessor:
    """One model replica (its MLP neurons or an SAE's latents); reads a contexts part from the run directory
    and writes its results there."""

    def __init__(self, cfg: RunConfig, threads: int):
        torch.set_num_threads(threads)
        self.model = load_units(cfg)
        self.run = RunDir(cfg.run_dir)

    def maxima(self, part: int, layers: list[int], batch_size: int) -> int:
        contexts = read_contexts(self.run, part)
        maxima = harvest.shard_maxima(self.model, contexts, layers, batch_size)
        self.run.write_parquet(f"{WORK}/maxima/{schema.part_name(part)}", maxima_table(maxima))
        return sum(len(t) for _, t in contexts)

    def examples(self, part: int, thresholds: dict, hcfg: HarvestConfig, n_ctx: int) -> int:
        contexts = read_contexts(self.run, part)
        window = (hcfg.window_before, hcfg.window_after)
        results = harvest.shard_examples(
            self.model, contexts, thresholds, hcfg.k, window, n_ctx, hcfg.batch_size, hcfg.h_dtype
        )
        for layer, (examples, h) in results.items():
            self.run.write_parquet(f"{WORK}/examples/layer={layer}/{schema.part_name(part)}", examples)
            self.run.write_parquet(f"{WORK}/h/layer={layer}/{schema.part_name(part)}", h)
        self.run.write_json(f"{WORK}/examples/{schema.part_name(part)}.done", {"contexts": len(contexts)})
        return sum(len(t) for _, t in contexts)


HarvestWorker = ray.remote(PartProcessor)


def maxima_table(maxima: dict[int, torch.Tensor]) -> pa.Table:
    layers = sorted(maxima)
    return pa.Table.from_arrays(
        [
            pa.array(np.concatenate([np.full(len(maxima[i]), i, np.int16) for i in layers])),
            pa.array(np.concatenate([np.arange(len(maxima[i]), dtype=np.int32) for i in layers])),
            pa.array(np.concatenate([maxima[i].numpy().astype(np.float32) for i in layers])),
        ],
        schema=schema.MAXIMA_SCHEMA,
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
            lines.append(
                f"  layer {layer}: {n}/{self.neurons} neurons, {self.examples.get(layer, 0)} examples"
            )
        return "\n".join(lines)


def run_harvest(cfg: RunConfig, force: list[str] | tuple = ()) -> HarvestSummary:
    """Run (or resume) the harvest stages of `cfg` into cfg.run_dir and summarise the result."""
    force = check_force(force, HARVEST)
    run = RunDir(cfg.run_dir)
    with run.lock("ne harvest"):
        return _harvest(run, cfg, force)


def _harvest(run: RunDir, cfg: RunConfig, force: set[str]) -> HarvestSummary:
    start = time.perf_counter()
    base = load_model(cfg.model)
    if not cfg.sae.active:
        base.check_layers(cfg.harvest.layers)  # before the corpus is read: a bad layer fails at once
    n_contexts = write_contexts(run, cfg, base, force)
    parts = context_parts(run)
    model = _units(run, cfg, base, force)
    layers = model.check_layers(cfg.harvest.layers)
    run.record("model", {"name": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
                         "d_mlp": model.d_mlp, "bos_token_id": model.bos_token_id,
                         "pad_token_id": model.pad_token_id, "sae": sae_path(cfg),
                         "sae_hook": getattr(model, "hook", None)})
    _write_weights(run, cfg, model, layers, force)
    pool = WorkerPool(cfg, run)
    try:
        maxima = Stage(run, "maxima", cfg, force)
        if maxima.needed():
            maxima.begin()
            _maxima_stage(run, cfg, pool, parts, layers, model.d_mlp, maxima)
        examples = Stage(run, "examples", cfg, force)
        if examples.needed():
            examples.begin()
            _examples_stage(run, cfg, pool, parts, layers, model.d_mlp, examples)
    finally:
        pool.close()
    run.record("config", to_dict(cfg))
    summary = HarvestSummary(run.url, n_contexts, layers, model.d_mlp)
    for layer in layers:
        neurons = run.read_parquet(f"{schema.layer_dir(schema.EXAMPLES_DIR, layer)}", columns=["neuron"])
        summary.examples[layer] = neurons.num_rows
        summary.with_examples[layer] = len(pc.unique(neurons.column("neuron")))
    summary.seconds = time.perf_counter() - start
    return summary


def _maxima_stage(run: RunDir, cfg: RunConfig, pool: WorkerPool, parts, layers, d_mlp: int, stage: Stage) -> None:
    if cfg.harvest.maxima_file:
        table = read_maxima_file(cfg.harvest.maxima_file, layers, d_mlp)
    else:
        pool.map("maxima", parts, layers, cfg.harvest.batch_size)
        table = merge_maxima(run, parts)
    run.write_parquet(schema.MAXIMA, table)
    stage.done(rows=table.num_rows, layers=layers)


def _examples_stage(
    run: RunDir, cfg: RunConfig, pool: WorkerPool, parts, layers, d_mlp: int, stage: Stage
) -> None:
    maxima = run.read_parquet(schema.MAXIMA).to_pandas()
    thresholds = {
        layer: harvest.thresholds_from_maxima(
            torch.tensor(maxima[maxima.layer == layer].sort_values("neuron").max_act.to_numpy()), cfg.harvest.frac
        )
        for layer in layers
    }
    done = set(run.ls(WORK, "examples", suffix=".done"))
    todo = [p for p in parts if f"{schema.part_name(p)}.done" not in done]
    pool.map("examples", todo, thresholds, cfg.harvest, cfg.data.n_ctx)
    rows = sum(_merge_layer(run, layer, parts, cfg.harvest.k, d_mlp) for layer in layers)
    stage.done(rows=rows, layers=layers)


def _units(run: RunDir, cfg: RunConfig, base, force: set[str]):
    """Stage "sae": train the run's own SAE when sae.train_hook asks for one; then the units to harvest."""
    path = sae_path(cfg)
    measured = sae_fingerprint(path) if cfg.sae.path else {}
    stage = Stage(run, "sae", cfg, force, measured=measured)
    if stage.needed():
        stage.begin()
        info = {}
        if cfg.sae.train_hook:
            check_reachable(base, cfg.sae.train_hook)
            acts = sample_activations(base, run, cfg.sae.train_hook, cfg.sae.train_tokens, cfg.harvest.batch_size)
            sae, info = train_sae(acts, cfg.sae.train, cfg.seed)
            files = saelens_files(sae, cfg.sae.train_hook, base.name, cfg.data.n_ctx, base.bos_token_id is not None)
            for name, data in files.items():
                run.write_bytes(f"{SAE_DIR}/{name}", data)
            info.update(rows=len(acts))
        stage.done(**info)
    return SAEUnits(base, load_sae(path), path) if path else base


def _write_weights(run: RunDir, cfg: RunConfig, model, layers: list[int], force: set[str]) -> None:
    stage = Stage(run, "weights", cfg, force)
    if not stage.needed():
        return
    stage.begin()
    for layer in layers:
        tensors = {"W_in": model.W_in(layer).float().cpu().contiguous(),
                   "b_in": model.b_in(layer).float().cpu().contiguous()}
        run.write_bytes(schema.weights_path(layer), safetensors.torch.save(tensors))
    stage.done(layers=layers)


class WorkerPool:
    """Harvest workers, started on first use and kept for both passes: each loads the model once."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.workers: list = []
        self.local: PartProcessor | None = None

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
            self.local = PartProcessor(self.cfg, torch.get_num_threads())
        for part in parts:
            getattr(self.local, method)(part, *args)
            bar.update(1)

    def _map_ray(self, method, parts, args, bar) -> None:
        if not self.workers:
            init_ray()
            n, threads, options = model_actor_options(
                min(self.cfg.harvest.num_workers, len(parts)), self.cfg.harvest.use_gpu
            )
            self.workers = [
                HarvestWorker.options(**options).remote(self.cfg, threads) for _ in range(n)
            ]
        tokens, started = 0, time.perf_counter()

        def done(n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tok/s")

        run_on_actors(self.workers, method, parts, *[ray.put(a) for a in args], on_done=done)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def merge_maxima(run: RunDir, parts: list[int]) -> pa.Table:
    merged: dict[tuple, np.ndarray] = {}
    for part in parts:
        table = run.read_parquet(f"{WORK}/maxima/{schema.part_name(part)}").to_pandas()
        for layer, group in table.groupby("layer"):
            values = group.sort_values("neuron").max_act.to_numpy(copy=True)
            merged[layer] = values if layer not in merged else np.maximum(merged[layer], values)
    return maxima_table({layer: torch.as_tensor(v) for layer, v in merged.items()})


def read_maxima_file(path: str, layers: list[int], d_mlp: int) -> pa.Table:
    need = "a Parquet file with columns layer, neuron, max_act"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise DataError(f"harvest.maxima_file {path!r} does not exist; give {need}")
    with fs.open(fs_path, "rb") as f:
        table = pq.read_table(f)
    missing = {"layer", "neuron", "max_act"} - set(table.column_names)
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
        out[layer] = torch.as_tensor(rows.max_act.to_numpy(np.float32))
    return maxima_table(out)


def _merge_layer(run: RunDir, layer: int, parts: list[int], k: int, d_mlp: int) -> int:
    """Stream the parts in corpus order, keeping the first k examples per neuron and their h rows once.

    Memory holds at most k rows per neuron plus one part, however long the corpus.
    """
    ex_dir, h_dir = f"{WORK}/examples/layer={layer}", f"{WORK}/h/layer={layer}"
    counts = np.zeros(d_mlp, dtype=np.int64)
    kept_examples, kept_h = [], []
    for part in parts:
        examples = harvest.merge_examples(run.read_parquet(f"{ex_dir}/{schema.part_name(part)}"), k)
        neurons = examples.column("neuron").to_numpy()
        rank = examples.column("rank").to_numpy() + counts[neurons]
        keep = rank < k
        examples = examples.set_column(
            examples.schema.get_field_index("rank"), "rank", pa.array(rank.astype(np.int16))
        ).filter(pa.array(keep))
        np.add.at(counts, examples.column("neuron").to_numpy(), 1)
        kept_examples.append(examples)
        kept_h.append(harvest.select_h(run.read_parquet(f"{h_dir}/{schema.part_name(part)}"), examples))
    examples = harvest.sort_examples(harvest.concat_or_empty(kept_examples, schema.EXAMPLES))
    h = pa.concat_tables(kept_h)  # sorted: parts come in corpus order, and h_id grows with ctx_id
    out_ex = schema.layer_dir(schema.EXAMPLES_DIR, layer)
    out_h = schema.layer_dir(schema.H_DIR, layer)
    run.remove(out_ex)
    run.remove(out_h)
    run.write_parquet(f"{out_ex}/{schema.part_name(0)}", examples, row_group_size=NEURONS_PER_ROW_GROUP * k)
    for i, start in enumerate(range(0, max(h.num_rows, 1), H_ROWS_PER_PART)):
        run.write_parquet(f"{out_h}/{schema.part_name(i)}", h.slice(start, H_ROWS_PER_PART))
    return examples.num_rows
