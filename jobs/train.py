"""The MNIST training job: the MLP, then the standard SAE and the NE-loss SAE, on Ray Train.

One `TorchTrainer` runs all three models in sequence on N workers (CPU or GPU). Each worker takes rows
`rank::N` of every global batch and gradients are summed (`ne.compute.parallel`), so N workers follow the one-worker
trajectory up to float rounding. A worker start costs ~16 s and a report ~2 s, so one trainer serves every
model and reports a checkpoint only every `trainer.checkpoint_every` epochs.

Resume: Ray Train V2 restores the latest reported checkpoint when a run with the same storage path and name
starts again, and the name carries the settings' fingerprint, so an interrupted job picks up at its last
checkpoint and a changed config starts afresh. Stages recorded as done in the manifest are not retrained:
    mnist_mlp, mnist_sae_standard, mnist_sae_ne_loss   ->  RUN/mnist/{mlp,sae_standard,sae_ne_loss}.safetensors
    mnist_eval                                         ->  RUN/mnist/sae_eval.{md,csv}
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import torch

from ne import schema
from ne.compute.parallel import Shard
from ne.compute.sae import SAE, NeuronEmbeddingLoss, build_sae, sae_optimizer, train_sae_epoch
from ne.config import from_dict, to_dict
from ne.errors import ConfigError
from ne.mnist import data as mnist_data
from ne.mnist import model as mnist_model
from ne.mnist.config import MnistRunConfig
from ne.mnist.eval import SAEMetrics, evaluate_dir, write_tables
from ne.rundir import store
from ne.rundir.graph import MNIST_STAGES
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir, fingerprint

SAE_KINDS = ("standard", "ne_loss")
STATE = "state.pt"


@dataclass
class TrainSummary:
    trained: list[str] = field(default_factory=list)
    """Models trained by this call (others were finished before)."""
    steps: int = 0
    """Optimiser steps taken by this call (0 when everything resumed from a checkpoint)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per model, measured inside worker 0."""
    metrics: dict[str, SAEMetrics] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"trained: {', '.join(self.trained) or 'nothing (all done)'}; steps this call: {self.steps}"]
        lines += [f"  {k}: {v:.1f} s" for k, v in self.seconds.items()]
        return "\n".join(lines)


# --- inside each Ray Train worker ------------------------------------------------------------------------


def _save_state(state: dict, metrics: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, STATE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_state() -> dict:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"done": {}, "current": None}
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, STATE), weights_only=True)


class _Worker:
    """One Ray Train worker's pass over the models still to train: what it resumed from, what it has done."""

    def __init__(self, config: dict):
        import ray.train.torch

        self.cfg: MnistRunConfig = from_dict(MnistRunConfig, config["cfg"])
        self.todo: list[str] = config["todo"]
        self.device = ray.train.torch.get_device() if self.cfg.trainer.use_gpu else torch.device("cpu")
        self.shard = Shard.current()
        self.state = _load_state()
        self.steps = 0
        self.seconds: dict[str, float] = {}

    def resume(self, name: str, model: torch.nn.Module, opt, extra: torch.nn.Module | None = None) -> tuple[int, int]:
        """(epoch, step) to start from: the restored checkpoint's when it is of model `name`, else (0, 0)."""
        cur = self.state["current"]
        if not cur or cur["name"] != name:
            return 0, 0
        model.load_state_dict(cur["model"])
        opt.load_state_dict(cur["opt"])
        if extra is not None:
            extra.load_state_dict(cur["extra"])
        return cur["epoch"], cur["step"]

    def checkpoint(
        self, name: str, model, opt, epoch: int, step: int, last: bool, t0: float, extra=None, **metrics
    ) -> None:
        state = self.state
        if last:
            state["done"][name] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            state["current"] = None
            self.seconds[name] = time.time() - t0
        else:
            state["current"] = {
                "name": name,
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "extra": extra.state_dict() if extra else {},
            }
        # The driver reads the latest checkpoint and its metrics, so the summary travels with every one.
        _save_state(
            state,
            {"model": name, "epoch": epoch, "steps_this_attempt": self.steps, "seconds": dict(self.seconds), **metrics},
        )

    def mlp(self, train: mnist_data.MnistSplit, mlp_path: str) -> mnist_model.MLP:
        """The MLP: trained (or resumed) when it is to do, else the finished one."""
        cfg = self.cfg
        if "mlp" in self.state["done"] or "mlp" not in self.todo:
            mlp = mnist_model.MLP(cfg.mlp.hidden)
            mlp.load_state_dict(self.state["done"].get("mlp") or mnist_model.MLP.load(mlp_path).state_dict())
            return mlp.to(self.device)
        t0 = time.time()
        mlp = mnist_model.MLP(cfg.mlp.hidden, torch.Generator().manual_seed(cfg.seed)).to(self.device)
        opt = mnist_model.mlp_optimizer(mlp, cfg.mlp)
        start, _ = self.resume("mlp", mlp, opt)
        for epoch in range(start, cfg.mlp.epochs):
            loss = mnist_model.train_mlp_epoch(mlp, opt, train, cfg.mlp, cfg.seed, epoch, self.shard)
            self.steps += -(-len(train) // cfg.mlp.batch_size)
            last = epoch + 1 == cfg.mlp.epochs
            if last or (epoch + 1) % cfg.trainer.checkpoint_every == 0:
                self.checkpoint("mlp", mlp, opt, epoch + 1, 0, last, t0, loss=loss)
        return mlp

    def sae(self, kind: str, acts: torch.Tensor, hidden_size: int) -> None:
        """Train (or resume) the SAE of `kind` when it is to do."""
        cfg, name = self.cfg, f"sae_{kind}"
        if name in self.state["done"] or name not in self.todo:
            return
        t0 = time.time()
        # Both SAEs start from the same weights and see the same batches: only the loss differs.
        sae = build_sae(cfg.sae, acts, torch.Generator().manual_seed(cfg.seed + 1))
        opt = sae_optimizer(sae, cfg.sae)
        ne_loss = None
        if kind == "ne_loss":
            ne_loss = NeuronEmbeddingLoss.from_config(sae.n_neurons, hidden_size, cfg.sae).to(self.device)
        start, step = self.resume(name, sae, opt, ne_loss)
        for epoch in range(start, cfg.sae.epochs):
            step0 = step
            step, losses = train_sae_epoch(sae, opt, acts, cfg.sae, cfg.seed + 1, epoch, step, ne_loss, self.shard)
            self.steps += step - step0
            last = epoch + 1 == cfg.sae.epochs
            if last or (epoch + 1) % cfg.trainer.checkpoint_every == 0:
                self.checkpoint(name, sae, opt, epoch + 1, step, last, t0, ne_loss, **losses)


def train_loop(config: dict) -> None:
    """Train every model in `config["todo"]`, resuming from Ray's latest checkpoint when there is one."""
    torch.set_num_threads(config["threads"])
    worker = _Worker(config)
    cfg = worker.cfg
    train = mnist_data.load_mnist(cfg.data.source, cfg.data.dir, "train").head(cfg.data.train_subset)
    train = mnist_data.MnistSplit(train.images.to(worker.device), train.labels.to(worker.device))
    mlp = worker.mlp(train, config["mlp_path"])
    acts = mnist_model.hidden_acts(mlp, train.images)
    for kind in SAE_KINDS:
        worker.sae(kind, acts, mlp.hidden_size)
    if worker.steps == 0:  # everything came from the restored checkpoint: report it, so the driver gets it
        _save_state(worker.state, {"seconds": worker.seconds, "steps_this_attempt": 0})


# --- the driver ------------------------------------------------------------------------------------------


def _start_ray(cfg: MnistRunConfig) -> int:
    """Start Ray (or join the cluster) and check it can hold every worker; returns torch threads per worker."""
    from jobs.ray_utils import init_ray, train_threads

    init_ray()
    threads = train_threads(cfg.trainer.num_workers, cfg.trainer.use_gpu)  # checks the cluster in any case
    return cfg.trainer.threads_per_worker or threads


def _fit(cfg: MnistRunConfig, run: RunDir, todo: list[str], fps: dict[str, str], threads: int) -> tuple[dict, dict]:
    import pyarrow.fs
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.ray_utils import fit

    storage: dict = {"storage_path": os.path.join(os.path.abspath(run.url), "ray")}
    if "://" in run.url:
        # Ray Train would reach s3:// with pyarrow's own client, which ignores fsspec's settings (an endpoint
        # given as FSSPEC_S3_ENDPOINT_URL or in ~/.config/fsspec): it gets the run directory's filesystem.
        storage = {
            "storage_path": run.path("ray"),
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(run.fs)),
        }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "todo": todo,
            "threads": threads,
            "mlp_path": run.url_of(schema.mnist_weights("mlp")),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu),
        run_config=ray.train.RunConfig(
            name=f"train-{fingerprint(fps)}",
            **storage,
            failure_config=ray.train.FailureConfig(max_failures=1),
        ),
    )
    result = fit(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), weights_only=True)
    return state["done"], result.metrics


def run_train(cfg: MnistRunConfig, force: Collection[str] = ()) -> TrainSummary:
    """Train what is not finished yet, write the weights in the authors' format, then evaluate."""
    force = check_force(force, MNIST_STAGES)
    if cfg.data.source == "idx":
        if "://" not in cfg.data.dir:  # Ray workers do not share the driver's working directory
            cfg = replace(cfg, data=replace(cfg.data, dir=os.path.abspath(cfg.data.dir)))
        mnist_data.check_idx_dir(cfg.data.dir)
    check_ne_loss_starts(cfg, check_data(cfg))
    run = RunDir(cfg.run_dir)
    with run.lock("ne train"):
        run.set_manifest_entry("mnist_config", to_dict(cfg))
        summary = TrainSummary()
        todo: list[str] = []
        models = ("mlp", *(f"sae_{k}" for k in SAE_KINDS))
        if any(Stage(run, f"mnist_{name}", cfg, force).needed() for name in models):
            threads = _start_ray(cfg)  # before any stage begins: a cluster too small is an error, not a wait
        for name in models:
            stage = Stage(run, f"mnist_{name}", cfg, force)
            # A new MLP makes both SAEs stale (its begin marks them so): they are retrained in the same fit.
            if "mlp" in todo or stage.needed():
                stage.begin()
                todo.append(name)
        if todo:
            stages = run.manifest()["stages"]
            fps = {name: stages[f"mnist_{name}"]["fingerprint"] for name in models}
            done, metrics = _fit(cfg, run, todo, fps, threads)
            for name in todo:
                hidden = cfg.mlp.hidden
                model = mnist_model.MLP(hidden) if name == "mlp" else SAE(hidden, cfg.sae.expansion * hidden)
                model.load_state_dict(done[name])
                run.write_bytes(schema.mnist_weights(name), store.tensors_bytes(model))
                Stage(run, f"mnist_{name}", cfg, force).done()
            summary.trained, summary.steps = todo, int(metrics.get("steps_this_attempt", 0))
            summary.seconds = dict(metrics.get("seconds", {}))
        stage = Stage(run, "mnist_eval", cfg, force)
        if stage.needed():
            stage.begin()
            t0 = time.time()
            summary.metrics = evaluate_run(cfg, run)
            summary.seconds["eval"] = time.time() - t0
            stage.done()
        return summary


def check_data(cfg: MnistRunConfig) -> int:
    """Read both splits here, in the driver, so that a damaged file or an unreachable dataset is a one-line error
    rather than a traceback from inside a Ray Train worker; returns the number of training images used."""
    train, _ = load_splits(cfg)
    return len(train)


def check_ne_loss_starts(cfg: MnistRunConfig, n_train: int) -> None:
    """The NE loss switches on at `ne_start_step`; a run shorter than that would train two equal SAEs."""
    steps = cfg.sae.epochs * -(-n_train // cfg.sae.batch_size)
    if cfg.sae.ne_coeff > 0 and steps <= cfg.sae.ne_start_step:
        raise ConfigError(
            f"sae.ne_start_step is {cfg.sae.ne_start_step} but the SAEs train for only {steps} steps ({n_train} "
            f"images, sae.batch_size {cfg.sae.batch_size}, sae.epochs {cfg.sae.epochs}), so the neuron-embedding "
            "loss would never switch on and sae_ne_loss would equal sae_standard; lower sae.ne_start_step or "
            "train longer"
        )


def evaluate_run(cfg: MnistRunConfig, run: RunDir) -> dict[str, SAEMetrics]:
    """Tables 2 and 3 for the run's two SAEs, written to RUN/mnist/sae_eval.{md,csv}."""
    train, test = load_splits(cfg)
    metrics = evaluate_dir(run.url_of(schema.MNIST_DIR), train, test, cfg.eval)
    write_tables(RunDir(run.url_of(schema.MNIST_DIR)), {k: vars(m) for k, m in metrics.items()})
    return metrics


def load_splits(cfg: MnistRunConfig) -> tuple[mnist_data.MnistSplit, mnist_data.MnistSplit]:
    train = mnist_data.load_mnist(cfg.data.source, cfg.data.dir, "train").head(cfg.data.train_subset)
    test = mnist_data.load_mnist(cfg.data.source, cfg.data.dir, "test").head(cfg.data.test_subset)
    return train, test
