"""SAEs trained side by side (`sae.compare`): one run per SAE under RUN/NAME-seedS/, each trained, harvested,
clustered and evaluated (`jobs.lm_sae`), then RUN/comparison.{md,csv,png}: every metric's mean ± std over seeds
and the NE loss's paired effects."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from jobs.cluster import run_cluster
from jobs.harvest import run_harvest
from jobs.lm_sae import corpus_name, run_sae_eval
from ne import schema
from ne.config import RunConfig
from ne.lm_sae.config import SAECompareConfig
from ne.lm_sae.eval import COLUMNS, FORMATS, to_markdown
from ne.rundir.graph import HARVEST
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

STANDARD = "standard"


def variant_name(ne_coeff: float | None) -> str:
    return STANDARD if ne_coeff is None else f"ne{ne_coeff:g}"


def comparison_runs(cfg: RunConfig) -> dict[str, tuple[str, int, RunConfig]]:
    """Run name → (variant, seed, the run's config): the standard SAE and one NE-loss SAE per λ2, per seed."""
    out = {}
    root = cfg.run_dir.rstrip("/")
    for seed in cfg.sae.compare.seeds:
        for coeff in (None, *cfg.sae.compare.ne_coeffs):
            train = (
                replace(cfg.sae.train, loss="none")
                if coeff is None
                else replace(cfg.sae.train, loss="ne", ne_coeff=coeff)
            )
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
            out.runs[name] = {
                **asdict(metrics),
                "variant": variant,
                "seed": seed,
                "train_tokens": trained["tokens"],
                "train_seconds": trained["train_seconds"],
            }
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
    lines = [
        f"SAEs at {cfg.sae.train_hook} of {cfg.model.name}, {cfg.sae.train.architecture}, "
        f"{cfg.sae.train.expansion}× expansion"
        + (f", k = {cfg.sae.train.k}" if cfg.sae.train.architecture == "topk" else "")
        + f"; trained on {first['train_tokens']:,} tokens of {corpus_name(cfg)} (one pass), evaluated on "
        f"{first['tokens']:,} held-out tokens; seeds {', '.join(map(str, seeds))}; mean ± std (ddof 1).",
        "",
        to_markdown(means, stds),
    ]
    for v in variants[1:]:
        effects = paired_effects(runs, v, columns)
        lines += [
            "",
            f"{v} against {STANDARD}, paired by seed (same initialisation and batches): change (paired "
            "s.e.) and verdict (beyond 2 s.e.)",
            "",
            "| metric | change | s.e. | verdict |",
            "|---|---|---|---|",
        ]
        for c, e in effects.items():
            fmt = FORMATS[c]
            lines.append(
                f"| {c} | {'+' if e['change'] >= 0 else ''}{fmt.format(e['change'])} | "
                f"{fmt.format(e['sem']) if not math.isnan(e['sem']) else ''} | {e['verdict']} |"
            )
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
    panels = [
        (fig.add_subplot(1, 2, 1), cost, cost_name, "polysemantic", "latents with ≥ 2 feature clusters"),
        (
            fig.add_subplot(1, 2, 2),
            lambda r: float(r["fvu"]),
            "FVU",
            "mean_dist",
            "median mean cosine distance of a latent's examples",
        ),
    ]
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
                ax.scatter(
                    *centres[-1],
                    facecolors=face,
                    edgecolors="black" if fill else f"C{i}",
                    s=90,
                    linewidths=1.5,
                    label=label,
                    zorder=3,
                )
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
