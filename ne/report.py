"""The run report: `report/report.md` and PNG plots of the polysemy metrics, written from metrics.parquet."""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure

from ne import schema
from ne.store import RunDir

log = logging.getLogger(__name__)


def separation(m: pd.DataFrame) -> dict[str, float | int]:
    """How often neuron-embedding clusters separate better than pre-MLP clusters (paper, Figure 4).

    `share` counts neurons whose silhouette is defined for both (2 <= clusters <= n - 1 in each) and
    where the neuron-embedding one is higher. Neurons where only one clustering has a defined silhouette
    are counted apart, since no number compares them.
    """
    ne_ok, raw_ok = m.silhouette.notna(), m.raw_silhouette.notna()
    both = ne_ok & raw_ok
    better = int((m.silhouette[both] > m.raw_silhouette[both]).sum())
    return {
        "compared": int(both.sum()),
        "ne_better": better,
        "share": better / int(both.sum()) if both.any() else float("nan"),
        "only_ne_defined": int((ne_ok & ~raw_ok).sum()),
        "only_raw_defined": int((~ne_ok & raw_ok).sum()),
    }


def most_polysemantic(m: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """Neurons with the most (non-outlier) clusters; ties go to the better-separated (higher silhouette)."""
    return m.sort_values(["n_clusters", "silhouette", "layer", "neuron"], ascending=[False, False, True, True],
                         na_position="last").head(top)


def _png(run: RunDir, name: str, fig: Figure) -> str:
    """Figures are drawn by Agg without pyplot, so no global backend or display is involved."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    run.write_bytes(f"{schema.REPORT_DIR}/{name}", buf.getvalue())
    return name


def _plots(run: RunDir, m: pd.DataFrame) -> list[str]:
    layers = sorted(m.layer.unique())
    active = m[m.n_examples > 0]
    names = []

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    top = int(active.n_clusters.max()) if len(active) else 1
    for layer in layers:
        counts = active[active.layer == layer].n_clusters
        ax.hist(counts, bins=np.arange(0, top + 2) - 0.5, histtype="step", label=f"layer {layer}")
    ax.set(xlabel="clusters per neuron", ylabel="neurons", title="Feature clusters per neuron")
    ax.legend(fontsize=7)
    names.append(_png(run, "clusters_per_neuron.png", fig))

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, col, title in [(axes[0], "mean_dist", "mean pairwise distance"), (axes[1], "silhouette", "silhouette")]:
        data = [active[active.layer == layer][c].dropna() for layer in layers for c in (col, f"raw_{col}")]
        pos = [i * 3 + j for i in range(len(layers)) for j in (0, 1)]
        box = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=False)
        for patch, j in zip(box["boxes"], [0, 1] * len(layers)):
            patch.set_facecolor(("tab:orange", "tab:blue")[j])
        ax.set_xticks([i * 3 + 0.5 for i in range(len(layers))], [str(x) for x in layers])
        ax.set(xlabel="layer", title=title)
    fig.suptitle("per neuron: neuron embedding (orange) vs pre-MLP embedding (blue)")
    names.append(_png(run, "per_layer.png", fig))

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    both = active.dropna(subset=["silhouette", "raw_silhouette"])
    ax.scatter(both.raw_silhouette, both.silhouette, s=4, alpha=0.4)
    lo = min([0.0, *both.silhouette, *both.raw_silhouette]) - 0.05
    ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8)
    ax.set(xlabel="pre-MLP silhouette", ylabel="neuron-embedding silhouette", title="Separation per neuron")
    names.append(_png(run, "separation.png", fig))
    return names


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if np.isnan(x) else f"{x:.3g}"
    return str(x)


def _table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def unit_comparison(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per kind of unit (name → metrics of one layer): how many have examples, the share with two or more
    feature clusters, and the median mean distance and silhouette of their neuron embeddings."""
    rows = []
    for name, m in tables.items():
        active = m[m.n_examples > 0]
        rows.append({"units": name, "layers": ", ".join(map(str, sorted(m.layer.unique()))),
                     "with examples": f"{len(active)} of {len(m)}",
                     "≥ 2 clusters": float((active.n_clusters >= 2).mean()) if len(active) else float("nan"),
                     "median mean_dist": float(active.mean_dist.median()),
                     "median silhouette": float(active.silhouette.median())})
    return pd.DataFrame(rows)


def write_report(run: RunDir, metrics: pa.Table, top: int = 20, compare: dict[str, pd.DataFrame] | None = None) -> str:
    """Write report/report.md and its plots; returns the report's path. `compare`: metrics of other kinds of
    units at the same layers (name → table), set beside this run's."""
    m = metrics.to_pandas()
    active = m[m.n_examples > 0]
    sep = separation(active)
    per_layer = active.groupby("layer").agg(
        neurons=("neuron", "size"),
        examples=("n_examples", "mean"),
        clusters_median=("n_clusters", "median"),
        polysemantic=("n_clusters", lambda c: float((c >= 2).mean())),
        silhouette=("silhouette", "median"),
        raw_silhouette=("raw_silhouette", "median"),
        mean_dist=("mean_dist", "median"),
        raw_mean_dist=("raw_mean_dist", "median"),
    ).reset_index()
    per_layer["ne_better"] = [separation(active[active.layer == layer])["share"] for layer in per_layer.layer]
    cols = ["layer", "neuron", "n_examples", "n_clusters", "silhouette", "raw_silhouette", "mean_dist",
            "intra_dist", "inter_dist"]
    plots = _plots(run, m)
    text = "\n\n".join(
        [
            "# Feature clusters: run report",
            f"{len(m)} neurons in layers {sorted(m.layer.unique().tolist())}; {len(active)} have examples "
            f"({len(m) - len(active)} never reached their threshold). Medians are over neurons with examples; "
            "`polysemantic` is the share with two or more clusters.",
            "## Per layer",
            _table(per_layer),
            "## Neuron embeddings vs pre-MLP embeddings",
            f"Neuron-embedding clusters have the higher silhouette for **{sep['ne_better']} of {sep['compared']}** "
            f"neurons ({_fmt(100 * sep['share'])}%) whose silhouette is defined both ways. Only the "
            f"neuron-embedding silhouette is defined for {sep['only_ne_defined']} neurons, only the pre-MLP one "
            f"for {sep['only_raw_defined']} (a silhouette needs 2 to n - 1 clusters).",
            f"## The {top} most polysemantic neurons",
            _table(most_polysemantic(active, top)[cols]),
            "## Plots",
            "\n".join(f"![{name}]({name})" for name in plots),
        ]
        + (["## Compared with other units at the same layer", _table(unit_comparison(compare))] if compare else [])
    )
    rel = f"{schema.REPORT_DIR}/report.md"
    run.write_bytes(rel, (text + "\n").encode())
    log.info("report written to %s", run.path(rel))
    return run.path(rel)
