"""The stage graph as data: every stage of a run, the stages it reads, the settings and the outputs it owns.

```
contexts                            the corpus, tokenised
sae        <- contexts              an SAE trained on the corpus (a no-op unless sae.train_hook is set)
weights    <- sae                   W_in and b_in of every harvested layer
maxima     <- contexts, sae         pass 1: each unit's maximum
examples   <- contexts, maxima      pass 2: each unit's dataset examples and their h
cluster    <- examples, weights     feature clusters, centroids, metrics
label      <- cluster               an offline label for every feature cluster, and the report that shows them
index      <- cluster               FAISS index of the feature clusters
occurrence <- cluster               held-out text, and every feature cluster's occurrences in it
coactivation <- occurrence          per-feature statistics and which features fire together
scores     <- label, occurrence     every feature cluster's label scored on the held-out text (precision, recall)
embedding_scores <- cluster, occurrence  every feature cluster scored by example embeddings on the held-out text
importance <- examples              token importance (adds neurons run by run)
describe   <- cluster               LLM descriptions of feature clusters (optional; adds clusters run by run)
detection  <- occurrence            LLM detection scores of the descriptions on held-out text (`ne describe --score`)
sae_eval   <- sae, cluster          the run's SAE evaluated (only runs with an SAE)
mnist_mlp <- ; mnist_sae_standard, mnist_sae_ne_loss <- mnist_mlp ; mnist_eval <- both SAEs
```

`ne.rundir.stages` gives every stage its one lifecycle over this graph; the store names the stage to redo for
a damaged file from it (`owner_of`), so this module sits below both and imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ne import schema as s


@dataclass(frozen=True)
class StageDef:
    name: str
    command: str
    """The `ne` command that runs the stage."""
    upstream: tuple[str, ...] = ()
    settings: tuple = ()
    """Config keys the outputs depend on (`section.*`: every key of the section; `-prefix` drops the keys
    that start with it; a function of the config gives keys that count only for some configs)."""
    outputs: tuple[str, ...] = ()
    """Run-relative files and folders the stage owns (`_work/...`: half-done work, never recorded)."""
    layout: tuple[str, ...] = ()
    """Keys that shape half-done work but not the result: an interrupted stage resumes only with the same."""
    inputs: str | None = None
    """Which files from outside the run the stage reads: a key of `ne.rundir.stages.INPUT_FILES`, the function
    of the config that finds them."""
    checkpointed: bool = False
    """Its half-done work holds checkpoints of its settings: an interrupted run resumed with other settings is
    an error rather than a fresh start (which takes --force)."""


def _sae_training(cfg: Any) -> tuple[str, ...]:
    """How the run's own SAE is trained matters only when the run trains one."""
    if not cfg.sae.train_hook:
        return ()
    return ("sae.train.*", *cfg.sae.train.unused(), "sae.eval.holdout_every")


def _heldout_corpus(cfg: Any) -> tuple[str, ...]:
    """A named held-out corpus counts by its keys; the run's own corpus is `occurrence.corpus: null`."""
    return ("occurrence.corpus.*",) if cfg.occurrence.corpus is not None else ("occurrence.corpus",)


MODEL_KEYS = ("model.backend", "model.name", "model.weights", "model.architecture", "model.tokenizer", "model.dtype")
GRAPH: dict[str, StageDef] = {
    d.name: d
    for d in (
        StageDef(
            "contexts",
            "ne harvest",
            (),
            ("data.*", "model.backend", "model.name", "model.tokenizer"),
            (s.CONTEXTS_DIR,),
            inputs="corpus",
        ),
        StageDef(
            "sae",
            "ne harvest",
            ("contexts",),
            ("sae.path", "sae.train_hook", _sae_training),
            (s.SAE_DIR, s.work_dir("sae")),
            inputs="sae",
            checkpointed=True,
        ),
        StageDef("weights", "ne harvest", ("sae",), (*MODEL_KEYS, "harvest.layers"), (s.WEIGHTS_DIR,), inputs="model"),
        StageDef(
            "maxima",
            "ne harvest",
            ("contexts", "sae"),
            (*MODEL_KEYS, "harvest.layers", "harvest.maxima_file", "harvest.direction"),
            (s.MAXIMA, s.work_dir("maxima")),
            inputs="maxima",
        ),
        StageDef(
            "examples",
            "ne harvest",
            ("contexts", "maxima"),
            (
                "harvest.k",
                "harvest.frac",
                "harvest.window_before",
                "harvest.window_after",
                "harvest.h_dtype",
                "harvest.direction",
            ),
            (s.EXAMPLES_DIR, s.H_DIR, s.work_dir("examples"), s.work_dir("h"), s.work_dir("kept")),
        ),
        StageDef(
            "cluster",
            "ne cluster",
            ("examples", "weights"),
            (
                "cluster.method",
                "cluster.cut",
                "cluster.threshold",
                "cluster.min_separation",
                "cluster.min_silhouette",
                "cluster.silhouette_tolerance",
                "cluster.max_clusters",
                "cluster.min_cluster_size",
                "model.gated_embedding",
            ),
            (s.CLUSTERS_DIR, s.DENDROGRAMS_DIR, s.CENTROIDS_DIR, s.METRICS, s.work_dir("cluster")),
            layout=("cluster.neurons_per_task",),
        ),
        StageDef("label", "ne cluster", ("cluster",), (), (s.LABELS_DIR, s.REPORT_DIR)),
        StageDef(
            "index",
            "ne index",
            ("cluster",),
            ("index.*", "-index.device", "seed", "model.gated_embedding"),
            (s.INDEX_DIR,),
        ),
        StageDef(
            "occurrence",
            "ne occurrence",
            ("cluster",),
            ("occurrence.contexts", _heldout_corpus, "occurrence.frac"),
            (s.HELDOUT_DIR, s.OCCURRENCES_DIR, s.work_dir("occurrence")),
            layout=("occurrence.contexts_per_part",),
            inputs="heldout",
        ),
        StageDef(
            "coactivation",
            "ne occurrence",
            ("occurrence",),
            ("coactivation.*", "-coactivation.memory_mb"),
            (s.FEATURES_DIR, s.COACTIVATION_DIR, s.work_dir("coactivation")),
        ),
        StageDef("scores", "ne occurrence", ("label", "occurrence"), (), (s.SCORES_DIR,)),
        StageDef(
            "embedding_scores",
            "ne occurrence",
            ("cluster", "occurrence"),
            ("scores.window_before", "scores.window_after"),
            (s.EMBEDDING_SCORES_DIR, s.work_dir("embedding_scores")),
        ),
        StageDef(
            "importance",
            "ne importance",
            ("examples",),
            ("importance.mask_token", "importance.window_before"),
            (s.IMPORTANCE_DIR,),
        ),
        StageDef(
            "describe",
            "ne describe",
            ("cluster",),
            (
                "describe.model",
                "describe.examples",
                "describe.contrast_clusters",
                "describe.contrast_examples",
                "describe.window_before",
                "describe.window_after",
                "describe.max_tokens",
                "describe.temperature",
            ),
            (s.DESCRIPTIONS_DIR,),
        ),
        # Not downstream of describe, whose runs extend it: each row names the description it scored, and a
        # changed description is scored again, so describing more clusters keeps the scores already paid for.
        StageDef(
            "detection",
            "ne describe",
            ("occurrence",),
            (
                "describe.model",
                "describe.detection_examples",
                "describe.detection_batch",
                "describe.window_before",
                "describe.window_after",
                "describe.temperature",
                "seed",
            ),
            (s.DETECTION_DIR,),
        ),
        StageDef("sae_eval", "ne run", ("sae", "cluster"), ("sae.eval.*",), (s.SAE_EVAL, s.SAE_EVAL_MD)),
        StageDef(
            "mnist_mlp",
            "ne train",
            (),
            ("seed", "data.source", "data.train_subset", "mlp.*"),
            (s.mnist_weights("mlp"),),
        ),
        StageDef(
            "mnist_sae_standard", "ne train", ("mnist_mlp",), ("sae.*", "-sae.ne_"), (s.mnist_weights("sae_standard"),)
        ),
        StageDef("mnist_sae_ne_loss", "ne train", ("mnist_mlp",), ("sae.*",), (s.mnist_weights("sae_ne_loss"),)),
        StageDef(
            "mnist_eval",
            "ne train",
            ("mnist_sae_standard", "mnist_sae_ne_loss"),
            ("eval.*", "data.test_subset"),
            s.MNIST_TABLES,
        ),
    )
}


def stages_of(*commands: str) -> tuple[str, ...]:
    """The stages the `ne` commands run (`ne harvest`, ...), in graph order."""
    return tuple(name for name, spec in GRAPH.items() if spec.command in commands)


HARVEST = stages_of("ne harvest")
MNIST_STAGES = stages_of("ne train")
LM_STAGES = tuple(name for name in GRAPH if name not in MNIST_STAGES)
"""The stages of a language-model run; an MNIST run (`ne train`) has only MNIST_STAGES."""


def ancestors(name: str) -> list[str]:
    """Every stage `name` depends on, directly or not, upstream first."""
    out: list[str] = []

    def visit(stage: str) -> None:
        for up in GRAPH[stage].upstream:
            if up not in out:
                visit(up)
                out.append(up)

    visit(name)
    return out


def descendants(name: str) -> list[str]:
    """Every stage that depends on `name`, directly or not, in graph order."""
    return [d for d in GRAPH if name in ancestors(d)]


def owner_of(rel: str) -> str | None:
    """The stage that writes run-relative path `rel`."""
    best = None
    for spec in GRAPH.values():
        for out in spec.outputs:
            if (rel == out or rel.startswith(out.rstrip("/") + "/")) and (best is None or len(out) > len(best[1])):
                best = (spec.name, out)
    return best[0] if best else None


def own_files(name: str, entry: dict) -> dict[str, dict]:
    """The files a stage's manifest entry records that the stage still owns: a run made before an output moved to
    another stage (the report moved from `cluster` to `label`) must not count that output as missing."""
    return {rel: record for rel, record in entry.get("files", {}).items() if owner_of(rel) == name}


def redo_command(stage: str, force: bool = True) -> str:
    return f"`{GRAPH[stage].command} --config CONFIG" + (f" --force {stage}`" if force else "`")
