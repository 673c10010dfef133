"""MNIST MLP + SAEs: time per stage, seeds, workers, and the recipe search behind configs/mnist-sae.yaml.

    .venv/bin/python benchmarks/train.py                      # one run on Ray Train: seconds per stage
    .venv/bin/python benchmarks/train.py --seeds 5            # mean ± std over seeds 0..4, paired verdicts
    .venv/bin/python benchmarks/train.py --seeds 5 --workers 1 2   # ... and 2 workers against 1
    .venv/bin/python benchmarks/train.py --sweep [--seeds 5]  # the recipe grid, in process, paired over seeds
    .venv/bin/python benchmarks/train.py --sweep --mlp ../shared/data/mechmnistic/mlp.safetensors
                                                              # ... on the authors' MLP (SAE seeds vary)
    .venv/bin/python benchmarks/train.py --evidence           # what the authors' weights say about training
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
from ne.compute.sae import SAE, SAEConfig, fit_sae  # noqa: E402
from ne.config import load_config  # noqa: E402
from ne.mnist import model as mnist_model  # noqa: E402
from ne.mnist.config import MnistRunConfig  # noqa: E402
from ne.mnist.eval import (  # noqa: E402
    COLUMNS,
    PAPER,
    SAEMetrics,
    evaluate,
    evaluate_dir,
    summarise,
    to_markdown,
    with_paper,
)
from ne.rundir.store import RunDir  # noqa: E402

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
            run_cfg = replace(
                cfg, seed=seed, run_dir=str(out / f"seed{seed}-w{w}"), trainer=replace(cfg.trainer, num_workers=w)
            )
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


# The paper's eight effects of the NE loss: the metric and its paper column.
EFFECTS = {
    "mse": "mse",
    "l1": "l1_paper",
    "l0_pct": "l0_pct",
    "acc_loss": "acc_loss",
    "max_dist": "max_dist",
    "mean_dist": "mean_dist",
    "size": "size",
    "dead_pct": "dead_pct",
}


def paired_effects(standard: list[SAEMetrics], ne_loss: list[SAEMetrics]) -> list[dict]:
    """Each effect of the NE loss, paired by seed (both SAEs of a seed share their MLP, initialisation and
    batches): the mean per-seed change, its standard error, whether it holds (the paper's direction, beyond
    2 s.e.) and its size against the paper's change (`ratio`; within a factor 2 when 0.5 <= ratio <= 2)."""
    out = []
    for c, key in EFFECTS.items():
        paper = PAPER["ne_loss"][key] - PAPER["standard"][key]
        diffs = np.array([vars(n)[key] - vars(s)[key] for s, n in zip(standard, ne_loss)])
        sem = diffs.std(ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        ratio = diffs.mean() / paper
        holds = np.sign(paper) * diffs.mean() > 2 * sem
        out.append(
            {
                "effect": c,
                "paper": paper,
                "ours": diffs.mean(),
                "sem": sem,
                "holds": bool(holds),
                "ratio": ratio,
                "within_2x": bool(holds and 0.5 <= ratio <= 2),
            }
        )
    return out


def effects(runs: dict[str, list]) -> None:
    rows = paired_effects(runs["standard"], runs["ne_loss"])
    for r in rows:
        print(
            f"  {r['effect']:>9}: paper {'up' if r['paper'] > 0 else 'down'} ({r['paper']:+.3g}); ours "
            f"{r['ours']:+.3g} (paired s.e. {r['sem']:.2g}) -> {'holds' if r['holds'] else 'does NOT hold'}, "
            f"{r['ratio']:.2f} × the paper's change{'' if r['within_2x'] else ' (NOT within a factor 2)'}"
        )
    print(
        f"  {sum(r['holds'] for r in rows)}/8 effects hold, {sum(r['within_2x'] for r in rows)}/8 within a "
        "factor 2 of the paper's"
    )


# --- the recipe search -----------------------------------------------------------------------------------

# Standard-SAE settings (changes to the config's sae section), then NE-loss readings × λ2 on the default
# standard SAE. `l1_weighting: decoder_norm` gets λ1 × 10, as the decoder columns' norms are ~0.1.
STANDARD_GRID = [
    *({"l1_coeff": v} for v in (0.01, 0.015, 0.02, 0.025, 0.03)),
    *({"weight_decay": v} for v in (0.0, 0.003, 0.03)),
    {"optimizer": "adamw"},
    {"lr": 3e-3},
    {"b_dec_init": "mean"},
    {"w_dec_init": "transpose"},
    {"decoder_norm": "unit"},
    {"l1_weighting": "decoder_norm", "l1_coeff": 0.2},
]
NE_GRID = [
    *({"ne_coeff": v} for v in (10.0, 20.0, 40.0, 60.0, 80.0)),
    *({"ne_examples": "all", "ne_coeff": v} for v in (1.0, 3.0, 10.0)),
    *({"ne_aggregate": "neurons", "ne_coeff": v} for v in (10.0, 30.0, 100.0)),
    *({"ne_average": "unit", "ne_coeff": v} for v in (40.0, 60.0)),
    *({"ne_distance": "euclidean", "ne_coeff": v} for v in (3.0, 10.0, 30.0)),
]


def train_one(sae_cfg: SAEConfig, acts: torch.Tensor, seed: int, with_ne: bool) -> SAE:
    """One SAE, in process, exactly as a Ray worker trains it."""
    return fit_sae(acts, sae_cfg, seed + 1, with_ne)[0]


def sweep_mlp(cfg: MnistRunConfig, seed: int, weights: str | None, train) -> mnist_model.MLP:
    if weights:
        return mnist_model.MLP.load(weights)
    mlp = mnist_model.MLP(cfg.mlp.hidden, torch.Generator().manual_seed(seed))
    opt = mnist_model.mlp_optimizer(mlp, cfg.mlp)
    for epoch in range(cfg.mlp.epochs):
        mnist_model.train_mlp_epoch(mlp, opt, train, cfg.mlp, seed, epoch)
    return mlp


def label(change: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in change.items()) or "default"


def sweep(cfg: MnistRunConfig, n_seeds: int, mlp_weights: str | None) -> None:
    """Every grid point on seeds 0..n-1 (one MLP per seed, or the given MLP), paired against the default."""
    torch.manual_seed(0)
    train, test = load_splits(cfg)
    std_runs: dict[str, list] = {label(c): [] for c in [{}, *STANDARD_GRID]}
    ne_runs: dict[str, list] = {label(c): [] for c in NE_GRID}
    for seed in range(n_seeds):
        mlp = sweep_mlp(cfg, seed, mlp_weights, train)
        acts = mnist_model.hidden_acts(mlp, train.images)
        print(f"seed {seed}: MLP test accuracy {100 * mnist_model.accuracy(mlp, test):.2f}% (paper 94.0)", flush=True)
        for change in [{}, *STANDARD_GRID]:
            sae = train_one(replace(cfg.sae, **change), acts, seed, with_ne=False)
            std_runs[label(change)].append(evaluate(mlp, sae, train, test, cfg.eval))
        for change in NE_GRID:
            sae = train_one(replace(cfg.sae, **change), acts, seed, with_ne=True)
            ne_runs[label(change)].append(evaluate(mlp, sae, train, test, cfg.eval))
    shown = ("mse", "l1_paper", "l0_pct", "acc_loss", "max_dist", "mean_dist", "size", "dead_pct")
    print(f"\nStandard SAE, mean over {n_seeds} seeds (changes to configs/mnist-sae.yaml's sae section)\n")
    print("| sae | " + " | ".join(shown) + " |\n" + "|---" * (len(shown) + 1) + "|")
    for name, runs in [*std_runs.items(), ("paper", None)]:
        row = PAPER["standard"] if runs is None else summarise(runs)[0]
        print(f"| {name} | " + " | ".join(f"{row[c]:.3g}" for c in shown) + " |")
    print(
        f"\nNE-loss SAE against the default standard SAE, paired over {n_seeds} seeds: each effect as a multiple "
        "of the paper's change (! = does not hold, * = holds but not within a factor 2)\n"
    )
    print("| ne_loss | holds | within 2× | " + " | ".join(EFFECTS) + " |\n" + "|---" * (len(EFFECTS) + 3) + "|")
    for name, runs in ne_runs.items():
        rows = paired_effects(std_runs["default"], runs)
        cells = [
            f"{r['ratio']:.2f}" + ("" if r["holds"] else "!") + ("" if r["within_2x"] or not r["holds"] else "*")
            for r in rows
        ]
        print(
            f"| {name} | {sum(r['holds'] for r in rows)}/8 | {sum(r['within_2x'] for r in rows)}/8 | "
            + " | ".join(cells)
            + " |"
        )


# --- evidence from the authors' weights ------------------------------------------------------------------


def weight_stats(sae: SAE, acts: torch.Tensor) -> dict[str, float]:
    """How a trained SAE's weights look: what separates recipes (decay, initialisation, decoder norms)."""
    with torch.no_grad():
        top = (
            torch.cat([(sae.encode(acts[i : i + 8192])).max(0).values[None] for i in range(0, len(acts), 8192)])
            .max(0)
            .values
        )
    never = top <= 0
    live = ~never

    def med(t: torch.Tensor) -> float:
        return float(t.detach().abs().median()) if t.numel() else float("nan")

    return {
        "never-firing neurons": int(never.sum()),
        "never: |W_enc| median": med(sae.W_enc[never]),
        "never: |W_dec| median": med(sae.W_dec[:, never]),
        "never: |b_enc| median": med(sae.b_enc[never]),
        "never: W_enc row norm median": med(sae.W_enc[never].norm(dim=1)),
        "live: |W_enc| median": med(sae.W_enc[live]),
        "live: W_enc row norm median": med(sae.W_enc[live].norm(dim=1)),
        "live: W_dec column norm median": med(sae.W_dec[:, live].norm(dim=0)),
        "|b_dec|": float(sae.b_dec.detach().norm()),
        "|b_dec - mean activation|": float((sae.b_dec.detach() - acts.mean(0)).norm()),
        "|mean activation|": float(acts.mean(0).norm()),
    }


def evidence(cfg: MnistRunConfig) -> None:
    """The authors' SAEs' weight statistics next to SAEs trained here on the authors' MLP: the default
    recipe, and the same without weight decay and with other initialisations."""
    folder = Path(cfg.data.dir).parent / "mechmnistic"
    train, _ = load_splits(cfg)
    mlp = mnist_model.MLP.load(str(folder / "mlp.safetensors"))
    acts = mnist_model.hidden_acts(mlp, train.images)
    columns = {
        f"authors {n}": weight_stats(mnist_model.load_sae(str(folder / f"sae_{n}.safetensors"), 64), acts)
        for n in ("standard", "ne_loss")
    }
    for change in (
        {"l1_coeff": 0.025},
        {},
        {"weight_decay": 0.0},
        {"optimizer": "adamw"},
        {"lr": 3e-3},
        {"b_dec_init": "mean"},
        {"decoder_norm": "unit"},
    ):
        columns[f"ours {label(change)}"] = weight_stats(train_one(replace(cfg.sae, **change), acts, 0, False), acts)
    names = list(columns)
    print("Standard SAEs on the authors' MLP (ours: seed 0)\n")
    print("| statistic | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for stat in columns[names[0]]:
        print(f"| {stat} | " + " | ".join(f"{columns[n][stat]:.3g}" for n in names) + " |")
    blank = (train.images == 0).all(0)
    print(
        "\nMLPs: spread of each hidden unit's weights on the always-blank pixels, as a fraction of the initial "
        "spread (every blank pixel gets the same gradient, so only weight decay changes it)"
    )
    plain = replace(cfg.mlp, optimizer="sgd", lr=0.02, weight_decay=0.0)  # the recipe before issue 12
    models = {"authors": mlp}
    for m in (cfg.mlp, plain):
        models[f"ours ({m.optimizer}, lr {m.lr}, wd {m.weight_decay})"] = sweep_mlp(replace(cfg, mlp=m), 0, None, train)
    for name, model in models.items():
        w = model.W1.detach()[:, blank]
        spread = float((w - w.mean(1, keepdim=True)).std()) / (784**-0.5 / 3**0.5)
        print(f"  {name}: {spread:.3f}; |W1| {float(model.W1.norm()):.2f}, |W2| {float(model.W2.norm()):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/mnist-sae.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, default=0, help="train seeds 0..N-1 and report mean ± std")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="Ray Train worker counts to compare")
    p.add_argument("--sweep", action="store_true", help="the recipe grid behind the config's choices")
    p.add_argument("--mlp", help="--sweep on this MLP (safetensors) instead of one trained per seed")
    p.add_argument("--evidence", action="store_true", help="weight statistics of the authors' SAEs and ours")
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
    elif args.evidence:
        evidence(cfg)
    elif args.sweep:
        sweep(cfg, args.seeds or 5, args.mlp)
    elif args.seeds:
        seeds(cfg, args.seeds, args.workers, out)
    else:
        one_run(replace(cfg, run_dir=str(out / "run")))


if __name__ == "__main__":
    main()
