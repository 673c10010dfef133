"""Scores of every feature cluster on held-out text: the `scores` stage's library half (no Ray, one process).

Each cluster's offline label (`labels/`, a `ne.compute.label.Rule`) is run as a detector over the whole held-out text
of the run (`heldout/`, BOS and padding left out): a token matches when the rule holds on it and its neighbours
(`OFFSETS`). Its precision is the share of matched tokens where the cluster occurs (`occurrences/`), its recall the
share of the cluster's occurrences it matches. One layer at a time, its occurrences read one part at a time; a
layer's scores are one Parquet part, written atomically, so an interrupted stage resumes with the layers it had not
finished. Matched tokens are counted from token and pair counts (`TokenCounts`), not by running each rule.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from ne import schema
from ne.compute.label import Rule
from ne.compute.scores import CLUSTER_KEY, RuleTable, TokenCounts, heldout_positions, occurrence_counts
from ne.occurrence import heldout_parts, read_heldout, token_rows
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)


def write_scores(run: RunDir, layers: list[int]) -> dict:
    """Every layer's `scores/` part not yet written; returns what the manifest records."""
    start = time.perf_counter()
    model = run.manifest().get("model", {})
    skip = [t for t in (model.get("bos_token_id"), model.get("pad_token_id")) if t is not None]
    contexts = [c for part in heldout_parts(run) for c in read_heldout(run, part)]
    key_t, toks_t3 = heldout_positions(contexts, skip)
    del contexts
    counts = TokenCounts(toks_t3)
    for layer in layers:
        rel = schema.part_path(schema.SCORES_DIR, 0, layer)
        if run.exists(rel):  # finished before an interruption
            continue
        run.write_parquet(rel, score_layer(run, layer, key_t, toks_t3, counts))
        log.info("scores of layer %d written", layer)
    return {"layers": layers, "tokens": len(key_t), "seconds": time.perf_counter() - start}


def score_layer(run: RunDir, layer: int, key_t: np.ndarray, toks_t3: np.ndarray, counts: TokenCounts) -> pa.Table:
    """The SCORES rows of one layer's clusters (those of labels/, in its order)."""
    labels = run.read_parquet(
        schema.layer_dir(schema.LABELS_DIR, layer),
        columns=["neuron", "cluster", "key_tokens", "context_offset", "context_token"],
    ).to_pandas()
    labels = labels.sort_values(["neuron", "cluster"]).reset_index(drop=True)
    rules = [
        Rule(tuple(int(k) for k in keys), int(offset), int(context))
        for keys, offset, context in zip(labels.key_tokens, labels.context_offset, labels.context_token)
    ]
    table = RuleTable.of(rules)
    label_key = labels.neuron.to_numpy(np.int64) * CLUSTER_KEY + labels.cluster.to_numpy(np.int64)
    occurrences, matched = np.zeros(len(rules), np.int64), np.zeros(len(rules), np.int64)
    folder = schema.layer_dir(schema.OCCURRENCES_DIR, layer)
    for name in run.ls(folder, suffix=".parquet"):
        part = run.read_parquet(f"{folder}/{name}", columns=["ctx_id", "pos", "unit", "cluster"])
        cluster = part.column("unit").to_numpy().astype(np.int64) * CLUSTER_KEY + part.column("cluster").to_numpy()
        rule_m = np.searchsorted(label_key, cluster).clip(0, max(len(label_key) - 1, 0))
        labelled = label_key[rule_m] == cluster if len(label_key) else np.zeros(len(cluster), bool)
        row = token_rows(run, layer, part, key_t)
        n, hit = occurrence_counts(table, rule_m[labelled], toks_t3[row[labelled]])
        occurrences += n
        matched += hit
    tokens = np.array([counts.matched(rule) for rule in rules], np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tokens > 0, matched / np.maximum(tokens, 1), np.nan)
        recall = np.where(occurrences > 0, matched / np.maximum(occurrences, 1), np.nan)
    return pa.table(
        [
            pa.array(np.full(len(rules), layer, np.int16)),
            pa.array(labels.neuron.to_numpy(np.int32)),
            pa.array(labels.cluster.to_numpy(np.int32)),
            pa.array(occurrences),
            pa.array(tokens),
            pa.array(matched),
            pa.array(precision.astype(np.float32)),
            pa.array(recall.astype(np.float32)),
        ],
        schema=schema.SCORES,
    )
