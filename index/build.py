"""The FAISS index of similar features: one vector per cluster, its central example's embedding.

Vectors are L2-normalised, so inner product is cosine similarity. A gated model's neuron embeddings are
`model.gated_embedding`'s (2 × d_model wide for `concat`), from `LayerWeights.embed`. Below
`index.exact_below` vectors the index is exact (Flat); above, it is an IVF index with nlist ≈ 4·√n lists
whose nprobe is the smallest that reaches `index.target_recall` on sampled queries. Recall@k against exact
search is measured on queries not used for that choice and stored in the manifest (stage "index",
`ne.rundir.stages`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from index.exact import exact_search
from ne import schema
from ne.compute.device import resolve_device
from ne.compute.embed import unit_rows
from ne.config import IndexConfig, RunConfig
from ne.errors import DataError
from ne.rundir.h import read_h
from ne.rundir.reader import central_examples
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir
from ne.rundir.weights import read_layer_weights

log = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-5
"""Similarities this close count as equal when recall is measured (float32 products differ by rounding)."""
EMBED_ROWS = 4096
"""Central examples embedded at a time."""
MEAN_ROWS = 262_144
"""Examples whose h rows `mean_pre_mlp` reads at a time."""
TRAIN_PER_LIST = 32
"""k-means training points per IVF list: FAISS asks for 39; 32 keeps recall (measured) and saves time."""


def central_vectors(
    run: RunDir, layer: int, vectors: str, gated_embedding: str = "concat"
) -> tuple[pa.Table, np.ndarray]:
    """INDEX_IDS rows (without `row`) and a normalised vector of every feature cluster of one layer, which each row
    names by its central example."""
    ids = central_examples(run, layer)
    if vectors == "mean_pre_mlp":
        out = mean_pre_mlp(run, layer, ids.column("neuron").to_numpy(), ids.column("cluster").to_numpy())
        return ids.drop_columns(["h_id"]).append_column("layer", pa.array(np.full(ids.num_rows, layer, np.int16))), out
    h = read_h(run, layer, ids.column("h_id").to_numpy())
    if vectors == "neuron":
        weights, neurons = read_layer_weights(run, layer), ids.column("neuron").to_numpy()
        width = h.shape[1] * len(weights.parts(gated_embedding))
        out = np.empty((len(h), width), np.float32)
        for lo in range(0, len(h), EMBED_ROWS):  # in chunks: no intermediate the size of all vectors
            out[lo : lo + EMBED_ROWS] = unit_rows(
                weights.embed(h[lo : lo + EMBED_ROWS], neurons[lo : lo + EMBED_ROWS], gated_embedding)
            )
        del h
    else:
        out = unit_rows(h)
    ids = ids.drop_columns(["h_id"]).append_column("layer", pa.array(np.full(ids.num_rows, layer, np.int16)))
    return ids, out


def mean_pre_mlp(
    run: RunDir, layer: int, neuron_c: np.ndarray, cluster_c: np.ndarray, rows_per_step: int = MEAN_ROWS
) -> np.ndarray:
    """[C, d_model]: per cluster (given sorted by neuron, then cluster), the normalised mean of its members' unit
    pre-MLP embeddings. Members are read `rows_per_step` examples at a time (whole neurons), so memory holds those
    h rows and the output."""
    members = (
        run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "rank", "h_id"])
        .join(
            run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer), columns=["neuron", "rank", "cluster"]),
            keys=["neuron", "rank"],
        )
        .sort_by([("neuron", "ascending"), ("rank", "ascending")])
    )
    neuron, cluster = members.column("neuron").to_numpy(), members.column("cluster").to_numpy()
    h_ids = members.column("h_id").to_numpy()
    row_of = np.searchsorted(neuron_c.astype(np.int64) * 2**20 + cluster_c, neuron.astype(np.int64) * 2**20 + cluster)
    out: np.ndarray | None = None
    lo = 0
    while lo < len(neuron):
        hi = min(len(neuron), lo + rows_per_step)
        hi = int(np.searchsorted(neuron, neuron[hi - 1], side="right")) if hi < len(neuron) else hi
        h = unit_rows(read_h(run, layer, h_ids[lo:hi]))
        if out is None:
            out = np.zeros((len(neuron_c), h.shape[1]), np.float64)
        np.add.at(out, row_of[lo:hi], h)
        lo = hi
    return unit_rows(out if out is not None else np.zeros((len(neuron_c), 0)))


def recall_at_k(found_sims: np.ndarray, exact_sims: np.ndarray) -> float:
    """Mean share of the approximate top-k that belongs to the exact top-k: results whose similarity reaches
    the k-th exact one. Counting by similarity, not by id, credits any of several tied vectors (neurons
    that share an h row have identical pre-MLP vectors)."""
    kth = exact_sims[:, -1:] - TIE_TOLERANCE
    return float(np.mean((found_sims >= kth).sum(axis=1) / exact_sims.shape[1]))


def build_index(x_nd: np.ndarray, cfg: IndexConfig, seed: int = 0) -> tuple[faiss.Index, dict]:
    """An index over normalised vectors `x_nd`, and what was measured while building it."""
    n, d = x_nd.shape
    if n < cfg.exact_below:
        return flat_index([x_nd], cfg.recall_k)
    k = min(cfg.recall_k, n)
    info: dict = {"n_vectors": n, "d": d, "recall_k": k}
    rng = np.random.default_rng(seed)
    nlist = max(1, int(round(4 * math.sqrt(n))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = seed, 10, 1
    index.train(x_nd[np.sort(rng.choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False))])
    index.add(x_nd)
    queries = x_nd[rng.choice(n, min(n, 2 * cfg.recall_queries), replace=False)]
    truth, _ = exact_search(x_nd, queries, k, device=cfg.device)  # on the GPU when there is one
    tune, held = (slice(0, None, 2), slice(1, None, 2)) if len(queries) > 1 else (slice(None), slice(None))
    nprobe = 1
    while True:  # the smallest power of two that reaches the target on the tuning half
        index.nprobe = nprobe
        if nprobe >= nlist or recall_at_k(index.search(queries[tune], k)[0], truth[tune]) >= cfg.target_recall:
            break
        nprobe = min(2 * nprobe, nlist)
    recall = recall_at_k(index.search(queries[held], k)[0], truth[held])
    return index, {
        **info,
        "type": f"IVF{nlist},Flat",
        "nlist": nlist,
        "nprobe": nprobe,
        "recall": recall,
        "recall_queries": len(truth[held]),
    }


def flat_index(parts: list[np.ndarray], recall_k: int) -> tuple[faiss.Index, dict]:
    """An exact index over the rows of `parts`, added (and dropped from the list) one part at a time."""
    index = faiss.IndexFlatIP(parts[0].shape[1])
    while parts:
        index.add(parts.pop(0))
    return index, {
        "n_vectors": index.ntotal,
        "d": index.d,
        "recall_k": min(recall_k, index.ntotal),
        "type": "Flat",
        "recall": 1.0,
    }


@dataclass
class IndexSummary:
    run_dir: str
    info: dict

    def describe(self) -> str:
        i = self.info
        return (
            f"index done: {i['n_vectors']} feature clusters ({i['vectors']} vectors, d={i['d']}) in a "
            f"{i['type']} index"
            + (f", nprobe {i['nprobe']}" if "nprobe" in i else "")
            + f"; recall@{i['recall_k']} vs exact search {i['recall']:.4f}\noutputs: {self.run_dir}/{schema.INDEX_FILE}"
        )


def run_index(cfg: RunConfig, force: Collection[str] = ()) -> IndexSummary:
    """Build (or keep) the similar-features index of cfg.run_dir; needs a finished cluster stage."""
    force = check_force(force, ("index",))
    run = RunDir(cfg.run_dir)
    with run.lock("ne index"):
        stage = Stage(run, "index", cfg, force, check=lambda: resolve_device(cfg.index.device, "index.device"))
        if stage.needed():
            stage.begin()
            stage.done(**_build(run, cfg))
        return IndexSummary(run.url, stage.info)


def _build(run: RunDir, cfg: RunConfig) -> dict:
    start = time.perf_counter()
    layers = run.manifest()["stages"]["cluster"]["info"]["layers"]
    parts = [central_vectors(run, layer, cfg.index.vectors, cfg.model.gated_embedding) for layer in layers]
    ids = pa.concat_tables([t for t, _ in parts]) if parts else None
    if ids is None or ids.num_rows == 0:
        raise DataError(f"{run.url}: no feature clusters to index (no neuron has examples); check the harvest")
    ids = ids.append_column("row", pa.array(np.arange(ids.num_rows, dtype=np.int64)))
    ids = ids.select(schema.INDEX_IDS.names).cast(schema.INDEX_IDS)
    vectors = [v for _, v in parts]
    del parts
    if ids.num_rows < cfg.index.exact_below:  # exact: each layer's vectors go straight in, never concatenated
        index, info = flat_index(vectors, cfg.index.recall_k)
    else:
        x = np.concatenate(vectors)
        del vectors
        index, info = build_index(x, cfg.index, cfg.seed)
        del x
    run.write_parquet(schema.INDEX_IDS_FILE, ids)
    _write_index(run, index)
    d_mlp = {str(layer): int(read_layer_weights(run, layer, 0, 0).d_mlp) for layer in layers}
    info.update(vectors=cfg.index.vectors, d_mlp=d_mlp, seconds=time.perf_counter() - start)
    log.info("index of %d vectors built, recall@%d %.4f", info["n_vectors"], info["recall_k"], info["recall"])
    return info


def _write_index(run: RunDir, index: faiss.Index) -> None:
    run.write_bytes(schema.INDEX_FILE, faiss.serialize_index(index).data)  # a view: no second copy of the index
