"""Every feature cluster scored by example embeddings on held-out text: the `embedding_scores` stage's library half
(no Ray, one process).

An example's text is its window (scores.window_before run tokens before its key token to scores.window_after after),
embedded by all-MiniLM-L6-v2 in its context (`ne.models.sentence`, `ne.compute.scores.window_embeddings`). A
held-out occurrence (`occurrences/`) of a cluster scores its margin: the mean cosine of its window's embedding to the
cluster's dataset examples minus that to the examples of its unit's other clusters (delphi's example-embedding
measure, `ne.compute.scores.ClusterSums`).

Two passes, each one encoder pass over its contexts: the harvest's contexts give every cluster the sum of its
examples' embeddings (kept under `_work/` once made), then each held-out part gives its occurrences' margins, summed
per cluster into a `_work/` part. An interrupted stage resumes with the parts it had not finished; the last step
adds the parts up into one `embedding_scores/` part per layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ne import schema
from ne.compute.device import resolve_device
from ne.compute.harvest import Context
from ne.compute.scores import CLUSTER_KEY, TOKEN_KEY, ClusterSums, window_embeddings
from ne.config import RunConfig
from ne.models.sentence import D_SENTENCE, SentenceEncoder
from ne.models.tokenizers import decode_each
from ne.occurrence import heldout_parts, occurrence_file, read_heldout, token_rows
from ne.rundir.contexts import iter_context_parts
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

WORK = schema.work_dir("embedding_scores")
SUMS = f"{WORK}/cluster_sums.safetensors"


class Windows:
    """Window embeddings of a run's contexts: the run's tokenizer decodes, the sentence encoder reads."""

    def __init__(self, run: RunDir, cfg: RunConfig):
        from ne.models import load_model_tokenizer

        model = run.manifest().get("model", {})
        self.special = {t for t in (model.get("bos_token_id"), model.get("pad_token_id")) if t is not None}
        self.tokenizer = load_model_tokenizer(cfg.model)
        self.encoder = SentenceEncoder(str(resolve_device(cfg.scores.device, "scores.device")))
        self.cfg = cfg.scores

    def pieces(self, tokens: list[int]) -> list[str]:
        """Each run token's text; BOS and padding have none."""
        return ["" if t in self.special else p for t, p in zip(tokens, decode_each(self.tokenizer, tokens))]

    def of(self, contexts: Sequence[Context]) -> tuple[np.ndarray, np.ndarray]:
        """(token keys ctx_id * TOKEN_KEY + pos, sorted; their unit-length window embeddings [t, 384])."""
        keys, rows = [], []
        for lo in range(0, len(contexts), self.cfg.batch_size):
            batch = contexts[lo : lo + self.cfg.batch_size]
            pieces = [self.pieces(tokens.tolist()) for _, tokens in batch]
            for (ctx_id, tokens), (sums, counts) in zip(batch, self.encoder.states(pieces)):
                keys.append(np.int64(ctx_id) * TOKEN_KEY + np.arange(len(tokens)))
                rows.append(window_embeddings(sums, counts, self.cfg.window_before, self.cfg.window_after))
        if not keys:
            return np.zeros(0, np.int64), np.zeros((0, D_SENTENCE), np.float32)
        keys_t, rows_td = np.concatenate(keys), np.concatenate(rows)
        order = np.argsort(keys_t, kind="stable")
        return keys_t[order], rows_td[order]


def write_embedding_scores(run: RunDir, cfg: RunConfig, layers: list[int]) -> dict:
    """Every layer's `embedding_scores/` part, resuming from `_work/`; returns what the manifest records."""
    start = time.perf_counter()
    windows = Windows(run, cfg)
    sums = _kept_sums(run, layers, windows)
    parts = heldout_parts(run)
    for part in tqdm(parts, unit="part", desc="embedding scores", mininterval=2):
        rel = f"{WORK}/{schema.part_name(part)}"
        if not run.exists(rel):  # else finished before an interruption
            run.write_parquet(rel, score_part(run, part, layers, sums, windows))
    scored = 0
    for layer in layers:
        table = layer_table(run, layer, sums[layer], parts)
        scored += int(table.column("heldout").to_numpy().sum())
        run.write_parquet(schema.part_path(schema.EMBEDDING_SCORES_DIR, 0, layer), table)
    return {
        "layers": layers,
        "clusters": sum(len(s.keys) for s in sums.values()),
        "heldout_scored": scored,
        "window": [cfg.scores.window_before, cfg.scores.window_after],
        "seconds": time.perf_counter() - start,
    }


def cluster_sums(run: RunDir, layers: list[int], windows: Windows) -> dict[int, ClusterSums]:
    """Per layer, every cluster that is not an outlier as the sum of its examples' window embeddings."""
    examples = {layer: layer_examples(run, layer) for layer in layers}
    out = {layer: ClusterSums(key, D_SENTENCE) for layer, (_, key) in examples.items()}
    wanted = set(np.unique(np.concatenate([token // TOKEN_KEY for token, _ in examples.values()])).tolist())
    for _, contexts in tqdm(iter_context_parts(run), unit="part", desc="example embeddings", mininterval=2):
        keys_t, rows_td = windows.of([c for c in contexts if c[0] in wanted])
        for layer, (token, key) in examples.items():
            here = np.isin(token, keys_t)
            out[layer].add(key[here], rows_td[np.searchsorted(keys_t, token[here])])
    return out


def _kept_sums(run: RunDir, layers: list[int], windows: Windows) -> dict[int, ClusterSums]:
    """`cluster_sums`, kept under `_work/` for a resumed stage."""
    from safetensors.numpy import load, save

    if run.exists(SUMS):
        saved = load(run.read_bytes(SUMS))
        out = {}
        for layer in layers:
            out[layer] = ClusterSums(saved[f"keys_{layer}"], D_SENTENCE)
            out[layer].sums, out[layer].counts = saved[f"sums_{layer}"], saved[f"counts_{layer}"]
        return out
    out = cluster_sums(run, layers, windows)
    tensors: dict[str, np.ndarray] = {}
    for layer, s in out.items():
        tensors |= {f"keys_{layer}": s.keys, f"sums_{layer}": s.sums, f"counts_{layer}": s.counts}
    run.write_bytes(SUMS, save(tensors))
    return out


def layer_examples(run: RunDir, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(token key, cluster key) of each dataset example of the layer in a cluster that is not an outlier."""
    ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "rank", "ctx_id", "pos"])
    cl = run.read_parquet(
        schema.layer_dir(schema.CLUSTERS_DIR, layer), columns=["neuron", "rank", "cluster", "outlier"]
    )
    both = ex.to_pandas().merge(cl.to_pandas(), on=["neuron", "rank"], validate="one_to_one")
    both = both[~both.outlier]
    token = both.ctx_id.to_numpy(np.int64) * TOKEN_KEY + both.pos.to_numpy(np.int64)
    return token, both.neuron.to_numpy(np.int64) * CLUSTER_KEY + both.cluster.to_numpy(np.int64)


def score_part(run: RunDir, part: int, layers: list[int], sums: dict[int, ClusterSums], windows: Windows) -> pa.Table:
    """Per layer and cluster, the held-out part's scored occurrences: how many, how many closer, their margins' sum."""
    keys_t, rows_td = windows.of(read_heldout(run, part))
    out: dict[str, list] = {name: [] for name in ("layer", "key", "n", "closer", "margin_sum")}
    for layer in layers:
        occ = run.read_parquet(occurrence_file(layer, part), columns=["ctx_id", "pos", "unit", "cluster"])
        row = token_rows(run, layer, occ, keys_t)
        key = occ.column("unit").to_numpy().astype(np.int64) * CLUSTER_KEY + occ.column("cluster").to_numpy()
        idx, margin = sums[layer].margins(key, row, rows_td)
        ok = np.isfinite(margin)
        k = len(sums[layer].keys)
        n = np.bincount(idx[ok], minlength=k)
        hit = np.flatnonzero(n)
        out["layer"].append(np.full(len(hit), layer, np.int16))
        out["key"].append(sums[layer].keys[hit])
        out["n"].append(n[hit])
        out["closer"].append(np.bincount(idx[ok & (margin > 0)], minlength=k)[hit])
        out["margin_sum"].append(np.bincount(idx[ok], weights=margin[ok], minlength=k)[hit])
    return pa.table({name: np.concatenate(v) for name, v in out.items()})


def layer_table(run: RunDir, layer: int, sums: ClusterSums, parts: list[int]) -> pa.Table:
    """The EMBEDDING_SCORES rows of one layer: its `_work/` parts added up."""
    k = len(sums.keys)
    n, closer, margin_sum = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k)
    for part in parts:
        t = run.read_parquet(f"{WORK}/{schema.part_name(part)}", filters=[("layer", "=", layer)])
        idx = np.searchsorted(sums.keys, t.column("key").to_numpy())
        np.add.at(n, idx, t.column("n").to_numpy())
        np.add.at(closer, idx, t.column("closer").to_numpy())
        np.add.at(margin_sum, idx, t.column("margin_sum").to_numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        share, mean = closer / n, margin_sum / n
    return pa.table(
        [
            pa.array(np.full(k, layer, np.int16)),
            pa.array((sums.keys // CLUSTER_KEY).astype(np.int32)),
            pa.array((sums.keys % CLUSTER_KEY).astype(np.int32)),
            pa.array(sums.counts),
            pa.array(n),
            pa.array(share.astype(np.float32)),
            pa.array(mean.astype(np.float32)),
        ],
        schema=schema.EMBEDDING_SCORES,
    )
