"""The language-model SAE job: train a run's SAE on Ray Train, evaluate it, and compare SAEs trained side by side.

Stage `sae` (with `sae.train_hook`) trains the SAE: a `TorchTrainer` with `sae.trainer.num_workers` workers,
data parallel (each streams its share of the contexts through the shuffling buffer of `ne.lm_sae.buffer`;
gradients are summed with one all-reduce per step), a checkpoint every `sae.trainer.checkpoint_every` steps
under RUN/_work/sae/. Ray Train restores the latest one when a worker group fails (`sae.trainer.max_failures`)
and when an interrupted job is started again with the same settings; other settings are refused through the
stage graph (`StageDef.checkpointed`). The SAE is written in SAELens's format to RUN/sae/, which is what
`sae.path` reads, so the rest of the pipeline harvests its latents.

Stage `sae_eval` (after `cluster`) writes RUN/sae_eval.{json,md} (`ne.lm_sae.eval`). A comparison
(`sae.compare`) is one run per SAE under RUN/NAME-seedS/, each trained, harvested, clustered and evaluated,
then RUN/comparison.{md,csv,png}: every metric's mean ± std over seeds and the NE loss's paired effects.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ne import schema
from ne.config import RunConfig, from_dict, to_dict
from ne.errors import DataError
from ne.lm_sae.buffer import stream_rows
from ne.lm_sae.config import SAECompareConfig
from ne.lm_sae.eval import (
    COLUMNS,
    FORMATS,
    LMSAEMetrics,
    downstream_model,
    eval_contexts,
    evaluate_sae,
    to_markdown,
)
from ne.lm_sae.model import LMSAE, sae_from_state, saelens_files
from ne.lm_sae.train import TrainState, hook_width, train_sae
from ne.models import sae_path
from ne.models.base import MLPModel
from ne.models.hooks import check_hook
from ne.models.sae_units import load_sae
from ne.parallel import Shard
from ne.report import polysemy
from ne.stages import Stage, check_force
from ne.store import RunDir

log = logging.getLogger(__name__)

STATE = "state.pt"
WORK = "_work/sae"
FAIL_AT = "NE_TEST_FAIL_SAE_AT_STEP"


# --- stage "sae": training -------------------------------------------------------------------------------


def planned_steps(run: RunDir, cfg: RunConfig, model: MLPModel) -> int:
    """Optimiser steps of the run's SAE; a DataError when the stream holds fewer tokens than asked for."""
    train, every = cfg.sae.train, cfg.sae.eval.holdout_every
    rows = stream_rows(run, every, int(model.bos_token_id is not None))
    gives = (f"the corpus gives {rows:,} training tokens (BOS excluded, "
             + (f"1 context in {every} held out for the evaluation)" if every else "none held out)"))
    if train.train_tokens is not None and train.train_tokens > rows:
        raise DataError(f"sae.train.train_tokens is {train.train_tokens:,} but {gives}; lower train_tokens (null "
                        "takes them all) or use a longer corpus (data.max_contexts, data.source)")
    if rows < train.batch_size:
        raise DataError(f"{gives}, less than one batch of sae.train.batch_size {train.batch_size:,}; lower "
                        "batch_size or use a longer corpus")
    return (train.train_tokens or rows) // train.batch_size


def train_run_sae(run: RunDir, cfg: RunConfig, model: MLPModel) -> dict:
    """Train the run's SAE (`sae.train_hook`) and write it to RUN/sae/ in SAELens's format; returns what the
    stage records."""
    hook, train = cfg.sae.train_hook, cfg.sae.train
    check_hook(model, hook, "sae.train_hook is")
    train.check_width(hook_width(model, hook), hook)
    steps = planned_steps(run, cfg, model)
    t0 = time.time()
    if cfg.sae.trainer.num_workers == 0:
        sae, state = train_sae(model, run, hook, train, cfg.sae.eval.holdout_every, cfg.seed, steps,
                               device=model.device)
        workers = 0
    else:
        sae, state, workers = _fit(run, cfg, steps, _fail_at())
    files = saelens_files(sae, state.scale, hook, model.name, cfg.data.n_ctx, model.bos_token_id is not None,
                          _corpus(cfg))
    for name, data in files.items():
        run.write_bytes(f"{schema.SAE_DIR}/{name}", data)
    return {**state.summary(), "tokens": steps * train.batch_size, "workers": workers,
            "seconds": time.time() - t0, "train_seconds": state.seconds}


def _fail_at() -> int | None:
    """Tests only: with NE_TEST_FAIL_SAE_AT_STEP=S, a job that did not resume fails at its first checkpoint from
    step S on, before writing it, as a job killed mid-training would."""
    value = os.environ.get(FAIL_AT)
    return int(value) if value else None


def _corpus(cfg: RunConfig) -> str:
    data = cfg.data
    return {"pydoc": "pydoc_data.topics", "hf": data.name}.get(data.source, ",".join(data.paths))


def _fit(run: RunDir, cfg: RunConfig, steps: int, fail_at: int | None) -> tuple[LMSAE, TrainState, int]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.ray_utils import check_train_workers, cpus_per_worker, gpu_wanted, init_ray

    init_ray()
    trainer_cfg = cfg.sae.trainer
    use_gpu = gpu_wanted(trainer_cfg.use_gpu, "sae.trainer.use_gpu")
    check_train_workers(trainer_cfg.num_workers, use_gpu, "sae.trainer.num_workers")
    threads = 1 if use_gpu else cpus_per_worker(trainer_cfg.num_workers)
    storage = run.url if "://" in run.url else os.path.abspath(run.url)
    # Ray Train runs each worker in a directory of its own: the run directory goes to them as an absolute path.
    worker_cfg = replace(cfg, run_dir=storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(worker_cfg), "steps": steps, "threads": threads, "use_gpu": use_gpu,
                           "fail_at": fail_at},
        scaling_config=ray.train.ScalingConfig(num_workers=trainer_cfg.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name="train", storage_path=f"{storage.rstrip('/')}/{WORK}",
            failure_config=ray.train.FailureConfig(max_failures=trainer_cfg.max_failures),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = TrainState.from_dict(torch.load(os.path.join(d, STATE), weights_only=True))
    return sae_from_state(cfg.sae.train, state.sae), state, int(result.metrics.get("workers", 0))


def train_loop(config: dict) -> None:
    """One Ray Train worker: its share of every step, resuming from Ray's latest checkpoint when there is one."""
    import ray.train
    import ray.train.torch

    from ne.models import load_model

    cfg: RunConfig = from_dict(RunConfig, config["cfg"])
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    model = load_model(replace(cfg.model, device=str(device)))
    state = _restored()
    shard = Shard.current()

    def checkpoint(s: TrainState) -> None:
        if config["fail_at"] is not None and state is None and s.step >= config["fail_at"]:
            raise RuntimeError(f"injected failure at step {s.step} (tests: a job killed mid-training)")
        _report(s, shard)

    _, final = train_sae(model, RunDir(cfg.run_dir), cfg.sae.train_hook, cfg.sae.train, cfg.sae.eval.holdout_every,
                         cfg.seed, config["steps"], shard, state, checkpoint, cfg.sae.trainer.checkpoint_every, device)
    _report(final, shard)


def _report(state: TrainState, shard: Shard) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (the state is the same on every worker)."""
    import ray.train

    metrics = {"step": state.step, "workers": shard.world}
    if shard.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state.to_dict(), os.path.join(d, STATE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restored() -> TrainState | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return TrainState.from_dict(torch.load(os.path.join(d, STATE), weights_only=True))


# --- stage "sae_eval" ------------------------------------------------------------------------------------


def run_sae_eval(cfg: RunConfig, force: list[str] | tuple | set = ()) -> LMSAEMetrics:
    """Evaluate the run's SAE (trained here or named by `sae.path`) once its latents are clustered."""
    force = check_force(force, ("sae_eval",))
    run = RunDir(cfg.run_dir)
    with run.lock("ne run"):
        stage = Stage(run, "sae_eval", cfg, force)
        if not stage.needed():
            return LMSAEMetrics(**run.read_json(schema.SAE_EVAL))
        stage.begin()
        t0 = time.time()
        model, output, kind = downstream_model(cfg.model)
        sae = load_sae(sae_path(cfg))
        metrics = evaluate_sae(model, output, kind, sae, sae.cfg.metadata.hook_name,
                               eval_contexts(run, cfg.sae.eval.holdout_every), cfg.sae.eval.tokens,
                               cfg.sae.train.contexts_per_batch, cfg.sae.eval.dense_threshold)
        units = run.read_parquet(schema.METRICS).to_pandas()
        p = polysemy(units)
        metrics = replace(metrics, **{k: p[k] for k in ("with_examples", "polysemantic", "mean_dist", "silhouette",
                                                        "raw_polysemantic", "raw_mean_dist")})
        run.write_json(schema.SAE_EVAL, asdict(metrics))
        run.write_bytes(schema.SAE_EVAL_MD, to_markdown({sae_path(cfg): asdict(metrics)}).encode())
        stage.done(seconds=time.time() - t0)
        return metrics


# --- a comparison ----------------------------------------------------------------------------------------

STANDARD = "standard"


def variant_name(ne_coeff: float | None) -> str:
    return STANDARD if ne_coeff is None else f"ne{ne_coeff:g}"


def comparison_runs(cfg: RunConfig) -> dict[str, tuple[str, int, RunConfig]]:
    """Run name → (variant, seed, the run's config): the standard SAE and one NE-loss SAE per λ2, per seed."""
    out = {}
    root = cfg.run_dir.rstrip("/")
    for seed in cfg.sae.compare.seeds:
        for coeff in (None, *cfg.sae.compare.ne_coeffs):
            train = replace(cfg.sae.train, loss="none") if coeff is None else replace(cfg.sae.train, loss="ne",
                                                                                      ne_coeff=coeff)
            name = f"{variant_name(coeff)}-seed{seed}"
            sae = replace(cfg.sae, train=train, compare=SAECompareConfig())
            out[name] = (variant_name(coeff), seed, replace(cfg, run_dir=f"{root}/{name}", seed=seed, sae=sae))
    return out


@dataclass
class Comparison:
    runs: dict[str, dict] = field(default_factory=dict)
    """Run name → its metrics (`LMSAEMetrics` as a dict) plus `variant`, `seed` and its training record."""
    table: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.table}\ncomparison done in {self.seconds:.0f} s"


def run_comparison(cfg: RunConfig, force: list[str] | tuple | set = ()) -> Comparison:
    """Train, harvest, cluster and evaluate every SAE of `sae.compare`, then write the comparison."""
    from jobs.cluster import run_cluster
    from jobs.harvest import run_harvest
    from ne.stages import HARVEST

    t0 = time.time()
    out = Comparison()
    root = RunDir(cfg.run_dir)
    with root.lock("ne run"):
        for name, (variant, seed, sub) in comparison_runs(cfg).items():
            log.info("comparison: %s", name)
            run_harvest(sub, force=set(force) & set(HARVEST))
            run_cluster(sub, force=set(force) & {"cluster"})
            metrics = run_sae_eval(sub, force=set(force) & {"sae_eval"})
            trained = RunDir(sub.run_dir).manifest()["stages"]["sae"]["info"]
            out.runs[name] = {**asdict(metrics), "variant": variant, "seed": seed, "train_tokens": trained["tokens"],
                              "train_seconds": trained["train_seconds"]}
        out.table = write_comparison(root, cfg, out.runs)
    out.seconds = time.time() - t0
    return out


def paired_effects(runs: dict[str, dict], variant: str, columns: list[str]) -> dict[str, dict]:
    """Per metric, the change from the standard SAE to `variant`, paired by seed: mean, standard error (ddof 1)
    and the verdict: `up` or `down` beyond 2 standard errors, else `no clear change`."""
    base = {r["seed"]: r for r in runs.values() if r["variant"] == STANDARD}
    other = {r["seed"]: r for r in runs.values() if r["variant"] == variant}
    seeds = sorted(set(base) & set(other))
    out = {}
    for c in columns:
        diffs = np.array([other[s][c] - base[s][c] for s in seeds], dtype=float)
        sem = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        mean = float(diffs.mean())
        if math.isnan(sem):
            verdict = "one seed: no standard error"
        else:
            verdict = "no clear change" if not abs(mean) > 2 * sem else ("up" if mean > 0 else "down")
        out[c] = {"change": mean, "sem": sem, "verdict": verdict, "seeds": len(seeds)}
    return out


def write_comparison(root: RunDir, cfg: RunConfig, runs: dict[str, dict]) -> str:
    """comparison.md (means ± std per variant, paired effects, corpus size), comparison.csv (every run) and
    comparison.png (downstream cost and reconstruction against polysemy)."""
    variants = list(dict.fromkeys(r["variant"] for r in runs.values()))
    columns = [c for c in COLUMNS if c not in ("tokens",) and any(not math.isnan(float(r[c])) for r in runs.values())]
    means, stds = {}, {}
    for v in variants:
        rows = [r for r in runs.values() if r["variant"] == v]
        means[v] = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}
        stds[v] = {c: float(np.std([r[c] for r in rows], ddof=1)) if len(rows) > 1 else math.nan for c in COLUMNS}
    first = next(iter(runs.values()))
    seeds = sorted({r["seed"] for r in runs.values()})
    lines = [f"SAEs at {cfg.sae.train_hook} of {cfg.model.name}, {cfg.sae.train.architecture}, "
             f"{cfg.sae.train.expansion}× expansion" + (f", k = {cfg.sae.train.k}" if cfg.sae.train.architecture
                                                        == "topk" else "")
             + f"; trained on {first['train_tokens']:,} tokens of {_corpus(cfg)} (one pass), evaluated on "
               f"{first['tokens']:,} held-out tokens; seeds {', '.join(map(str, seeds))}; mean ± std (ddof 1).", "",
             to_markdown(means, stds)]
    for v in variants[1:]:
        effects = paired_effects(runs, v, columns)
        lines += ["", f"{v} against {STANDARD}, paired by seed (same initialisation and batches): change (paired "
                      "s.e.) and verdict (beyond 2 s.e.)", "", "| metric | change | s.e. | verdict |",
                  "|---|---|---|---|"]
        for c, e in effects.items():
            fmt = FORMATS[c]
            lines.append(f"| {c} | {'+' if e['change'] >= 0 else ''}{fmt.format(e['change'])} | "
                         f"{fmt.format(e['sem']) if not math.isnan(e['sem']) else ''} | {e['verdict']} |")
    text = "\n".join(lines) + "\n"
    root.write_bytes(f"{schema.COMPARISON}.md", text.encode())
    header = ["run", "variant", "seed", *COLUMNS, "train_tokens", "train_seconds"]
    csv = [",".join(header)] + [",".join([name, *(str(r[h]) for h in header[1:])]) for name, r in runs.items()]
    root.write_bytes(f"{schema.COMPARISON}.csv", ("\n".join(csv) + "\n").encode())
    root.write_bytes(f"{schema.COMPARISON}.png", comparison_plot(runs, variants))
    return text


def comparison_plot(runs: dict[str, dict], variants: list[str]) -> bytes:
    """Two panels, one small point per SAE and a large one per variant's mean: the downstream cost against the
    share of latents with ≥ 2 feature clusters, and FVU against the median mean distance of their examples;
    filled for the neuron embeddings, hollow for the examples' raw SAE inputs."""
    import io

    from matplotlib.figure import Figure

    causal = any(not math.isnan(float(r["ce_increase"])) for r in runs.values())
    cost_name = "CE increase (nats)" if causal else "1 - cosine of sentence embeddings (spliced vs clean)"

    def cost(r: dict) -> float:
        return float(r["ce_increase"]) if causal else 1.0 - float(r["cosine"])

    fig = Figure(figsize=(11, 4.4))
    panels = [(fig.add_subplot(1, 2, 1), cost, cost_name, "polysemantic", "latents with ≥ 2 feature clusters"),
              (fig.add_subplot(1, 2, 2), lambda r: float(r["fvu"]), "FVU", "mean_dist",
               "median mean cosine distance of a latent's examples")]
    for ax, x_of, x_name, y_key, y_name in panels:
        for space, fill in (("", True), ("raw_", False)):
            centres = []
            for i, v in enumerate(variants):
                rows = [r for r in runs.values() if r["variant"] == v]
                xs, ys = [x_of(r) for r in rows], [float(r[space + y_key]) for r in rows]
                face = f"C{i}" if fill else "none"
                ax.scatter(xs, ys, facecolors=face, edgecolors=f"C{i}", alpha=0.5, s=20)
                centres.append((float(np.mean(xs)), float(np.mean(ys))))
                label = f"{v}, " + ("neuron embeddings" if fill else "raw inputs h")
                ax.scatter(*centres[-1], facecolors=face, edgecolors="black" if fill else f"C{i}", s=90,
                           linewidths=1.5, label=label, zorder=3)
            if len(variants) > 2:
                ax.plot(*zip(*centres), color="gray", lw=1, ls="-" if fill else "--", zorder=2)
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
