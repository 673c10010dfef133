"""What the viewer draws: examples as coloured HTML tokens, the dendrogram as a figure. No Streamlit here.

Cluster colours are Streamlit's named colours, so a tab label (`:blue[Cluster 0]`) and the dendrogram
branches of that cluster share one colour, as in the paper's Figure 2.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Sequence

import numpy as np

from ne.explain import TokenUnits, of_extreme
from ne.rundir.reader import Example

CLUSTER_COLOURS = [
    ("blue", "#1c83e1"),
    ("orange", "#ff8c00"),
    ("green", "#21c354"),
    ("red", "#ff4b4b"),
    ("violet", "#803df5"),
]
ABOVE_THRESHOLD = "#808495"
NEWLINE = "⏎"


def cluster_colour(cluster: int) -> tuple[str, str]:
    """(Streamlit colour name, hex) of a cluster; -1 (unclustered) is gray."""
    return ("gray", ABOVE_THRESHOLD) if cluster < 0 else CLUSTER_COLOURS[cluster % len(CLUSTER_COLOURS)]


def cluster_label(cluster: int, size: int, outlier: bool = False, label: str | None = None) -> str:
    """The tab label of a cluster, with its offline label; its text is stable so navigation can select it."""
    if cluster < 0:
        return f"All examples ({size})"
    name, _ = cluster_colour(cluster)
    text = f" · {markdown_escape(label)}" if label else ""
    return f":{name}[Cluster {cluster}] ({size}{', outlier' if outlier else ''}){text}"


def scores_text(scores: dict | None) -> str | None:
    """A cluster's scores on held-out text (`RunData.cluster_scores`) in one line; None without any."""
    parts = []
    if scores and scores.get("label_precision") is not None:
        parts.append(f"label precision {scores['label_precision']:.0%}")
    if scores and scores.get("label_recall") is not None:
        parts.append(f"label recall {scores['label_recall']:.0%}")
    if scores and scores.get("closer") is not None:
        parts.append(
            f"{scores['closer']:.0%} of its {scores['heldout']:,} occurrences read closer to these examples than to "
            "the neuron's other clusters' (MiniLM)"
        )
    return "On held-out text: " + ", ".join(parts) + "." if parts else None


def markdown_escape(text: str) -> str:
    """Text shown literally where Streamlit renders Markdown (tab and button labels): tokens such as `*`, `_` or
    `[` must not format the label."""
    return "".join(f"\\{ch}" if ch in "\\`*_{}[]()#+-.!|<>~:$" else ch for ch in text)


def token_text(text: str) -> str:
    """A token as shown: newlines visible, everything escaped, spaces kept by `white-space: pre`."""
    return html.escape(text.replace("\r\n", NEWLINE).replace("\n", NEWLINE).replace("\r", NEWLINE))


def example_html(
    example: Example,
    decode: Callable[[Sequence[int]], list[str]],
    scale: float,
    before: int = 20,
    after: int = 5,
    importance: tuple[int, np.ndarray] | None = None,
) -> str:
    """One example as a line of tokens from `before` tokens before the key token to `after` after it.

    Background: activation / scale in orange; with `importance` (first position, values up to the key
    token), importance instead: blue where masking the token lowers the activation, red where it raises it.
    Hovering a token shows its activation (and importance).
    """
    lo = max(0, example.pos - before)
    hi = min(len(example.tokens), example.pos + after + 1)
    texts = decode([int(t) for t in example.tokens[lo:hi]])
    spans = []
    for i, text in zip(range(lo, hi), texts):
        act = example.act_at(i)
        tip = f"activation {act:.4g}" if act is not None else "activation not stored"
        if importance is not None:
            imp = _importance_at(importance, i)
            tip += f", importance {imp:.3f}" if imp is not None else ""
            colour = _importance_colour(imp)
        else:
            colour = _activation_colour(act, scale)
        cls = "ne-tok ne-key" if i == example.pos else "ne-tok"
        spans.append(
            f'<span class="{cls}" title="{html.escape(tip)}" style="background:{colour}">{token_text(text)}</span>'
        )
    return f'<div class="ne-ex" data-rank="{example.rank}">{"".join(spans)}</div>'


def explain_html(tokens: Sequence[TokenUnits], frac: float = 0.0, direction: str = "max") -> str:
    """A text as a line of tokens, each coloured by its strongest firing unit: from faint at `frac` of the
    unit's maximum (where units start to fire) to full at its maximum (its minimum in a `direction: min` run);
    hovering a token lists its units."""
    spans = []
    for t in tokens:
        strongest = 0.1 + 0.9 * max(0.0, t.units[0].of_max - frac) / max(1.0 - frac, 1e-9) if t.units else 0.0
        tip = "; ".join(
            f"L{u.layer} N{u.neuron} {of_extreme(u, direction)}"
            + (f", cluster {u.cluster}" if u.cluster is not None else "")
            for u in t.units[:5]
        )
        spans.append(
            f'<span class="ne-tok" data-pos="{t.pos}" title="{html.escape(tip or "no unit fires")}" '
            f'style="background:{_activation_colour(strongest, 1.0)}">{token_text(t.token)}</span>'
        )
    return f'<div class="ne-ex ne-explained">{"".join(spans)}</div>'


EXAMPLE_CSS = """<style>
.ne-ex {font-family: ui-monospace, monospace; font-size: 0.85rem; line-height: 1.9; overflow-wrap: anywhere;
        margin: 0 0 0.35rem 0; padding: 0.1rem 0.3rem; border-bottom: 1px solid rgba(128,128,128,0.2)}
.ne-tok {white-space: pre-wrap; border-radius: 2px; padding: 1px 0}
.ne-key {outline: 2px solid #111; font-weight: 700}
</style>"""


def _importance_at(importance: tuple[int, np.ndarray], i: int) -> float | None:
    start, values = importance
    j = i - start
    if 0 <= j < len(values) and np.isfinite(values[j]):
        return float(values[j])
    return None


def _activation_colour(act: float | None, scale: float) -> str:
    """Orange in proportion to act / scale; scale is negative in a `direction: min` run, so strongly negative
    activations are the coloured ones there."""
    if act is None or act / scale <= 0:
        return "transparent"
    return f"rgba(255,140,0,{min(act / scale, 1.0):.3f})"


def _importance_colour(imp: float | None) -> str:
    if imp is None:
        return "transparent"
    alpha = min(abs(imp), 1.0)
    return f"rgba(28,131,225,{alpha:.3f})" if imp >= 0 else f"rgba(255,75,75,{alpha:.3f})"


def dendrogram_png(linkage: np.ndarray, leaf_clusters: Sequence[int], threshold: float) -> bytes:
    """The dendrogram of one neuron: branches inside a cluster in its colour, the rest gray, the cut dashed.

    Links are coloured by cluster membership (scipy's `link_color_func`) rather than by scipy's colour cycle,
    so colours match the cluster tabs; cutting at `threshold` gives the stored clusters. Leaves are marked
    with their cluster's colour and each cluster's number is written under its leaves. The tree is drawn
    as one line collection, without per-leaf tick labels, which would cost most of the drawing time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from scipy.cluster.hierarchy import dendrogram

    n = len(leaf_clusters)
    members: list[set[int]] = [{int(leaf_clusters[i])} for i in range(n)]
    for a, b, _, _ in linkage:
        members.append(members[int(a)] | members[int(b)])

    def link_colour(node: int) -> str:
        below = linkage[node - n, 2] <= threshold
        clusters = members[node]
        return cluster_colour(next(iter(clusters)))[1] if below and len(clusters) == 1 else ABOVE_THRESHOLD

    tree = dendrogram(linkage, no_plot=True, color_threshold=threshold, link_color_func=link_colour)
    fig, ax = plt.subplots(figsize=(8, 2.6), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.96, bottom=0.16)
    segments = [np.column_stack([x, y]) for x, y in zip(tree["icoord"], tree["dcoord"])]
    ax.add_collection(LineCollection(segments, colors=tree["color_list"], linewidths=1.1))
    leaves = [int(leaf_clusters[i]) for i in tree["leaves"]]
    xs = 5.0 + 10.0 * np.arange(n)
    ax.scatter(xs, np.zeros(n), c=[cluster_colour(c)[1] for c in leaves], s=14, marker="s", clip_on=False, zorder=3)
    for c in sorted(set(leaves)):
        ax.text(
            xs[np.array(leaves) == c].mean(),
            -0.06,
            str(c),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color=cluster_colour(c)[1],
            fontweight="bold",
        )
    top = max(float(np.max(tree["dcoord"])) if n > 1 else 0.0, threshold) * 1.05
    ax.set_xlim(0, 10 * n)
    ax.set_ylim(0, top)
    ax.axhline(threshold, color="#111", linestyle="--", linewidth=0.8)
    ax.set_xticks([])
    ax.set_ylabel("cosine distance")
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
