"""LLM detection scores of feature-cluster descriptions on held-out text: `ne describe --score`, the `detection` stage.

delphi's detection scoring on the run's held-out text. For each described cluster, `describe.detection_examples`
windows of held-out text (`describe.window_before` tokens before a token to `describe.window_after` after) centred on
tokens where the cluster occurs (`occurrences/`) are mixed with as many where it does not: up to half at occurrences
of the unit's other clusters, the rest at held-out tokens where the unit does not fire. Given only the description,
the LLM says which texts the feature fires in (`ne.describe.detection_score`); no token is marked. The score is the
balanced accuracy. Samples come from a generator seeded by (seed, layer, neuron, cluster), so a rerun asks the same
question, and each row keeps the tokens it asked about. Rows are written `describe.flush_every` at a time as parts of
`detection/`, so a killed or failed run keeps what it scored and the next one scores the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ne import schema
from ne.compute.scores import TOKEN_KEY
from ne.config import RunConfig
from ne.describe import (
    ChatClient,
    DetectionScore,
    PartWriter,
    clusters_to_describe,
    detection_score,
    read_descriptions,
    run_until_failure,
)
from ne.errors import ConfigError, DataError
from ne.occurrence import heldout_parts, read_heldout
from ne.rundir.graph import stages_of
from ne.rundir.stages import Stage, check_force, require_done
from ne.rundir.store import RunDir


def read_detection(run: RunDir) -> dict[tuple[int, int, int], dict]:
    """{(layer, neuron, cluster): row} of the stored detection score of each cluster's current description; a
    score of a description since replaced (`ne describe --force describe`) is never served."""
    current = {key: row["description"] for key, row in read_descriptions(run).items()}
    out: dict[tuple[int, int, int], dict] = {}
    for name in run.ls(schema.DETECTION_DIR, suffix=".parquet"):
        for row in run.read_parquet(f"{schema.DETECTION_DIR}/{name}").to_pylist():
            key = (row["layer"], row["neuron"], row["cluster"])
            if current.get(key) == row["description"]:
                out[key] = row
    return out


def sample_tokens(
    mine: np.ndarray, others: np.ndarray, quiet: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives), sorted token keys: up to `n` of `mine` (where the cluster occurs), and as many of
    `others` (the unit's other clusters' occurrences, up to half) and `quiet` (where the unit does not fire)."""
    positives = rng.choice(mine, min(n, len(mine)), replace=False)
    k = min(len(others), len(positives) // 2)
    negatives = np.concatenate(
        [rng.choice(others, k, replace=False), rng.choice(quiet, min(len(positives) - k, len(quiet)), replace=False)]
    )
    return np.sort(positives), np.sort(negatives)


@dataclass
class DetectionSummary:
    scored: int
    """Descriptions scored by this call."""
    cached: int
    """Descriptions asked for that already had a score."""
    not_occurring: int
    """Of those scored now, clusters that never occur on the held-out text: nothing to score them on (NaN)."""
    mean_balanced_accuracy: float
    """Over every stored score of the clusters asked for."""
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    def describe(self) -> str:
        return (
            f"detection done in {self.seconds:.1f} s: {self.scored} descriptions scored now, {self.cached} already "
            f"scored, {self.not_occurring} never occur on the held-out text; mean balanced accuracy "
            f"{self.mean_balanced_accuracy:.3f}; tokens used: {self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion = {self.prompt_tokens + self.completion_tokens:,}"
        )


class HeldOut:
    """The run's held-out text and, per unit, where it fires there: what detection samples from."""

    def __init__(self, run: RunDir, decode: Callable[[Sequence[int]], list[str]], before: int, after: int):
        model = run.manifest().get("model", {})
        self.special = {t for t in (model.get("bos_token_id"), model.get("pad_token_id")) if t is not None}
        self.tokens = {int(c): np.asarray(t) for part in heldout_parts(run) for c, t in read_heldout(run, part)}
        self.keys = np.sort(
            np.concatenate(
                [
                    np.int64(c) * TOKEN_KEY + np.flatnonzero(~np.isin(t, list(self.special)))
                    for c, t in self.tokens.items()
                ]
            )
        )
        self.run, self.decode, self.before, self.after = run, decode, before, after
        self.lock = threading.Lock()
        self.units: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def occurrences(self, layer: int, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(token keys, clusters) of the unit's held-out occurrences."""
        with self.lock:
            if (layer, unit) not in self.units:
                table = self.run.read_parquet(
                    schema.layer_dir(schema.OCCURRENCES_DIR, layer),
                    columns=["ctx_id", "pos", "cluster"],
                    filters=[("unit", "=", int(unit))],
                )
                keys = table.column("ctx_id").to_numpy().astype(np.int64) * TOKEN_KEY + table.column("pos").to_numpy()
                self.units = {(layer, unit): (keys, table.column("cluster").to_numpy())}  # one unit at a time
            return self.units[(layer, unit)]

    def text(self, key: int) -> str:
        tokens = self.tokens[int(key // TOKEN_KEY)]
        pos = int(key % TOKEN_KEY)
        ids = [int(t) for t in tokens[max(0, pos - self.before) : pos + self.after + 1] if int(t) not in self.special]
        return "".join(self.decode(ids)).strip().replace("\n", "⏎")


def score_descriptions(
    run: RunDir, todo: Sequence[tuple[int, int, int]], described: dict, client: ChatClient, cfg: RunConfig, decode
) -> DetectionSummary:
    """Score the description of each (layer, neuron, cluster) of `todo` that has no score of that description yet,
    `describe.max_concurrency` at a time; on the first failure, keep what finished and raise."""
    start = time.perf_counter()
    d = cfg.describe
    have = read_detection(run)
    wanted = [t for t in todo if t not in have]
    counts = {"prompt": 0, "completion": 0, "absent": 0}
    if not wanted:
        return _summary(run, todo, 0, len(todo), counts, start)
    held = HeldOut(run, decode, d.window_before, d.window_after)
    writer = PartWriter(run, d.flush_every, schema.DETECTION_DIR, schema.DETECTION)
    lock = threading.Lock()

    def score_one(item: tuple[int, int, int]) -> None:
        layer, neuron, cluster = item
        keys, clusters = held.occurrences(layer, neuron)
        mine, others = keys[clusters == cluster], keys[clusters != cluster]
        description = described[item]["description"]
        rng = np.random.default_rng([cfg.seed, layer, neuron, cluster])
        positives, negatives = sample_tokens(mine, others, np.setdiff1d(held.keys, keys), d.detection_examples, rng)
        if len(positives) and len(negatives):
            score = detection_score(
                client,
                description,
                [held.text(k) for k in positives],
                [held.text(k) for k in negatives],
                d.detection_batch,
                seed=int(rng.integers(2**31)),
            )
        else:  # never occurs there (or fires on every token): recorded, so a rerun does not ask again
            score = DetectionScore(float("nan"), float("nan"), float("nan"), len(positives), len(negatives))
        writer.add(
            {
                "layer": layer,
                "neuron": neuron,
                "cluster": cluster,
                "description": description,
                "model": d.model,
                "balanced_accuracy": score.balanced_accuracy,
                "true_positive_rate": score.true_positive_rate,
                "true_negative_rate": score.true_negative_rate,
                "positives": positives.tolist(),
                "negatives": negatives.tolist(),
                "prompt_tokens": score.prompt_tokens,
                "completion_tokens": score.completion_tokens,
            }
        )
        with lock:
            counts["prompt"] += score.prompt_tokens
            counts["completion"] += score.completion_tokens
            counts["absent"] += not len(positives)

    failure = run_until_failure(score_one, wanted, d.max_concurrency)
    writer.flush()
    if failure is not None:
        if isinstance(failure, (DataError, ConfigError)):
            raise type(failure)(
                f"{failure} ({writer.written} detection scores made before the failure are kept; rerun to score "
                "the rest)"
            ) from None
        raise failure
    return _summary(run, todo, writer.written, len(todo) - len(wanted), counts, start)


def _summary(run: RunDir, todo, written: int, cached: int, counts: dict, start: float) -> DetectionSummary:
    stored = read_detection(run)
    scores = [stored[t]["balanced_accuracy"] for t in todo if t in stored]
    scores = [x for x in scores if x is not None and x == x]  # not NaN: a cluster that never occurs
    return DetectionSummary(
        written,
        cached,
        counts["absent"],
        float(np.mean(scores)) if scores else float("nan"),
        counts["prompt"],
        counts["completion"],
        time.perf_counter() - start,
    )


def run_detection(
    cfg: RunConfig,
    layers: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    limit: int | None = None,
    force: Sequence[str] = (),
) -> DetectionSummary:
    """Score the stored descriptions of the run's clusters (those of `layers` and `neurons`, the first `limit`) on
    its held-out text; the `detection` stage adds to what is there."""
    from ne.models import load_token_decoder

    forced = check_force(force, stages_of("ne describe"))
    run = RunDir(cfg.run_dir)
    with run.lock("ne describe"):
        require_done(run, "describe")
        stage = Stage(run, "detection", cfg, forced)
        needed = stage.needed()
        client = ChatClient(cfg.describe, cfg.seed)
        described = read_descriptions(run)
        todo = [
            t for t in clusters_to_describe(run, layers, neurons, limit, cfg.cluster.min_cluster_size) if t in described
        ]
        have = {} if needed else read_detection(run)
        if not needed and all(t in have for t in todo):
            return score_descriptions(run, todo, described, client, cfg, None)  # a finished step: nothing to ask
        stage.begin(extend=not needed)
        summary = score_descriptions(run, todo, described, client, cfg, load_token_decoder(cfg.model))
        stage.done(scored=len(read_detection(run)))
        return summary
