"""The viewer's first page: what the run is, the neurons worth opening first, and a way to any neuron."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from ne import schema
from ne.errors import NeError
from ne.rundir.labels import read_all_labels
from ne.rundir.reader import RunData
from ne.rundir.report import most_polysemantic, separation

TOP = 12
"""Neurons listed as worth opening first."""
HITS = 30
"""Feature clusters listed for a label search."""


def overview_page(data: RunData, go: Callable[..., None]) -> None:
    """`go(layer, neuron)` opens a neuron's page."""
    info = data.model_info()
    unit = "SAE latents" if info.get("sae") else "neurons"
    st.header("Run overview")
    layers = data.layers()
    st.markdown(
        f"**{info.get('name', 'model')}** · layers {', '.join(map(str, layers))} · "
        f"{info.get('d_mlp', '?')} {unit} per layer"
    )
    try:
        metrics = data.metrics_table().to_pandas()
    except NeError as exc:  # not clustered yet: the neuron pages still show the examples
        st.info(f"{exc}. Until then, open any neuron below to see its dataset examples.")
        metrics = None
    labels = _labels(data)
    if metrics is not None:
        _summary(metrics, unit)
        _worth_opening(metrics, labels, unit, go)
    _search(labels, go)
    _jump(layers, unit, go)


def _labels(data: RunData) -> pd.DataFrame:
    """Every feature cluster's size, outlier flag and label; empty before the label stage."""
    if not data.ready("label"):
        return pd.DataFrame(columns=["layer", "neuron", "cluster", "size", "outlier", "label"])
    return read_all_labels(data.run, data.run.layers(schema.LABELS_DIR))


def _summary(metrics: pd.DataFrame, unit: str) -> None:
    active = metrics[metrics.n_examples > 0]
    poly = active[active.n_clusters >= 2]
    sep = separation(active)
    cols = st.columns(4)
    cols[0].metric(f"{unit} with examples", f"{len(active):,} of {len(metrics):,}")
    cols[1].metric("feature clusters", f"{int(active.n_clusters.sum()):,}")
    cols[2].metric("polysemantic (≥ 2 clusters)", f"{len(poly) / max(len(active), 1):.0%}")
    share = sep["share"]
    cols[3].metric(
        "neuron embeddings separate better",
        "–" if share != share else f"{share:.0%}",
        help="Share of neurons whose clusters have a higher silhouette in neuron-embedding space than "
        "in pre-MLP space (the paper's Figure 4), among those where both are defined.",
    )


def _worth_opening(metrics: pd.DataFrame, labels: pd.DataFrame, unit: str, go: Callable[..., None]) -> None:
    st.subheader(f"{unit.capitalize()} worth opening first")
    st.caption(
        "The most polysemantic: most substantial clusters among the well separated (the run report's "
        "ranking), with their labels. The Neuron table page sorts every unit by any metric."
    )
    top = most_polysemantic(metrics[metrics.n_examples > 0], labels, TOP)
    for row in top.itertuples():
        sil = "" if pd.isna(row.silhouette) else f", silhouette {row.silhouette:.2f}"
        n = int(row.substantial)
        text = f"Layer {row.layer} · {int(row.neuron)}: {n} substantial cluster{'s' * (n != 1)}{sil}"
        st.button(
            text + (f" · {row.labels}" if getattr(row, "labels", "") else ""),
            key=f"top_{row.layer}_{row.neuron}",
            on_click=go,
            args=(int(row.layer), int(row.neuron)),
        )


def _search(labels: pd.DataFrame, go: Callable[..., None]) -> None:
    if labels.empty:
        return
    st.subheader("Search feature labels")
    query = st.text_input("Label contains", key="label_query", placeholder='a token, e.g. "for" or "("')
    if not query:
        return
    hits = labels[labels.label.str.contains(query, case=False, regex=False) & ~labels.outlier]
    hits = hits.sort_values(["size", "layer", "neuron", "cluster"], ascending=[False, True, True, True])
    st.caption(
        f"{len(hits):,} feature clusters' labels contain {query!r}"
        + (f"; the {HITS} largest:" if len(hits) > HITS else ":")
    )
    for row in hits.head(HITS).itertuples():
        st.button(
            f"L{row.layer} · N{row.neuron} · C{row.cluster} ({row.size} examples): {row.label}",
            key=f"hit_{row.layer}_{row.neuron}_{row.cluster}",
            on_click=go,
            args=(int(row.layer), int(row.neuron), int(row.cluster)),
        )


def _jump(layers: list[int], unit: str, go: Callable[..., None]) -> None:
    st.subheader(f"Open any of the {unit}")
    left, mid, right = st.columns([2, 2, 1], vertical_alignment="bottom")
    layer = left.selectbox("Layer", layers, key="jump_layer")
    neuron = mid.number_input(unit.capitalize()[:-1], min_value=0, step=1, key="jump_neuron")
    right.button(f"Open {unit[:-1]}", key="jump_open", on_click=go, args=(int(layer), int(neuron)), width="stretch")
