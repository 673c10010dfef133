"""The run report: `report/report.md` and PNG plots of the polysemy metrics, written from metrics.parquet."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure

from ne import schema
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)


def separation(m: pd.DataFrame, ne: str = "silhouette", raw: str = "raw_silhouette") -> dict[str, float | int]:
    """How often neuron-embedding clusters separate better than pre-MLP clusters (paper, Figure 4), comparing
    columns `ne` and `raw` (silhouettes at the run's cut unless told otherwise).

    `share` counts neurons whose silhouette is defined for both (2 <= clusters <= n - 1 in each) and
    where the neuron-embedding one is higher. Neurons where only one clustering has a defined silhouette
    are counted apart, since no number compares them.
    """
    ne_ok, raw_ok = m[ne].notna(), m[raw].notna()
    both = ne_ok & raw_ok
    better = int((m[ne][both] > m[raw][both]).sum())
    return {
        "compared": int(both.sum()),
        "ne_better": better,
        "share": better / int(both.sum()) if both.any() else float("nan"),
        "only_ne_defined": int((ne_ok & ~raw_ok).sum()),
        "only_raw_defined": int((~ne_ok & raw_ok).sum()),
    }


FIGURE4 = (  # (comparison, neuron-embedding column, pre-MLP column)
    ("each space at its own per-neuron cut", "silhouette_per_neuron", "raw_silhouette_per_neuron"),
    (
        "same number of clusters: as many as the neuron-embedding cut gave",
        "silhouette_per_neuron",
        "raw_silhouette_at_ne_k",
    ),
    ("same number of clusters: as many as the pre-MLP cut gave", "silhouette_at_raw_k", "raw_silhouette_per_neuron"),
    ("both at the fixed cut", "silhouette_fixed", "raw_silhouette_fixed"),
)
AGREEMENT = (
    ("the key token", "nn_same_token", "raw_nn_same_token", "pair_same_token"),
    ("the key token and the token before it", "nn_same_bigram", "raw_nn_same_bigram", "pair_same_bigram"),
)


def figure4_table(m: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """The three Figure 4 comparisons (the same-count one both ways): per comparison, the neurons compared,
    how many have the higher neuron-embedding silhouette, and the median silhouette in each space."""
    rows = []
    for name, ne, raw in FIGURE4:
        if ne == "silhouette_fixed" and threshold is not None:
            name = f"{name} ({threshold:g})"
        sep = separation(m, ne, raw)
        both = m[ne].notna() & m[raw].notna()
        rows.append(
            {
                "comparison": name,
                "neurons": sep["compared"],
                "NE higher": sep["ne_better"],
                "share NE higher": _pct(sep["share"]),
                "median NE": float(m[ne][both].median()),
                "median pre-MLP": float(m[raw][both].median()),
            }
        )
    return pd.DataFrame(rows)


def agreement_table(m: pd.DataFrame) -> pd.DataFrame:
    """The cut-free comparison: how often an example's nearest neighbour shares its key token (and the token
    before it) in each space, against a random other example of the neuron; and in how many neurons each
    space agrees more often."""
    rows = []
    for name, ne, raw, chance in AGREEMENT:
        d = m.dropna(subset=[ne, raw])
        rows.append(
            {
                "nearest neighbour shares": name,
                "neurons": len(d),
                "NE": float(d[ne].mean()),
                "pre-MLP": float(d[raw].mean()),
                "random example": float(d[chance].mean()),
                "NE more often": int((d[ne] > d[raw]).sum()),
                "pre-MLP more often": int((d[ne] < d[raw]).sum()),
                "equal": int((d[ne] == d[raw]).sum()),
            }
        )
    return pd.DataFrame(rows)


def cut_table(m: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """Clusters per neuron (not outliers) at the fixed and the per-neuron cut."""
    rows = []
    for name, col in (
        (f"fixed ({threshold:g})" if threshold is not None else "fixed", "n_clusters_fixed"),
        ("per-neuron (silhouette)", "n_clusters_per_neuron"),
    ):
        c = m[col]
        rows.append(
            {
                "cut": name,
                "median clusters": float(c.median()),
                "mean clusters": float(c.mean()),
                "polysemantic (>= 2)": _pct((c >= 2).mean()),
                "one cluster": _pct((c == 1).mean()),
            }
        )
    return pd.DataFrame(rows)


SUBSTANTIAL_SHARE = 0.1
SUBSTANTIAL_MIN = 5
SEPARATED = 0.25
"""A neuron's clusters count as well separated from this silhouette on (Kaufman and Rousseeuw's bound for
"substantial structure", also `cluster.min_silhouette`'s default)."""


def substantial(clusters: pd.DataFrame, m: pd.DataFrame) -> pd.DataFrame:
    """The substantial clusters of each neuron: not outliers, holding at least `SUBSTANTIAL_SHARE` of the neuron's
    examples and at least `SUBSTANTIAL_MIN` of them. `clusters`: layer, neuron, cluster, size, outlier (label)."""
    n = clusters.merge(m[["layer", "neuron", "n_examples"]], on=["layer", "neuron"])
    big = ~n.outlier & (n["size"] >= np.maximum(SUBSTANTIAL_MIN, SUBSTANTIAL_SHARE * n.n_examples))
    return n[big].sort_values(["layer", "neuron", "cluster"])


def most_polysemantic(m: pd.DataFrame, clusters: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """The neurons with the most substantial, well-separated clusters.

    A neuron's count is its substantial clusters (`substantial`); neurons whose silhouette reaches `SEPARATED` come
    first, ties go to the higher silhouette. Counting every cluster instead puts diffuse neurons first: many small
    clusters of examples that are far from everything. Adds `substantial` (the count) and `labels` (those clusters'
    labels, largest first, when `clusters` has them)."""
    big = substantial(clusters, m)
    counts = big.groupby(["layer", "neuron"]).size().rename("substantial")
    out = m.merge(counts, left_on=["layer", "neuron"], right_index=True, how="left")
    out["substantial"] = out["substantial"].fillna(0).astype(int)
    out["separated"] = out.silhouette.fillna(-1.0) >= SEPARATED
    out = out.sort_values(
        ["separated", "substantial", "silhouette", "layer", "neuron"],
        ascending=[False, False, False, True, True],
        na_position="last",
    ).head(top)
    if "label" in big:
        texts = (
            big.assign(text=[f"C{c}: {t}" for c, t in zip(big.cluster, big.label)])
            .groupby(["layer", "neuron"])
            .text.agg(" · ".join)
        )
        out["labels"] = [texts.get((layer, neuron), "") for layer, neuron in zip(out.layer, out.neuron)]
    return out.drop(columns="separated")


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
        ax.hist(counts, bins=(np.arange(0, top + 2) - 0.5).tolist(), histtype="step", label=f"layer {layer}")
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


def _pct(x) -> str:
    return "–" if np.isnan(x) else f"{100 * float(x):.1f}%"


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if np.isnan(x) else f"{x:.3g}"
    return str(x).replace("|", "\\|")  # a token such as "|" in a label must not end the table cell


def _table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def polysemy(m: pd.DataFrame) -> dict[str, float]:
    """The polysemy of one kind of unit (a metrics table): units with examples, the share of those with two or
    more feature clusters, and the median mean distance and silhouette of their neuron embeddings; `raw_*` the
    same for the clusters of their raw pre-MLP embeddings h (which no unit's weights reshape)."""
    active = m[m.n_examples > 0]
    out: dict[str, float] = {"units": len(m), "with_examples": len(active)}
    for prefix in ("", "raw_"):
        out[f"{prefix}polysemantic"] = float((active[f"{prefix}n_clusters"] >= 2).mean()) if len(active) else math.nan
        out[f"{prefix}mean_dist"] = float(active[f"{prefix}mean_dist"].median())
        out[f"{prefix}silhouette"] = float(active[f"{prefix}silhouette"].median())
    return out


def unit_comparison(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per kind of unit (name → metrics of one layer): `polysemy`, one row each."""
    rows = []
    for name, m in tables.items():
        p = polysemy(m)
        rows.append(
            {
                "units": name,
                "layers": ", ".join(map(str, sorted(m.layer.unique()))),
                "with examples": f"{p['with_examples']} of {p['units']}",
                "≥ 2 clusters": p["polysemantic"],
                "median mean_dist": p["mean_dist"],
                "median silhouette": p["silhouette"],
            }
        )
    return pd.DataFrame(rows)


def _cut_text(active: pd.DataFrame, cut: str, threshold: float | None) -> str:
    fixed, own = active.n_clusters_fixed, active.n_clusters_per_neuron
    rule = (
        "each neuron's own cut (`cluster.cut: silhouette`)"
        if cut == "silhouette"
        else f"the fixed cut (`cluster.cut: fixed`, {_fmt(threshold)})"
    )
    return "\n\n".join(
        [
            f"This run's clusters use {rule}. Clusters per neuron (outliers not counted) at either cut:",
            _table(cut_table(active, threshold)),
            f"The per-neuron cut gives fewer clusters than the fixed cut for {_pct((own < fixed).mean())} of neurons, "
            f"more for {_pct((own > fixed).mean())} and as many for {_pct((own == fixed).mean())}. (A coarser cut can "
            "count more clusters: outliers merged into a group of `min_cluster_size` are no longer outliers.)",
        ]
    )


def write_report(
    run: RunDir,
    metrics: pa.Table,
    labels: pd.DataFrame,
    top: int = 20,
    compare: dict[str, pd.DataFrame] | None = None,
    cut: str = "silhouette",
    threshold: float | None = None,
) -> str:
    """Write report/report.md and its plots; returns the report's path. `labels`: every feature cluster's layer,
    neuron, cluster, size, outlier flag and label (the label stage's). `compare`: metrics of other kinds of
    units at the same layers (name → table), set beside this run's. `cut` and `threshold`: the run's
    `cluster.cut` and `cluster.threshold`, which the text names."""
    m = metrics.to_pandas()
    active = m[m.n_examples > 0]
    sep = separation(active)
    per_layer = (
        active.groupby("layer")
        .agg(
            neurons=("neuron", "size"),
            examples=("n_examples", "mean"),
            clusters_median=("n_clusters", "median"),
            polysemantic=("n_clusters", lambda c: float((c >= 2).mean())),
            silhouette=("silhouette", "median"),
            raw_silhouette=("raw_silhouette", "median"),
            mean_dist=("mean_dist", "median"),
            raw_mean_dist=("raw_mean_dist", "median"),
        )
        .reset_index()
    )
    per_layer["ne_better"] = [separation(active[active.layer == layer])["share"] for layer in per_layer.layer]
    cols = ["layer", "neuron", "n_examples", "n_clusters", "substantial", "silhouette", "mean_dist", "labels"]
    plots = _plots(run, m)
    text = "\n\n".join(
        [
            "# Feature clusters: run report",
            f"{len(m)} neurons in layers {sorted(m.layer.unique().tolist())}; {len(active)} have examples "
            f"({len(m) - len(active)} never reached their threshold). Medians are over neurons with examples; "
            "`polysemantic` is the share with two or more clusters.",
            "## Per layer",
            _table(per_layer),
            "## Where each dendrogram is cut",
            _cut_text(active, cut, threshold),
            "## Neuron embeddings vs pre-MLP embeddings (the paper's Figure 4)",
            f"At this run's cut, neuron-embedding clusters have the higher silhouette for **{sep['ne_better']} of "
            f"{sep['compared']}** neurons ({_pct(sep['share'])}) whose silhouette is defined both ways. Only "
            f"the neuron-embedding silhouette is defined for {sep['only_ne_defined']} neurons, only the pre-MLP one "
            f"for {sep['only_raw_defined']} (a silhouette needs 2 to n - 1 clusters). A silhouette depends on the "
            "cut, and one cut for both spaces may favour either by accident, so the comparison is made three ways:",
            _table(figure4_table(active, threshold)),
            "The same-count comparison is made both ways because a per-neuron cut is chosen to suit its own space. "
            "Without any cut, how often an example's nearest neighbour (cosine distance) shares its key token, a "
            "proxy for showing the same behaviour:",
            _table(agreement_table(active)),
            "A share near 50%, or agreement rates that match, means neither space groups this model's examples "
            "better by that measure.",
            f"## The {top} most polysemantic neurons",
            f"Ranked by substantial clusters (not outliers, each with at least {SUBSTANTIAL_SHARE:.0%} of the "
            f"neuron's examples and at least {SUBSTANTIAL_MIN}), neurons whose silhouette reaches {SEPARATED} "
            "first, ties by silhouette; `labels`: those clusters' offline labels, largest first.",
            _table(most_polysemantic(active, labels, top)[cols]),
            "## Plots",
            "\n".join(f"![{name}]({name})" for name in plots),
        ]
        + (["## Compared with other units at the same layer", _table(unit_comparison(compare))] if compare else [])
    )
    rel = schema.REPORT_MD
    run.write_bytes(rel, (text + "\n").encode())
    log.info("report written to %s", run.path(rel))
    return run.path(rel)
