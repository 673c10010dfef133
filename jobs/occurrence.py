"""The occurrence, co-activation and score stages: Ray actors scan held-out text, Ray tasks count what fires
together, then every label is scored on that text.

occurrence    the held-out contexts into `heldout/`, then actors (one model replica each, as the harvest's)
              take held-out parts from a queue and write `occurrences/layer=L/part-N.parquet`. A part's file
              of a layer is written whole, atomically, or not at all, so an interrupted stage resumes with the
              files that are missing and nothing is lost or written twice. Layers whose cluster vectors do not
              fit in `occurrence.memory_mb` together are scanned in separate passes.
coactivation  step 1, a task per held-out part: pair counts and activations under `_work/coactivation/`, with
              a small histogram written last as the part's marker; step 2, a task per range of features (cut
              so one holds at most `coactivation.memory_mb` of pairs): `coactivation/` and `features/`, the
              features part last. Finished tasks are skipped on resume; the plan of ranges is kept in `_work`.
scores        in this process, once the run has labels: every feature cluster's label against the held-out text
              (`ne.scores`), one `scores/` part per layer.
embedding_scores  in this process, unless scores.embedding is false: every feature cluster's held-out occurrences
              against its examples by windows of text in a sentence encoder (`ne.embedding_scores`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from tqdm.auto import tqdm

from jobs.ray_utils import get, init_ray, model_actor_options, run_on_actors
from ne import coactivation as co
from ne import schema
from ne.compute.coactivation import plan_ranges
from ne.compute.harvest import SIGNS
from ne.config import RunConfig
from ne.embedding_scores import write_embedding_scores
from ne.explain import Explainer
from ne.models import UnitModel, load_model, units_on
from ne.occurrence import (
    OCCURRENCE_ROW_GROUP,
    heldout_parts,
    layer_groups,
    occurrence_file,
    part_occurrences,
    read_heldout,
    write_heldout,
)
from ne.rundir.graph import stages_of
from ne.rundir.maxima import signed_extremes
from ne.rundir.stages import Stage, check_force, state_of
from ne.rundir.store import RunDir
from ne.scores import write_scores

log = logging.getLogger(__name__)

STAGES = stages_of("ne occurrence")
WORK = schema.work_dir("coactivation")
PAIR_ROW_GROUP = 262_144
"""Rows per row group of step 1's files: step 2 decodes only the groups whose keys fall in its range."""


class OccurrenceProcessor:
    """One model replica; writes the occurrence files of one held-out part for a group of layers at a time."""

    def __init__(self, cfg: RunConfig, threads: int, n_devices: int = 1, model: UnitModel | None = None):
        from ne.models import load_units

        torch.set_num_threads(threads)
        self.cfg, self.run = cfg, RunDir(cfg.run_dir)
        self.model = model if model is not None else load_units(cfg, n_devices)
        self.explainer: Explainer | None = None

    def process(self, item: tuple[int, tuple[int, ...]]) -> int:
        """Held-out part `item[0]` for layers `item[1]`; returns its tokens."""
        part, layers = item
        if self.explainer is None or tuple(self.explainer.layers) != tuple(layers):
            self.explainer = None  # one group's vectors at a time
            self.explainer = Explainer.load(self.run.url, self.model, self.cfg.occurrence.frac, layers=list(layers))
        contexts = read_heldout(self.run, part)
        for layer, table in part_occurrences(self.explainer, contexts, self.cfg.harvest.batch_size).items():
            self.run.write_parquet(occurrence_file(layer, part), table, row_group_size=OCCURRENCE_ROW_GROUP)
        return sum(len(t) for _, t in contexts)


OccurrenceWorker = ray.remote(OccurrenceProcessor)


@dataclass
class OccurrenceSummary:
    run_dir: str
    skipped: str = ""
    occurrence: dict = field(default_factory=dict)
    coactivation: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    embedding_scores: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.skipped:
            return f"occurrence skipped: {self.skipped}"
        o, c = self.occurrence, self.coactivation
        rows = sum(o["rows"].values())
        return (
            f"occurrence done in {o['seconds']:.1f} s: {o['contexts']} held-out contexts ({o['tokens']} tokens, "
            f"ctx_ids {o['first_ctx_id']}..), {rows} occurrences at frac {o['frac']} "
            f"({rows / max(o['tokens'], 1):.1f} per token)\n"
            f"co-activation done in {c['seconds']:.1f} s: {c['features_seen']} of {c['features']} feature clusters "
            f"occur; {c['pairs']} pairs stored (each feature's best {c['partners']} by {c['score']} of those firing "
            f"together on at least {c['min_count']} tokens)\n"
            + (
                f"scores done in {self.scores['seconds']:.1f} s: every feature cluster's label on "
                f"{self.scores['tokens']} held-out tokens\n"
                if self.scores
                else "scores skipped: the run has no labels (`ne cluster` writes them)\n"
            )
            + (
                f"embedding scores done in {e['seconds']:.1f} s: {e['heldout_scored']} held-out occurrences of "
                f"{e['clusters']} feature clusters scored by their windows of text ({e['window'][0]} tokens before, "
                f"{e['window'][1]} after)\n"
                if (e := self.embedding_scores)
                else "embedding scores skipped: scores.embedding is false\n"
            )
            + f"outputs: {self.run_dir}/ (heldout/, occurrences/, features/, coactivation/, scores/, embedding_scores/)"
        )


def run_occurrence(cfg: RunConfig, force: Collection[str] = (), in_process: bool | None = None) -> OccurrenceSummary:
    """Run (or resume) the occurrence and co-activation stages of `cfg`. `in_process`: no Ray (default: when
    harvest.num_workers is 0)."""
    force = check_force(force, STAGES)
    run = RunDir(cfg.run_dir)
    local = cfg.harvest.num_workers == 0 if in_process is None else in_process
    with run.lock("ne occurrence"):
        if cfg.occurrence.contexts == 0:
            return OccurrenceSummary(run.url, skipped="occurrence.contexts is 0")
        stage = Stage(run, "occurrence", cfg, force)
        if stage.needed():
            stage.begin()
            stage.done(**_occurrences(run, cfg, local))
        second = Stage(run, "coactivation", cfg, force)
        if second.needed():
            second.begin()
            second.done(**_coactivation(run, cfg, local))
        scores: dict = {}
        if state_of(run.manifest(), "label")[0] == "done":  # a run made before labels existed has none to score
            third = Stage(run, "scores", cfg, force)
            if third.needed():
                third.begin()
                third.done(**write_scores(run, list(run.manifest()["stages"]["occurrence"]["info"]["layers"])))
            scores = run.manifest()["stages"]["scores"]["info"]
        embedding: dict = {}
        if cfg.scores.embedding:
            fourth = Stage(run, "embedding_scores", cfg, force)
            if fourth.needed():
                fourth.begin()
                fourth.done(
                    **write_embedding_scores(run, cfg, list(run.manifest()["stages"]["occurrence"]["info"]["layers"]))
                )
            embedding = run.manifest()["stages"]["embedding_scores"]["info"]
        m = run.manifest()["stages"]
        return OccurrenceSummary(
            run.url,
            occurrence=m["occurrence"]["info"],
            coactivation=m["coactivation"]["info"],
            scores=scores,
            embedding_scores=embedding,
        )


def _occurrences(run: RunDir, cfg: RunConfig, local: bool) -> dict:
    start = time.perf_counter()
    m = run.manifest()["stages"]
    n_harvest, layers = int(m["contexts"]["info"]["n_contexts"]), list(m["cluster"]["info"]["layers"])
    base = load_model(cfg.model)
    heldout = write_heldout(run, cfg, base, n_harvest)
    parts = heldout_parts(run)
    groups = layer_groups(run, layers, cfg.occurrence.memory_mb)
    todo = [
        (p, tuple(g)) for g in groups for p in parts if not all(run.exists(occurrence_file(layer, p)) for layer in g)
    ]
    bar = tqdm(total=len(todo), unit="part", desc="occurrence")
    try:
        if local:
            processor = OccurrenceProcessor(cfg, torch.get_num_threads(), model=units_on(base, cfg))
            for item in todo:
                processor.process(item)
                bar.update(1)
        elif todo:
            del base
            _on_actors(cfg, todo, bar)
    finally:
        bar.close()
    rows = {str(layer): sum(run.read_footer(occurrence_file(layer, p)).num_rows for p in parts) for layer in layers}
    first_ctx = int(read_heldout(run, parts[0])[0][0])
    return {
        **heldout,
        "layers": layers,
        "rows": rows,
        "frac": cfg.occurrence.frac,
        "first_ctx_id": first_ctx,
        "passes": len(groups),
        "seconds": time.perf_counter() - start,
    }


def _on_actors(cfg: RunConfig, todo: list, bar) -> None:
    init_ray()
    h = cfg.harvest
    n, threads, options = model_actor_options(
        "harvest", h.num_workers, h.use_gpu, len(todo), "parts", h.gpus_per_worker
    )
    workers = [
        OccurrenceWorker.options(**options).remote(cfg, threads, int(options.get("num_gpus", 0)) or 1) for _ in range(n)
    ]
    try:
        run_on_actors(workers, "process", todo, on_done=lambda _: bar.update(1))
    finally:
        for worker in workers:
            ray.kill(worker)  # type: ignore[arg-type]  # an actor handle; Ray's stubs type it as its class too


# --- co-activation ---------------------------------------------------------------------------------------


def count_part(
    run_url: str,
    part: int,
    layers: list[int],
    ids: co.FeatureIds,
    n_ctx: int,
    extremes: dict[int, np.ndarray],
    max_per_token: int | None,
) -> None:
    """Step 1 for one held-out part: its pair counts and activations, then its histogram (the marker)."""
    run = RunDir(run_url)
    tables = [
        run.read_parquet(occurrence_file(layer, part), columns=["ctx_id", "pos", "layer", "unit", "cluster", "act"])
        for layer in layers
    ]
    pairs, acts, pair_rows, occurrences = co.part_counts(tables, ids, n_ctx, extremes, max_per_token)
    run.write_parquet(schema.part_path(f"{WORK}/pairs", part), pairs, row_group_size=PAIR_ROW_GROUP)
    run.write_parquet(schema.part_path(f"{WORK}/acts", part), acts, row_group_size=PAIR_ROW_GROUP)
    present = np.flatnonzero(pair_rows | occurrences)
    run.write_parquet(
        schema.part_path(f"{WORK}/hist", part),
        pa.table(
            {
                "feature": pa.array(present.astype(np.int32)),
                "pair_rows": pa.array(pair_rows[present]),
                "occurrences": pa.array(occurrences[present]),
            }
        ),
    )


def merge_range(
    run_url: str,
    index: int,
    lo: int,
    hi: int,
    ids: co.FeatureIds,
    occurrences: np.ndarray,
    n_tokens: int,
    score: str,
    min_count: int,
    partners: int,
    sign: float,
) -> int:
    """Step 2 for features lo..hi-1: their pairs summed, cut and scored, and their statistics; returns pairs."""
    run = RunDir(run_url)
    n = max(ids.n, 1)
    in_range = (pc.field("key") >= lo * n) & (pc.field("key") < hi * n)
    pairs = [
        run.read_parquet(f"{WORK}/pairs/{name}", filters=in_range) for name in run.ls(WORK, "pairs", suffix=".parquet")
    ]
    keys, counts = co.merge_pairs(pairs, min_count)
    del pairs
    for layer, table in co.coactivation_tables(keys, counts, ids, occurrences, n_tokens, score, partners).items():
        run.write_parquet(schema.part_path(schema.COACTIVATION_DIR, index, layer), table, row_group_size=8192)
    feature_range = (pc.field("feature") >= lo) & (pc.field("feature") < hi)
    acts = [
        run.read_parquet(f"{WORK}/acts/{name}", filters=feature_range)
        for name in run.ls(WORK, "acts", suffix=".parquet")
    ]
    run.write_parquet(
        schema.part_path(schema.FEATURES_DIR, index),
        co.feature_stats(acts, lo, hi, ids, n_tokens, sign),
        row_group_size=8192,
    )
    return len(keys)


def _coactivation(run: RunDir, cfg: RunConfig, local: bool) -> dict:
    start = time.perf_counter()
    info = run.manifest()["stages"]["occurrence"]["info"]
    layers, n_tokens = list(info["layers"]), int(info["tokens"])
    ids = co.feature_ids(run, layers)
    parts = heldout_parts(run)
    todo = [p for p in parts if not run.exists(schema.part_path(f"{WORK}/hist", p))]
    tasks = _Tasks(local)
    extremes = signed_extremes(run, layers, cfg.harvest.direction)
    tasks.map(
        count_part,
        [(run.url, p, layers, ids, cfg.data.n_ctx, extremes, cfg.coactivation.max_per_token) for p in todo],
        "co-activation: count",
    )
    hist = run.read_parquet(f"{WORK}/hist")
    pair_rows, occurrences = np.zeros(ids.n, np.int64), np.zeros(ids.n, np.int64)
    feature = hist.column("feature").to_numpy()
    np.add.at(pair_rows, feature, hist.column("pair_rows").to_numpy())
    np.add.at(occurrences, feature, hist.column("occurrences").to_numpy())
    plan_file = f"{WORK}/ranges.json"
    if run.exists(plan_file):
        ranges = [tuple(r) for r in run.read_json(plan_file)]
    else:
        ranges = plan_ranges(pair_rows, cfg.coactivation.memory_mb)
        run.write_json(plan_file, ranges)
    sign = SIGNS[cfg.harvest.direction]
    c = cfg.coactivation
    todo_ranges = [
        (i, lo, hi) for i, (lo, hi) in enumerate(ranges) if not run.exists(schema.part_path(schema.FEATURES_DIR, i))
    ]
    tasks.map(
        merge_range,
        [
            (run.url, i, lo, hi, ids, occurrences, n_tokens, c.score, c.min_count, c.partners, sign)
            for i, lo, hi in todo_ranges
        ],
        "co-activation: merge",
    )
    pairs = sum(
        run.read_footer(f"{schema.layer_dir(schema.COACTIVATION_DIR, layer)}/{name}").num_rows
        for layer in run.layers(schema.COACTIVATION_DIR)
        for name in run.ls(schema.layer_dir(schema.COACTIVATION_DIR, layer), suffix=".parquet")
    )
    return {
        "tokens": n_tokens,
        "features": ids.n,
        "features_seen": int((occurrences > 0).sum()),
        "pairs": pairs,
        "ranges": len(ranges),
        "score": c.score,
        "min_count": c.min_count,
        "partners": c.partners,
        "max_per_token": c.max_per_token,
        "seconds": time.perf_counter() - start,
    }


class _Tasks:
    """Functions over argument tuples: Ray tasks (one CPU each), or in this process."""

    def __init__(self, local: bool):
        self.local = local

    def map(self, fn, calls: list[tuple], desc: str) -> None:
        if not calls:
            return
        bar = tqdm(total=len(calls), unit="task", desc=desc)
        try:
            if self.local:
                for args in calls:
                    fn(*args)
                    bar.update(1)
                return
            init_ray()
            remote = ray.remote(num_cpus=1, max_retries=2)(fn)
            shared: dict[int, ray.ObjectRef] = {}  # the big arguments (feature ids, counts) go to the store once

            def put(a):
                if not isinstance(a, (co.FeatureIds, np.ndarray, dict)):
                    return a
                if id(a) not in shared:
                    shared[id(a)] = ray.put(a)
                return shared[id(a)]

            refs = [remote.remote(*[put(a) for a in args]) for args in calls]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                get(done[0])
                bar.update(1)
        finally:
            bar.close()
