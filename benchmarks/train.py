"""MNIST MLP + SAEs: time per stage, seeds, workers, and the λ sweep behind configs/mnist-sae.yaml.

    .venv/bin/python benchmarks/train.py                      # one run on Ray Train: seconds per stage
    .venv/bin/python benchmarks/train.py --seeds 5            # mean ± std of every metric over seeds 0..4
    .venv/bin/python benchmarks/train.py --seeds 5 --workers 1 2   # ... and 2 workers against 1
    .venv/bin/python benchmarks/train.py --sweep              # λ1/λ2 grid, in process, seed 0
    .venv/bin/python benchmarks/train.py --authors            # Tables 2 and 3 of the authors' weights

Any `--set key=value` applies to every run (for example `--set sae.ne_examples=all`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.train import SAE_KINDS, evaluate_run, load_splits, run_train  # noqa: E402
from ne.config import load_config  # noqa: E402
from ne.mnist import model as mnist_model  # noqa: E402
from ne.mnist.config import MnistRunConfig  # noqa: E402
from ne.mnist.eval import COLUMNS, PAPER, evaluate, evaluate_dir, summarise, to_markdown, with_paper  # noqa: E402
from ne.parallel import make_optimizer  # noqa: E402
from ne.sae import SAE, NeuronEmbeddingLoss, train_sae_epoch  # noqa: E402
from ne.store import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(cfg: MnistRunConfig) -> None:
    t0 = time.time()
    summary = run_train(cfg)
    wall = time.time() - t0
    stages = {"MLP": "mlp", "SAE standard": "sae_standard", "SAE + NE loss": "sae_ne_loss", "eval": "eval"}
    for label, key in stages.items():
        print(f"{label:>14}: {summary.seconds.get(key, float('nan')):6.1f} s")
    inside = sum(summary.seconds.values())
    print(f"{'Ray overhead':>14}: {wall - inside:6.1f} s  (Ray start, worker start, checkpoint reports)")
    print(f"{'total':>14}: {wall:6.1f} s  (target < 600 s; ratio {wall / 600:.2f})")
    print(to_markdown({k: vars(m) for k, m in summary.metrics.items()}))


def seeds(cfg: MnistRunConfig, n: int, workers: list[int], out: Path) -> None:
    results: dict[int, dict[str, list]] = {}
    for w in workers:
        results[w] = {k: [] for k in SAE_KINDS}
        for seed in range(n):
            run_cfg = replace(cfg, seed=seed, run_dir=str(out / f"seed{seed}-w{w}"),
                              trainer=replace(cfg.trainer, num_workers=w))
            t0 = time.time()
            summary = run_train(run_cfg)
            metrics = summary.metrics or evaluate_run(run_cfg, RunDir(run_cfg.run_dir))  # a finished run
            print(f"workers {w} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            for k in SAE_KINDS:
                results[w][k].append(metrics[k])
    for w in workers:
        rows, stds = {}, {}
        for k in SAE_KINDS:
            rows[k], stds[k] = summarise(results[w][k])
        print(f"\n{n} seeds, {w} worker(s), mean ± std (ddof=1):\n")
        print(to_markdown(with_paper(rows), stds))
        effects(results[w])
    if len(workers) == 2:
        a, b = workers
        print(f"\n{b} workers minus {a} worker(s), same seeds: mean |difference| / seed std (1 worker)\n")
        for k in SAE_KINDS:
            _, std = summarise(results[a][k])
            cells = []
            for c in COLUMNS:
                diff = np.mean([abs(vars(x)[c] - vars(y)[c]) for x, y in zip(results[a][k], results[b][k])])
                cells.append(f"{c} {diff:.3g} ({diff / std[c]:.2f} σ)" if std[c] > 0 else f"{c} {diff:.3g}")
            print(f"{k}: " + "; ".join(cells))


def effects(runs: dict[str, list]) -> None:
    """Does each of the paper's effects (NE loss vs standard) hold? Both SAEs of a seed share their MLP,
    initialisation and batches, so the test is paired: the mean per-seed difference against 2 standard
    errors of that difference."""
    directions = {"mse": +1, "l1": +1, "l0_pct": +1, "acc_loss": +1, "max_dist": -1, "mean_dist": -1,
                  "size": +1, "dead_pct": -1}
    for c, sign in directions.items():
        diffs = np.array([vars(n)[c] - vars(s)[c] for s, n in zip(runs["standard"], runs["ne_loss"])])
        sem = diffs.std(ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        key = "l1_paper" if c == "l1" else c
        paper = PAPER["ne_loss"][key] - PAPER["standard"][key]
        holds = sign * diffs.mean() > 2 * sem
        print(f"  {c:>9}: paper {'up' if sign > 0 else 'down'} ({paper:+.3g}); ours {diffs.mean():+.3g} "
              f"(paired s.e. {sem:.2g}) -> {'holds' if holds else 'does NOT hold'}")


def sweep(cfg: MnistRunConfig) -> None:
    """In-process grid over λ1 (standard SAE) then λ2 (NE loss), seed 0, on the trained MLP."""
    torch.manual_seed(0)
    train, test = load_splits(cfg)
    mlp = mnist_model.MLP(cfg.mlp.hidden, torch.Generator().manual_seed(cfg.seed))
    opt = make_optimizer(cfg.mlp.optimizer, mlp.parameters(), cfg.mlp.lr, cfg.mlp.momentum)
    for epoch in range(cfg.mlp.epochs):
        mnist_model.train_mlp_epoch(mlp, opt, train, cfg.mlp, cfg.seed, epoch)
    print(f"MLP test accuracy {100 * mnist_model.accuracy(mlp, test):.2f}% (paper 94.0)")
    acts = mnist_model.hidden_acts(mlp, train.images)
    grid = [("standard", {"l1_coeff": v}) for v in (0.005, 0.01, 0.02, 0.03)]
    grid += [(f"ne_{ex}", {"ne_coeff": v, "ne_examples": ex}) for ex in ("active", "all") for v in (1.0, 3.0, 10.0)]
    rows = {}
    for kind, change in grid:
        sae_cfg = replace(cfg.sae, **change)
        sae = SAE(mlp.hidden_size, sae_cfg.expansion * mlp.hidden_size, torch.Generator().manual_seed(cfg.seed + 1))
        opt = make_optimizer(sae_cfg.optimizer, sae.parameters(), sae_cfg.lr)
        ne = None if kind == "standard" else NeuronEmbeddingLoss(
            sae.n_neurons, mlp.hidden_size, sae_cfg.ne_momentum, only_active=sae_cfg.ne_examples == "active")
        step = 0
        for epoch in range(sae_cfg.epochs):
            step, _ = train_sae_epoch(sae, opt, acts, sae_cfg, cfg.seed + 1, epoch, step, ne)
        name = f"{kind} " + " ".join(f"{k}={v}" for k, v in change.items() if k != "ne_examples")
        rows[name] = vars(evaluate(mlp, sae, train, test, cfg.eval))
        print(name, {c: round(rows[name][c], 3) for c in ("mse", "l0_pct", "max_dist", "mean_dist", "dead_pct")},
              flush=True)
    print(to_markdown(with_paper(rows)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/mnist-sae.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, default=0, help="train seeds 0..N-1 and report mean ± std")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="Ray Train worker counts to compare")
    p.add_argument("--sweep", action="store_true", help="the λ1/λ2 grid behind the config's choices")
    p.add_argument("--authors", action="store_true", help="evaluate the authors' weights")
    p.add_argument("--out", help="parent of the run directories (default: a temporary directory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("NE_RAY_NUM_CPUS", str(os.cpu_count()))
    cfg = load_config(args.config, args.overrides, cls=MnistRunConfig)
    if not Path(cfg.data.dir).is_absolute():
        cfg = replace(cfg, data=replace(cfg.data, dir=str((REPO / cfg.data.dir).resolve())))
    out = Path(args.out or tempfile.mkdtemp(prefix="ne-train-bench-"))
    if args.authors:
        weights = str(Path(cfg.data.dir).parent / "mechmnistic")
        t0 = time.time()
        metrics = evaluate_dir(weights, *load_splits(cfg), cfg.eval)
        print(to_markdown(with_paper({k: vars(m) for k, m in metrics.items()})))
        print(f"evaluation: {time.time() - t0:.1f} s")
    elif args.sweep:
        sweep(cfg)
    elif args.seeds:
        seeds(cfg, args.seeds, args.workers, out)
    else:
        one_run(replace(cfg, run_dir=str(out / "run")))


if __name__ == "__main__":
    main()
