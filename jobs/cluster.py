"""The cluster job: Ray tasks over batches of neurons turn the harvest into feature clusters and metrics.

Batch b of layer L holds neurons [b × n, (b + 1) × n) with n = cluster.neurons_per_task. It writes
`clusters/layer=L/part-b`, `dendrograms/layer=L/part-b`, `centroids/layer=L/part-b` and, last, its metrics
under `_work/cluster/`;
a batch whose four files exist (its centroids too) is finished, so a rerun after an interruption redoes only the others.
A layer's h rows are read once and shared by its batches (zero-copy through Ray's object store); a layer
whose h rows exceed half of `cluster.h_memory_mb` is read in slices, each the rows of consecutive batches,
so the stage's memory follows that setting and `cluster.neurons_per_task`, never the model's size.
When every batch is done, the metrics are merged into `metrics.parquet` and the stage "cluster" is marked done
(`ne.rundir.stages`); the label stage (`jobs/label.py`) then labels the clusters and writes the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm.auto import tqdm

from jobs.ray_utils import get, gpu_wanted, init_ray
from ne import schema
from ne.compute.embed import pad_rows
from ne.compute.metrics import NeuronResult, analyse_neurons
from ne.config import ClusterConfig, RunConfig
from ne.errors import ConfigError, NeError
from ne.explain import batch_cluster_vectors
from ne.rundir.contexts import tokens_at
from ne.rundir.h import LayerH, load_h
from ne.rundir.report import separation
from ne.rundir.stages import Stage, check_force, require_done
from ne.rundir.store import RunDir
from ne.rundir.weights import read_layer_weights
from ne.schema import NeuronBatch, neuron_batches

log = logging.getLogger(__name__)

WORK = schema.work_dir("cluster")
CENTROID_ROWS = 512
"""Rows per row group of centroids/: a reader decodes a few neurons' worth to get one."""


def batch_files(batch: NeuronBatch) -> tuple[str, ...]:
    """The batch's clusters, dendrograms and centroids parts, and its metrics, written last as its "done"
    marker."""
    return (
        batch.file(schema.CLUSTERS_DIR),
        batch.file(schema.DENDROGRAMS_DIR),
        batch.file(schema.CENTROIDS_DIR),
        batch.file(f"{WORK}/metrics"),
    )


def cluster_batch(
    run_url: str, batch: NeuronBatch, cfg: ClusterConfig, layer_h: LayerH | None = None, gated_embedding: str = "concat"
) -> int:
    """Cluster one batch of neurons and write its four files; returns the number of examples.

    `layer_h`: h rows shared by the layer's batches (all of them, or a slice holding this batch's); without
    it, the batch reads only its own rows."""
    run = RunDir(run_url)
    examples = run.read_parquet(
        schema.layer_dir(schema.EXAMPLES_DIR, batch.layer),
        columns=["neuron", "rank", "h_id", "ctx_id", "pos"],
        filters=[("neuron", ">=", batch.lo), ("neuron", "<", batch.hi)],
    ).sort_by([("neuron", "ascending"), ("rank", "ascending")])
    neuron = examples.column("neuron").to_numpy()
    rank = examples.column("rank").to_numpy()
    h_ids = examples.column("h_id").to_numpy()
    tokens_n2 = key_tokens(run, examples.column("ctx_id").to_numpy(), examples.column("pos").to_numpy())
    weights = read_layer_weights(run, batch.layer, batch.lo, batch.hi)
    w_bd = torch.from_numpy(weights.unit_weights(np.arange(batch.lo, batch.hi), gated_embedding))
    layer_h = layer_h if layer_h is not None else load_h(run, batch.layer, h_ids)
    rows = layer_h.positions(h_ids)
    bounds = np.searchsorted(neuron, np.arange(batch.lo, batch.hi + 1))
    members = [np.arange(bounds[i], bounds[i + 1]) for i in range(batch.hi - batch.lo)]
    h_bnd, counts = pad_rows(layer_h.rows, [rows[m] for m in members])
    tokens_bn2 = np.full((len(members), h_bnd.shape[1], 2), -1, np.int64)
    for i, m in enumerate(members):
        tokens_bn2[i, : len(m)] = tokens_n2[m]
    results = analyse_neurons(
        h_bnd, counts, w_bd.float(), cfg, device="cpu" if cfg.use_gpu is False else "auto", tokens_bn2=tokens_bn2
    )
    clusters_rel, dendro_rel, centroids_rel, metrics_rel = batch_files(batch)
    run.write_parquet(clusters_rel, _clusters_table(batch, members, rank, results))
    run.write_parquet(dendro_rel, _dendrograms_table(batch, results))
    run.write_parquet(
        centroids_rel, _centroids_table(batch, results, h_bnd, w_bd.float(), counts), row_group_size=CENTROID_ROWS
    )
    run.write_parquet(metrics_rel, _metrics_table(batch, results))
    return len(h_ids)


def key_tokens(run: RunDir, ctx_ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[n, 2]: each example's key token and the token before it (-1 at position 0), from contexts/."""
    return tokens_at(run, ctx_ids, pos, (0, -1))


def _clusters_table(batch: NeuronBatch, members: list[np.ndarray], rank: np.ndarray, results: list) -> pa.Table:
    cols: dict[str, list[np.ndarray]] = {name: [] for name in schema.CLUSTERS.names}
    for i, (ix, res) in enumerate(zip(members, results)):
        c = res.clusters
        central = np.zeros(len(ix), dtype=bool)
        central[c.central] = True
        cols["layer"].append(np.full(len(ix), batch.layer, np.int16))
        cols["neuron"].append(np.full(len(ix), batch.lo + i, np.int32))
        cols["rank"].append(rank[ix].astype(np.int16))
        cols["cluster"].append(c.labels.astype(np.int32))
        cols["is_central"].append(central)
        cols["outlier"].append(c.outlier.astype(bool))
    return pa.Table.from_arrays(
        [pa.array(np.concatenate(cols[f.name]).astype(f.type.to_pandas_dtype())) for f in schema.CLUSTERS],
        schema=schema.CLUSTERS,
    )


def _centroids_table(
    batch: NeuronBatch, results: list[NeuronResult], h_bnd: torch.Tensor, w_bd: torch.Tensor, counts: np.ndarray
) -> pa.Table:
    neurons, clusters, sizes, vectors = [], [], [], []
    all_vectors = batch_cluster_vectors(h_bnd, w_bd, [r.clusters.labels for r in results])
    for i, (res, n, v) in enumerate(zip(results, counts, all_vectors)):
        if n == 0:
            continue
        vectors.append(v)
        c = res.clusters
        neurons.append(np.full(len(c.central), batch.neurons[i], np.int32))
        clusters.append(np.arange(len(c.central), dtype=np.int32))
        sizes.append(np.bincount(c.labels, minlength=len(c.central)).astype(np.int32))
    if not vectors:
        return schema.CENTROIDS.empty_table()
    flat = np.concatenate(vectors).astype(np.float16)
    width = flat.shape[1]
    offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32) * width)
    return pa.Table.from_arrays(
        [
            pa.array(np.full(len(flat), batch.layer, np.int16)),
            pa.array(np.concatenate(neurons)),
            pa.array(np.concatenate(clusters)),
            pa.array(np.concatenate(sizes)),
            pa.ListArray.from_arrays(offsets, pa.array(flat.ravel())),
        ],
        schema=schema.CENTROIDS,
    )


def _dendrograms_table(batch: NeuronBatch, results: list[NeuronResult]) -> pa.Table:
    """One row per neuron with examples: its linkage and its own cut, which the viewer draws."""
    kept = [(batch.lo + i, r) for i, r in enumerate(results) if len(r.clusters.labels)]
    return pa.Table.from_pydict(
        {
            "layer": [batch.layer] * len(kept),
            "neuron": [n for n, _ in kept],
            "linkage": [r.clusters.linkage.ravel().tolist() for _, r in kept],
            "threshold": [r.clusters.threshold for _, r in kept],
        },
        schema=schema.DENDROGRAMS,
    )


def _metrics_table(batch: NeuronBatch, results: list[NeuronResult]) -> pa.Table:
    data: dict[str, list] = {"layer": [batch.layer] * len(results), "neuron": list(range(batch.lo, batch.hi))}
    for name in schema.METRICS_SCHEMA.names[2:]:
        data[name] = [r.metrics[name] for r in results]
    return pa.Table.from_pydict(data, schema=schema.METRICS_SCHEMA)


@dataclass
class ClusterSummary:
    run_dir: str
    neurons: int
    with_examples: int
    median_clusters: float
    share_ne_better: float
    """Share of neurons, among those with both silhouettes defined, whose neuron-embedding clusters
    have a higher silhouette than the pre-MLP-embedding clusters."""
    seconds: float

    def describe(self) -> str:
        if math.isnan(self.share_ne_better):
            compared = (
                "the silhouettes of neuron and pre-MLP embeddings cannot be compared: no neuron has 2 to "
                "n - 1 clusters in both (a silhouette needs them; a larger corpus gives more examples per "
                "neuron)"
            )
        else:
            compared = (
                f"neuron-embedding silhouette beats pre-MLP silhouette for {100 * self.share_ne_better:.1f}% "
                "of neurons at the run's cut (three other comparisons in the report)"
            )
        return (
            f"cluster done in {self.seconds:.1f} s: {self.with_examples} of {self.neurons} neurons have examples; "
            f"median clusters per such neuron {self.median_clusters:g}; {compared}\n"
            f"outputs: {self.run_dir}/ (clusters/, dendrograms/, centroids/, metrics.parquet)"
        )


def run_cluster(cfg: RunConfig, force: Collection[str] = (), in_process: bool = False) -> ClusterSummary:
    """Run (or resume) the cluster stage of `cfg`: Ray tasks, or one process when `in_process`."""
    force = check_force(force, ("cluster",))
    run = RunDir(cfg.run_dir)
    with run.lock("ne cluster"):
        start = time.perf_counter()
        stage = Stage(run, "cluster", cfg, force, check=lambda: check_device(cfg.cluster, in_process))
        if stage.needed():
            stage.begin()
            layers = run.manifest()["stages"]["examples"]["info"]["layers"]
            todo = [b for b in _batches(run, layers, cfg.cluster.neurons_per_task) if not _finished(run, b)]
            _map_batches(run, todo, cfg.cluster, in_process, cfg.model.gated_embedding)
            metrics = pa.concat_tables(
                [run.read_parquet(schema.layer_dir(f"{WORK}/metrics", layer)) for layer in layers]
            ).sort_by([("layer", "ascending"), ("neuron", "ascending")])
            run.write_parquet(schema.METRICS, metrics)
            stage.done(neurons=metrics.num_rows, layers=layers, seconds=time.perf_counter() - start)
        return _summary(run, time.perf_counter() - start)


def check_device(cfg: ClusterConfig, in_process: bool) -> None:
    """cluster.use_gpu true needs a GPU where the batches run: this process, or the Ray cluster."""
    if not in_process:
        init_ray()
        gpu_wanted(cfg.use_gpu, "cluster.use_gpu")
    elif cfg.use_gpu and not torch.cuda.is_available():
        raise ConfigError(
            "cluster.use_gpu is true but this machine has no CUDA GPU; set cluster.use_gpu to null or false"
        )


def comparison(cfg: RunConfig, metrics: pa.Table) -> dict | None:
    """An SAE run's latents beside the MLP neurons of the same layers in `sae.compare_with`, for the report."""
    if not (cfg.sae.active and cfg.sae.compare_with):
        return None
    mine = metrics.to_pandas()
    other = RunDir(cfg.sae.compare_with)
    try:
        require_done(other, "cluster")
        theirs = other.read_parquet(schema.METRICS).to_pandas()
    except NeError as exc:
        log.warning("the report cannot compare with %s: %s", cfg.sae.compare_with, exc)
        return None
    theirs = theirs[theirs.layer.isin(mine.layer.unique())]
    if theirs.empty:
        log.warning("%s has no neurons of layers %s to compare with", cfg.sae.compare_with, sorted(mine.layer.unique()))
        return None
    return {f"MLP neurons ({cfg.sae.compare_with})": theirs, "SAE latents (this run)": mine}


def _batches(run: RunDir, layers: list[int], per_task: int) -> list[NeuronBatch]:
    return [
        b
        for layer in layers
        for b in neuron_batches(layer, range(read_layer_weights(run, layer, 0, 0).d_mlp), per_task)
    ]


def _finished(run: RunDir, batch: NeuronBatch) -> bool:
    return all(run.exists(rel) for rel in batch_files(batch))


def _map_batches(
    run: RunDir, todo: list[NeuronBatch], cfg: ClusterConfig, in_process: bool, gated_embedding: str = "concat"
) -> None:
    """Each slice of h (a layer's rows, or those of consecutive batches: `h_slices`) is read once and shared by
    its batches: in the object store, zero-copy, for Ray tasks. At most two slices are held at a time, so the
    next one loads while the last batches of one finish: the stage holds at most `cluster.h_memory_mb` of h."""
    if not todo:
        return
    by_layer: dict[int, list[NeuronBatch]] = {}
    for batch in todo:
        by_layer.setdefault(batch.layer, []).append(batch)
    budget = cfg.h_memory_mb * 2**20 // 2
    units = [
        (layer, group, ids)
        for layer, batches in by_layer.items()
        for group, ids in h_slices(run, layer, batches, budget)
    ]
    bar = tqdm(total=len(todo), unit="batch", desc="cluster")
    try:
        if in_process:
            for layer, batches, ids in units:
                layer_h = load_h(run, layer, ids)
                for batch in batches:
                    cluster_batch(run.url, batch, cfg, layer_h, gated_embedding)
                    bar.update(1)
                del layer_h
            return
        init_ray()
        load = ray.remote(num_cpus=1, max_retries=2)(load_h)
        gpu = gpu_wanted(cfg.use_gpu, "cluster.use_gpu")
        share = 1 / cfg.tasks_per_gpu if gpu else 0  # without a share a task sees no GPU
        task = ray.remote(num_cpus=1, num_gpus=share, max_retries=2)(cluster_batch)
        cfg_ref = ray.put(cfg)
        pending: dict[ray.ObjectRef, int] = {}

        def finish_one() -> None:
            done, _ = ray.wait(list(pending), num_returns=1)
            get(done[0])
            pending.pop(done[0])
            bar.update(1)

        for unit, (layer, batches, ids) in enumerate(units):
            while len(set(pending.values())) >= 2:
                finish_one()
            # freed by Ray once this slice's tasks are done; Ray's stubs miss that h_ids has a default
            h_ref = load.remote(run, layer, ids)  # type: ignore[call-arg]
            pending.update(
                {
                    task.remote(run.url, batch, cfg_ref, h_ref, gated_embedding): unit  # type: ignore[call-arg]
                    for batch in batches
                }
            )
            del h_ref
        while pending:
            finish_one()
    finally:
        bar.close()


def h_slices(
    run: RunDir, layer: int, batches: list[NeuronBatch], budget: int
) -> list[tuple[list[NeuronBatch], np.ndarray | None]]:
    """Consecutive groups of a layer's batches whose h rows take at most `budget` bytes, each with its h_ids;
    one group with None (read the whole layer) when the layer fits. A batch alone over the budget is its own
    group: `cluster.neurons_per_task` bounds it."""
    folder = schema.layer_dir(schema.H_DIR, layer)
    footers = [run.read_footer(f"{folder}/{name}") for name in run.ls(folder, suffix=".parquet")]
    if not footers:
        return [(batches, None)]
    h_type = footers[0].schema.to_arrow_schema().field("h").type
    row_bytes = h_type.list_size * h_type.value_type.bit_width // 8
    if sum(f.num_rows for f in footers) * row_bytes <= budget:
        return [(batches, None)]
    examples = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "h_id"])
    neuron, h_id = examples.column("neuron").to_numpy(), examples.column("h_id").to_numpy()
    groups: list[tuple[list[NeuronBatch], np.ndarray | None]] = []
    group: list[NeuronBatch] = []
    ids = np.zeros(0, np.int64)
    for batch in batches:
        mine = h_id[(neuron >= batch.lo) & (neuron < batch.hi)]
        merged = np.union1d(ids, mine)
        if group and len(merged) * row_bytes > budget:
            groups.append((group, ids))
            group, merged = [], np.unique(mine)
        group.append(batch)
        ids = merged
    groups.append((group, ids))
    return groups


def _summary(run: RunDir, seconds: float) -> ClusterSummary:
    m = run.read_parquet(schema.METRICS).to_pandas()
    active = m[m.n_examples > 0]
    return ClusterSummary(
        run_dir=run.url,
        neurons=len(m),
        with_examples=len(active),
        median_clusters=float(active.n_clusters.median()) if len(active) else 0.0,
        share_ne_better=separation(active)["share"],
        seconds=seconds,
    )
