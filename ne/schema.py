"""Paths and Arrow schemas of the run directory: the one language all stages speak.

```
RUN/
  manifest.json                      config as run, versions, per-stage status and row counts
  contexts/part-NNNNN.parquet        ctx_id, doc_id, tokens (BOS first where the model uses one; no padding)
  maxima.parquet                     layer, neuron, max_act (min_act with harvest.direction: min)
  examples/layer=L/part-NNNNN.parquet  one row per (neuron, example), sorted by neuron then rank
  h/layer=L/part-NNNNN.parquet       one row per (ctx_id, pos) used by any example of layer L
  clusters/layer=L/part-NNNNN.parquet  one row per (neuron, example): its cluster
  dendrograms/layer=L/part-NNNNN.parquet  one row per neuron: the scipy linkage matrix, flattened
  centroids/layer=L/part-NNNNN.parquet    one row per feature cluster: its mean unit neuron embedding
  metrics.parquet                    one row per neuron: polysemy metrics
  index/                             faiss.index, ids.parquet
  importance/layer=L/part-NNNNN.parquet  token importance of examples, precomputed for the viewer
  labels/layer=L/part-NNNNN.parquet  one row per feature cluster: its offline label and the rule behind it
  report/                            report.md and PNG plots
  descriptions/part-NNNNN.parquet    LLM descriptions of feature clusters (`ne describe`, optional)
  sae/                               the run's own SAE, SAELens's cfg.json and sae_weights.safetensors
  sae_eval.json, sae_eval.md         the SAE's evaluation: reconstruction, sparsity, downstream cost, polysemy
  SEED-NAME/                         a comparison's runs (sae.compare), one per SAE, each a run as above
  comparison.{md,csv,png}            a comparison's table (mean ± std over seeds, paired verdicts) and plot
  heldout/part-NNNNN.parquet         held-out contexts (the CONTEXTS schema): text the harvest never saw
  occurrences/layer=L/part-NNNNN.parquet  one row per (held-out token, firing unit): the feature cluster it joins
  features/part-NNNNN.parquet        one row per feature cluster: its occurrences, density and activation quantiles
  coactivation/layer=L/part-NNNNN.parquet  one row per (feature, feature firing with it on a held-out token)
  scores/layer=L/part-NNNNN.parquet  one row per feature cluster: its label's precision and recall on held-out text
```
`h_id = ctx_id * n_ctx + pos` is global and deterministic, so shards never need to agree on ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

CONTEXTS_DIR = "contexts"
MAXIMA = "maxima.parquet"
EXAMPLES_DIR = "examples"
H_DIR = "h"
CLUSTERS_DIR = "clusters"
DENDROGRAMS_DIR = "dendrograms"
CENTROIDS_DIR = "centroids"
METRICS = "metrics.parquet"
INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/faiss.index"
INDEX_IDS_FILE = f"{INDEX_DIR}/ids.parquet"
IMPORTANCE_DIR = "importance"
REPORT_DIR = "report"
REPORT_MD = f"{REPORT_DIR}/report.md"
LABELS_DIR = "labels"
DESCRIPTIONS_DIR = "descriptions"
DETECTION_DIR = "detection"
HELDOUT_DIR = "heldout"
OCCURRENCES_DIR = "occurrences"
FEATURES_DIR = "features"
COACTIVATION_DIR = "coactivation"
SCORES_DIR = "scores"
EMBEDDING_SCORES_DIR = "embedding_scores"
WEIGHTS_DIR = "weights"
SAE_DIR = "sae"
"""The run's own SAE (`sae.train_hook`), in SAELens's layout."""
SAE_EVAL = "sae_eval.json"
SAE_EVAL_MD = "sae_eval.md"
COMPARISON = "comparison"
"""Stem of a comparison's table and plot: comparison.md, comparison.csv, comparison.png."""
MNIST_DIR = "mnist"
MNIST_TABLES = (f"{MNIST_DIR}/sae_eval.md", f"{MNIST_DIR}/sae_eval.csv")
WORK_DIR = "_work"
"""Half-done work of running stages: never recorded in the manifest, removed when its stage finishes."""


def work_dir(name: str) -> str:
    """`_work/name`: one stage's half-done work (`maxima`, `examples`, `h`, `kept`, `cluster`, `sae`, `occurrence`,
    `coactivation`)."""
    return f"{WORK_DIR}/{name}"


def mnist_weights(model: str) -> str:
    """An MNIST model's weights in the authors' layout: `mlp`, `sae_standard` or `sae_ne_loss`."""
    return f"{MNIST_DIR}/{model}.safetensors"


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def layer_dir(kind: str, layer: int) -> str:
    return f"{kind}/layer={layer}"


def part_path(kind: str, part: int, layer: int | None = None) -> str:
    """Part `part` of folder `kind`, or of its `layer=L` subfolder."""
    return f"{kind if layer is None else layer_dir(kind, layer)}/{part_name(part)}"


def weights_path(layer: int) -> str:
    """A harvested layer's input weights as safetensors, neuron-major so that a batch of neurons is one byte
    range: `W_in_T` [d_mlp, d_model] and `b_in` [d_mlp]; gated layers `W_gate_T`, `b_gate`, `W_up_T`, `b_up`."""
    return f"{WEIGHTS_DIR}/layer={layer}.safetensors"


def h_id(ctx_id, pos, n_ctx: int):
    return ctx_id * n_ctx + pos


CONTEXTS = pa.schema([("ctx_id", pa.int64()), ("doc_id", pa.int64()), ("tokens", pa.list_(pa.int32()))])


def extreme_column(direction: str) -> str:
    """maxima.parquet's value column: `max_act`, or `min_act` for a `harvest.direction: min` run."""
    return "min_act" if direction == "min" else "max_act"


def maxima_schema(direction: str = "max") -> pa.Schema:
    return pa.schema([("layer", pa.int16()), ("neuron", pa.int32()), (extreme_column(direction), pa.float32())])


MAXIMA_SCHEMA = maxima_schema()

EXAMPLES = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("rank", pa.int16()),  # 0..k-1, in corpus order
        ("ctx_id", pa.int64()),
        ("pos", pa.int16()),  # the key token: where the neuron peaks in the context
        ("act", pa.float32()),  # the peak activation
        ("window_start", pa.int16()),  # position of window[0]
        ("window", pa.list_(pa.float32())),  # activations from window_start to pos + window_after
        ("h_id", pa.int64()),
    ]
)


def h_schema(d_model: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [("h_id", pa.int64()), ("ctx_id", pa.int64()), ("pos", pa.int16()), ("h", pa.list_(value, d_model))]
    )


CLUSTERS = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("rank", pa.int16()),  # the example's rank in examples/
        ("cluster", pa.int32()),  # 0 is the largest cluster
        ("is_central", pa.bool_()),  # the member with the highest mean cosine similarity to the others
        ("outlier", pa.bool_()),  # its cluster is smaller than cluster.min_cluster_size
    ]
)

DENDROGRAMS = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("linkage", pa.list_(pa.float64())),  # scipy linkage matrix [(n-1), 4], row-major
        ("threshold", pa.float64()),  # this neuron's cut: merges at heights <= threshold are joined
    ]
)

CENTROIDS = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("size", pa.int32()),
        ("vector", pa.list_(pa.float16())),  # unit length: the mean of the members' unit neuron embeddings
    ]
)
"""centroids/layer=L/part-NNNNN.parquet, sorted by neuron then cluster: what `ne explain` assigns to."""

_METRIC_NAMES = ["n_clusters", "max_dist", "mean_dist", "intra_dist", "inter_dist", "silhouette"]
_FIGURE4_NAMES = [
    "threshold",
    "raw_threshold",  # each space's cut, at the run's cluster.cut
    "n_clusters_fixed",
    "silhouette_fixed",
    "raw_silhouette_fixed",  # both at cluster.threshold
    "n_clusters_per_neuron",
    "silhouette_per_neuron",
    "raw_silhouette_per_neuron",  # each at its own cut
    "silhouette_at_raw_k",
    "raw_silhouette_at_ne_k",  # cut into as many clusters as the other space's own cut
    "nn_same_token",
    "raw_nn_same_token",
    "nn_same_bigram",
    "raw_nn_same_bigram",  # nearest neighbour agrees
    "pair_same_token",
    "pair_same_bigram",  # ... and a random other example does (chance)
]
METRICS_SCHEMA = pa.schema(
    [("layer", pa.int16()), ("neuron", pa.int32()), ("n_examples", pa.int32())]
    + [(name, pa.int32() if name == "n_clusters" else pa.float32()) for name in _METRIC_NAMES]
    + [(f"raw_{name}", pa.int32() if name == "n_clusters" else pa.float32()) for name in _METRIC_NAMES]
    + [(name, pa.int32() if name.startswith("n_clusters") else pa.float32()) for name in _FIGURE4_NAMES]
)
"""metrics.parquet: `ne.compute.metrics` defines each column (neuron_metrics, figure4_metrics, neighbour_agreement)."""

INDEX_IDS = pa.schema(
    [
        ("row", pa.int64()),
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("rank", pa.int16()),
        ("ctx_id", pa.int64()),
        ("pos", pa.int16()),
    ]
)

IMPORTANCE = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("rank", pa.int16()),
        ("ctx_id", pa.int64()),
        ("pos", pa.int16()),
        ("start", pa.int16()),  # position of importance[0]
        ("importance", pa.list_(pa.float32())),  # from start to pos; NaN where not measured (BOS)
    ]
)
"""importance/layer=L/part-NNNNN.parquet, sorted by neuron then rank, like examples/."""

LABELS = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("size", pa.int32()),  # examples in the cluster
        ("outlier", pa.bool_()),  # smaller than cluster.min_cluster_size
        ("label", pa.string()),  # the rule below in words, e.g. `"for" after "the"`
        ("key_tokens", pa.list_(pa.int32())),  # the rule: the key token is one of these ...
        ("context_offset", pa.int8()),  # ... and the token at this offset (-1 before, +1 after; 0: no condition)
        ("context_token", pa.int32()),  # ... is this one (-1 when there is no condition)
        ("coverage", pa.float32()),  # share of the cluster's examples the rule matches
        ("others", pa.float32()),  # share of the neuron's other examples it matches (NaN: no other examples)
        ("corpus", pa.float32()),  # share of all token positions of the corpus it matches
    ]
)
"""labels/layer=L/part-NNNNN.parquet, sorted by neuron then cluster: `ne.label` defines the rule."""

DESCRIPTIONS = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("description", pa.string()),
        ("model", pa.string()),  # the chat model that wrote it
        ("prompt_sha", pa.string()),  # hash of the prompt: a changed prompt is described again
        ("prompt_tokens", pa.int32()),  # as the endpoint reported them (0 when it does not)
        ("completion_tokens", pa.int32()),
    ]
)
"""descriptions/part-NNNNN.parquet: one row per described cluster, in the order they were finished."""


DETECTION = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("description", pa.string()),  # the description scored (descriptions/ may hold a newer one later)
        ("model", pa.string()),  # the chat model that judged
        ("balanced_accuracy", pa.float32()),  # (true positive rate + true negative rate) / 2
        ("true_positive_rate", pa.float32()),
        ("true_negative_rate", pa.float32()),
        ("positives", pa.list_(pa.int64())),  # held-out tokens where the cluster occurs, ctx_id * 2**32 + pos
        ("negatives", pa.list_(pa.int64())),  # held-out tokens where it does not, the same way
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)
"""detection/part-NNNNN.parquet: one row per scored description, in the order they were finished (`ne describe
--score`, `ne.detection`): the LLM's detection of the cluster's held-out windows of text given only the description."""


@dataclass(frozen=True)
class NeuronBatch:
    """Neurons of one layer handled by one task, which writes part `index` of each of its output folders."""

    layer: int
    index: int
    neurons: tuple[int, ...]

    def file(self, kind: str) -> str:
        return part_path(kind, self.index, self.layer)

    @property
    def lo(self) -> int:
        return self.neurons[0]

    @property
    def hi(self) -> int:
        """One past the last neuron."""
        return self.neurons[-1] + 1


def neuron_batches(layer: int, neurons: Sequence[int], per_batch: int, first_index: int = 0) -> list[NeuronBatch]:
    """`neurons` (sorted) cut into batches of `per_batch`, numbered from `first_index`."""
    neurons = [int(n) for n in neurons]
    return [
        NeuronBatch(layer, first_index + i // per_batch, tuple(neurons[i : i + per_batch]))
        for i in range(0, len(neurons), per_batch)
    ]


OCCURRENCES = pa.schema(
    [
        ("ctx_id", pa.int64()),  # a held-out context (heldout/)
        ("pos", pa.int16()),  # the token's position in it (never BOS)
        ("layer", pa.int16()),
        ("unit", pa.int32()),  # the neuron (or SAE latent)
        ("cluster", pa.int32()),  # the feature cluster it joins, as `ne explain` assigns it; -1: the unit has none
        ("act", pa.float32()),  # its activation there, signed
        ("similarity", pa.float32()),  # cosine of its neuron embedding to that cluster's vector (NaN without one)
    ]
)
"""occurrences/layer=L/part-NNNNN.parquet: part N covers heldout/part-N's contexts, rows sorted by unit, ctx_id,
pos (a unit's rows are a few row groups of each part). Written by the `occurrence` stage (ne/occurrence.py); the
exports and the description scores read it."""

SCORES = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("occurrences", pa.int64()),  # held-out tokens where the cluster fires (occurrences/)
        ("matched_tokens", pa.int64()),  # held-out tokens its label's rule matches (BOS and padding never count)
        ("matched_occurrences", pa.int64()),  # of its occurrences, those the rule matches
        ("precision", pa.float32()),  # matched_occurrences / matched_tokens (NaN: the rule matches no token)
        ("recall", pa.float32()),  # matched_occurrences / occurrences (NaN: the cluster never fires there)
    ]
)
"""scores/layer=L/part-00000.parquet, one row per feature cluster of labels/ in its order: the offline label as a
detector of the cluster's held-out occurrences among all held-out tokens (the `scores` stage, `ne.scores`)."""

EMBEDDING_SCORES = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("examples", pa.int64()),  # the cluster's dataset examples (every one has a window of text)
        ("heldout", pa.int64()),  # its held-out occurrences scored (those with text in their window)
        ("closer", pa.float32()),  # share of them with a positive margin (NaN when none is scored)
        ("margin", pa.float32()),  # their mean margin (NaN when none is scored)
    ]
)
"""embedding_scores/layer=L/part-00000.parquet, one row per feature cluster that is not an outlier, by neuron and
cluster: a held-out occurrence's margin is the mean cosine of its window's sentence embedding to the cluster's
examples' minus that to the examples of the unit's other clusters (the `embedding_scores` stage,
`ne.embedding_scores`; a unit with one cluster has nothing to contrast, so its rows score nothing)."""

FEATURES = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("occurrences", pa.int64()),  # held-out tokens where it occurs
        ("density", pa.float64()),  # occurrences / held-out tokens
        ("act_q10", pa.float32()),  # quantiles of its activation over its occurrences (NaN when it never occurs)
        ("act_q50", pa.float32()),
        ("act_q90", pa.float32()),
        ("act_peak", pa.float32()),  # the strongest: the maximum (the minimum in a harvest.direction: min run)
    ]
)
"""features/part-NNNNN.parquet: every feature cluster of the run, sorted by layer, neuron, cluster."""

COACTIVATION = pa.schema(
    [
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("cluster", pa.int32()),
        ("layer_b", pa.int16()),  # a feature that occurs on the same held-out token (any layer)
        ("neuron_b", pa.int32()),
        ("cluster_b", pa.int32()),
        ("count", pa.int32()),  # tokens where both occur
        ("score", pa.float32()),  # coactivation.score of the pair: higher fires more together
    ]
)
"""coactivation/layer=L/part-NNNNN.parquet: both orders of every pair with count >= coactivation.min_count, in
the folder of the first feature's layer, sorted by neuron, cluster, then score (best first)."""
