"""The language-model SAE job: train a run's SAE on Ray Train and evaluate it.

Stage `sae` (with `sae.train_hook`) trains the SAE: a `TorchTrainer` with `sae.trainer.num_workers` workers,
data parallel (each streams its share of the contexts through the shuffling buffer of `ne.lm_sae.buffer`;
gradients are summed with one all-reduce per step), a checkpoint every `sae.trainer.checkpoint_every` steps
under RUN/_work/sae/. Ray Train restores the latest one when a worker group fails (`sae.trainer.max_failures`)
and when an interrupted job is started again with the same settings; other settings are refused through the
stage graph (`StageDef.checkpointed`). The SAE is written in SAELens's format to RUN/sae/, which is what
`sae.path` reads, so the rest of the pipeline harvests its latents.

Stage `sae_eval` (after `cluster`) writes RUN/sae_eval.{json,md} (`ne.lm_sae.eval`). SAEs trained side by side
(`sae.compare`) are `jobs.lm_sae_compare`'s.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, replace

import torch

from ne import schema
from ne.compute.lm_sae import LMSAE, sae_from_state, saelens_files
from ne.compute.parallel import Shard
from ne.config import RunConfig, from_dict, to_dict
from ne.errors import DataError
from ne.lm_sae.buffer import stream_rows
from ne.lm_sae.eval import (
    LMSAEMetrics,
    downstream_model,
    eval_contexts,
    evaluate_sae,
    to_markdown,
)
from ne.lm_sae.train import TrainState, hook_width, train_sae
from ne.models import sae_path
from ne.models.base import UnitModel
from ne.models.hooks import check_hook
from ne.models.sae_units import load_sae
from ne.rundir.report import polysemy
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

STATE = "state.pt"
WORK = schema.work_dir("sae")
FAIL_AT = "NE_TEST_FAIL_SAE_AT_STEP"


# --- stage "sae": training -------------------------------------------------------------------------------


def planned_steps(run: RunDir, cfg: RunConfig, model: UnitModel) -> int:
    """Optimiser steps of the run's SAE; a DataError when the stream holds fewer tokens than asked for."""
    train, every = cfg.sae.train, cfg.sae.eval.holdout_every
    rows = stream_rows(run, every, int(model.bos_token_id is not None))
    gives = f"the corpus gives {rows:,} training tokens (BOS excluded, " + (
        f"1 context in {every} held out for the evaluation)" if every else "none held out)"
    )
    if train.train_tokens is not None and train.train_tokens > rows:
        raise DataError(
            f"sae.train.train_tokens is {train.train_tokens:,} but {gives}; lower train_tokens (null "
            "takes them all) or use a longer corpus (data.max_contexts, data.source)"
        )
    if rows < train.batch_size:
        raise DataError(
            f"{gives}, less than one batch of sae.train.batch_size {train.batch_size:,}; lower "
            "batch_size or use a longer corpus"
        )
    return (train.train_tokens or rows) // train.batch_size


def train_run_sae(run: RunDir, cfg: RunConfig, model: UnitModel) -> dict:
    """Train the run's SAE (`sae.train_hook`) and write it to RUN/sae/ in SAELens's format; returns what the
    stage records."""
    hook, train = cfg.sae.train_hook, cfg.sae.train
    assert hook is not None, "the sae stage trains only when sae.train_hook is set"
    check_hook(model, hook, "sae.train_hook is")
    train.check_width(hook_width(model, hook), hook)
    steps = planned_steps(run, cfg, model)
    t0 = time.time()
    if cfg.sae.trainer.num_workers == 0:
        sae, state = train_sae(
            model, run, hook, train, cfg.sae.eval.holdout_every, cfg.seed, steps, device=model.device
        )
        workers = 0
    else:
        sae, state, workers = _fit(run, cfg, steps, _fail_at())
    files = saelens_files(
        sae, state.scale, hook, model.name, cfg.data.n_ctx, model.bos_token_id is not None, corpus_name(cfg)
    )
    for name, data in files.items():
        run.write_bytes(f"{schema.SAE_DIR}/{name}", data)
    return {
        **state.summary(),
        "tokens": steps * train.batch_size,
        "workers": workers,
        "seconds": time.time() - t0,
        "train_seconds": state.seconds,
    }


def _fail_at() -> int | None:
    """Tests only: with NE_TEST_FAIL_SAE_AT_STEP=S, a job that did not resume fails at its first checkpoint from
    step S on, before writing it, as a job killed mid-training would."""
    value = os.environ.get(FAIL_AT)
    return int(value) if value else None


def corpus_name(cfg: RunConfig) -> str:
    """The corpus as SAELens records it (`dataset_path`) and the comparison names it."""
    data = cfg.data
    return {"pydoc": "pydoc_data.topics", "hf": data.name}.get(data.source, ",".join(data.paths))


def _fit(run: RunDir, cfg: RunConfig, steps: int, fail_at: int | None) -> tuple[LMSAE, TrainState, int]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.ray_utils import fit, gpu_wanted, init_ray, train_threads

    init_ray()
    trainer_cfg = cfg.sae.trainer
    use_gpu = gpu_wanted(trainer_cfg.use_gpu, "sae.trainer.use_gpu")
    threads = train_threads(trainer_cfg.num_workers, use_gpu, "sae.trainer")  # checks the cluster in any case
    threads = 1 if use_gpu else threads
    storage = run.url if "://" in run.url else os.path.abspath(run.url)
    # Ray Train runs each worker in a directory of its own: the run directory goes to them as an absolute path.
    worker_cfg = replace(cfg, run_dir=storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(worker_cfg),
            "steps": steps,
            "threads": threads,
            "use_gpu": use_gpu,
            "fail_at": fail_at,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=trainer_cfg.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=f"{storage.rstrip('/')}/{WORK}",
            failure_config=ray.train.FailureConfig(max_failures=trainer_cfg.max_failures),
        ),
    )
    result = fit(trainer)
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

    assert cfg.sae.train_hook is not None, "workers start only when sae.train_hook is set"
    _, final = train_sae(
        model,
        RunDir(cfg.run_dir),
        cfg.sae.train_hook,
        cfg.sae.train,
        cfg.sae.eval.holdout_every,
        cfg.seed,
        config["steps"],
        shard,
        state,
        checkpoint,
        cfg.sae.trainer.checkpoint_every,
        device,
    )
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
        path = sae_path(cfg)
        assert path is not None, "sae_eval runs only on runs with an SAE"
        sae = load_sae(path)
        metrics = evaluate_sae(
            model,
            output,
            kind,
            sae,
            sae.cfg.metadata.hook_name,
            eval_contexts(run, cfg.sae.eval.holdout_every),
            cfg.sae.eval.tokens,
            cfg.sae.train.contexts_per_batch,
            cfg.sae.eval.dense_threshold,
        )
        units = run.read_parquet(schema.METRICS).to_pandas()
        p = polysemy(units)
        kept = ("with_examples", "polysemantic", "mean_dist", "silhouette", "raw_polysemantic", "raw_mean_dist")
        metrics = replace(metrics, **{k: p[k] for k in kept})  # type: ignore[arg-type]  # polysemy() gives floats
        run.write_json(schema.SAE_EVAL, asdict(metrics))
        run.write_bytes(schema.SAE_EVAL_MD, to_markdown({path: asdict(metrics)}).encode())
        stage.done(seconds=time.time() - t0)
        return metrics
