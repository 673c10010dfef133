"""The Streamlit app. Started by `ne view RUN_DIR`, i.e. `streamlit run ne/viewer/app.py -- RUN_DIR`.

Pages: one neuron (metrics, dendrogram, one tab per feature cluster, similar features), a table of neurons
sorted by a polysemy metric, and MNIST models. Only the selected cluster tab is computed. Every problem
with the run directory is shown as a message in the page, never as a traceback.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import random
import sys
import threading

import numpy as np
import streamlit as st

from ne.config import ModelConfig, from_dict
from ne.errors import NeError
from ne.explain import of_extreme
from ne.rundir.reader import Example, NeuronData, RunData
from ne.viewer import render
from ne.viewer.overview import overview_page

log = logging.getLogger("ne.viewer")
N_SIMILAR = 5
ON_DEMAND = 20  # examples per cluster whose importance is computed when the page asks (a forward pass each)


def run_dir_arg() -> str | None:
    args = [a for a in sys.argv[1:] if a != "--"]
    return args[0] if args else os.environ.get("NE_RUN_DIR")


# --- cached resources -------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def get_data(url: str) -> RunData:
    return RunData(url)


@st.cache_resource(show_spinner="Loading the model for token importance…", max_entries=1)
def get_model(url: str, versions: tuple):
    """(model, None) or (None, why it could not be loaded); only token importance computed now needs it.
    `versions`: the run's stage versions (`RunData.versions`), so a model changed by a redone harvest is
    loaded anew."""
    try:
        from ne.models import load_units
        from ne.rundir.stages import check_inputs

        data = get_data(url)
        check_inputs(data.run, data.manifest(), ("sae", "weights", "maxima"))  # never a model changed since
        model = load_units(data.config())
        model.run = one_at_a_time(model.run)  # type: ignore[method-assign]  # one model, many sessions' threads
        return model, None
    except Exception as exc:  # any failure (no hub, missing weights) only costs on-demand importance
        log.warning("model not loaded: %s", exc)
        return None, f"{type(exc).__name__}: {exc}"


def one_at_a_time(run):
    """`run` behind a lock. Token importance and explain share the cached model from different script threads,
    and a forward pass hooks modules every thread shares: run together, one pass's hooks fire (and stop) in the
    other's, which then lacks its layers' outputs."""
    lock = threading.Lock()

    @functools.wraps(run)
    def locked(*args, **kwargs):
        with lock:
            return run(*args, **kwargs)

    return locked


@st.cache_resource(show_spinner=False, max_entries=64)
def get_neuron(url: str, layer: int, neuron: int, versions: tuple) -> NeuronData:
    """One neuron's data, kept while no stage of the run is redone (`versions` is part of the key)."""
    return get_data(url).neuron(layer, neuron)


@st.cache_resource(show_spinner=False, max_entries=4)
def get_importance(url: str, mask_token: int | None, versions: tuple):
    from ne.compute.importance import ImportanceCache

    model, _ = get_model(url, versions)
    return ImportanceCache(model, mask_token) if model is not None else None


@st.cache_resource(show_spinner=False, max_entries=1)
def get_index(url: str, versions: tuple):
    """(SimilarFeatures, None) or (None, why there is no similar-features list): the run's co-activation table
    (answers by behaviour) and its index (answers by vector), whichever it has."""
    data = get_data(url)
    manifest = data.manifest()
    if not data.ready("index", manifest) and not data.ready("coactivation", manifest):
        from ne.rundir.graph import redo_command
        from ne.rundir.stages import state_of

        state, why = state_of(manifest, "index")
        return None, (
            f"the index of this run is {state}{why}: run {redo_command('index', False)} (or "
            f"{redo_command('occurrence', False)}) to see similar features"
        )
    try:
        # The app is an entry point like the CLI, so it may reach into index/; the library never does.
        from index.query import SimilarFeatures

        return SimilarFeatures.load(url), None
    except (ImportError, NeError, OSError, RuntimeError) as exc:
        return None, f"the similar features of this run cannot be used ({exc})"


@st.cache_data(show_spinner=False, max_entries=64)
def dendrogram_png(url: str, layer: int, neuron: int, versions: tuple) -> bytes | None:
    data = get_neuron(url, layer, neuron, versions)
    if data.linkage is None or len(data.linkage) == 0 or data.threshold is None:
        return None
    leaves = [e.cluster if e.cluster is not None else -1 for e in data.examples]
    return render.dendrogram_png(data.linkage, leaves, data.threshold)


# --- navigation: the current neuron lives in st.session_state.nav (widget state is dropped off-page) -------


def go(layer: int, neuron: int, cluster: int | None = None, push: bool = True) -> None:
    """Open (layer, neuron[, cluster]); with `push`, record it in the back/forward history."""
    ss = st.session_state
    if push:
        i = ss.get("hist_i", -1)
        ss.history = ss.get("history", [])[: i + 1] + [(layer, neuron, cluster)]
        ss.hist_i = len(ss.history) - 1
    ss.nav = (layer, neuron)
    ss.layer_pick, ss.neuron_pick, ss.cluster_target = layer, neuron, cluster
    ss.page = "Neuron"


def step(delta: int) -> None:
    ss = st.session_state
    i = ss.get("hist_i", 0) + delta
    if 0 <= i < len(ss.get("history", [])):
        ss.hist_i = i
        layer, neuron, cluster = ss.history[i]
        go(layer, neuron, cluster, push=False)


def picked() -> None:
    go(st.session_state.layer_pick, int(st.session_state.neuron_pick))


def go_random(data: RunData) -> None:
    layer = random.choice(data.layers())
    neurons = data.neurons(layer)
    if len(neurons):
        go(layer, int(random.choice(neurons)))


def init_state(data: RunData) -> None:
    ss = st.session_state
    if "nav" in ss:
        return
    layers = data.layers()
    params = st.query_params
    if "neuron" not in params:  # a fresh start opens on the run overview
        ss.nav = (layers[0], int(next(iter(data.neurons(layers[0])), 0)))
        ss.page = "Overview"
        return
    try:
        layer = int(params.get("layer", layers[0]))
        neuron = int(params["neuron"]) if "neuron" in params else int(next(iter(data.neurons(layer)), 0))
        cluster = int(params["cluster"]) if "cluster" in params else None
    except ValueError:
        layer, neuron, cluster = layers[0], 0, None
    go(layer if layer in layers else layers[0], neuron, cluster)


# --- token decoding ---------------------------------------------------------------------------------------


class Decoder:
    """Token ids to display strings with the run's tokenizer, or `[id]` when it cannot be loaded; memoised."""

    def __init__(self, decode, error: str | None):
        self.decode, self.error = decode, error
        self.cache: dict[int, str] = {}

    def __call__(self, ids):
        missing = [i for i in dict.fromkeys(ids) if i not in self.cache]
        if missing:
            texts = self.decode(missing) if self.decode is not None else [f"[{i}]" for i in missing]
            self.cache.update(zip(missing, texts))
        return [self.cache[i] for i in ids]


@st.cache_resource(show_spinner="Loading the tokenizer…")
def get_decoder(model_json: str) -> Decoder:
    try:
        from ne.models import load_token_decoder

        return Decoder(load_token_decoder(from_dict(ModelConfig, json.loads(model_json))), None)
    except Exception as exc:  # any failure (no hub, missing files) only costs the decoded text
        log.warning("tokenizer not loaded: %s", exc)
        return Decoder(None, f"{type(exc).__name__}: {exc}")


# --- pages ------------------------------------------------------------------------------------------------


def sidebar_navigation(data: RunData) -> None:
    ss = st.session_state
    layers = data.layers()
    ss.layer_pick, ss.neuron_pick = ss.nav  # the widgets forget their state while another page is shown
    st.sidebar.selectbox("Layer", layers, key="layer_pick", on_change=picked)
    st.sidebar.number_input("Neuron", min_value=0, step=1, key="neuron_pick", on_change=picked)
    back, fwd = st.sidebar.columns(2)
    hist_i, n_hist = ss.get("hist_i", 0), len(ss.get("history", []))
    back.button("◀ Back", on_click=step, args=(-1,), disabled=hist_i <= 0, width="stretch")
    fwd.button("Forward ▶", on_click=step, args=(1,), disabled=hist_i >= n_hist - 1, width="stretch")
    st.sidebar.button("Random neuron", on_click=go_random, args=(data,), width="stretch")


def neuron_page(data: RunData, url: str) -> None:
    ss = st.session_state
    cfg = data.config()
    versions = data.versions()
    layer, neuron = ss.nav
    st.query_params.update(layer=str(layer), neuron=str(neuron))
    unit = "SAE latent" if data.model_info().get("sae") else "Neuron"
    st.header(f"Layer {layer} · {unit} {neuron}")
    d_mlp = data.model_info().get("d_mlp")
    if neuron < 0 or d_mlp is not None and neuron >= d_mlp:
        valid = f"layer {layer} has neurons 0 to {d_mlp - 1}" if d_mlp is not None else "neurons are numbered from 0"
        st.error(f"{unit} {neuron} does not exist: {valid}.")
        return
    nd = get_neuron(url, layer, neuron, versions)
    if not nd.examples:
        word = "minimum" if cfg.harvest.direction == "min" else "maximum"
        top = f" (its {word} activation is {nd.max_act:.4g})" if nd.max_act is not None else ""
        st.info(
            f"Neuron {neuron} of layer {layer} has no dataset examples{top}: no context reached "
            f"{cfg.harvest.frac} × its {word}, or its {word} is not of the harvested sign. "
            "Pick another neuron, press Random, or sort the neuron table by a metric."
        )
        return
    model_json = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
    decode = get_decoder(model_json)
    if decode.error:
        st.warning(f"The run's tokenizer could not be loaded, so tokens are shown as ids: {decode.error}")

    metrics_panel(nd)
    png = dendrogram_png(url, layer, neuron, versions)
    if png is not None:
        # Inline, not st.image: a media URL from an earlier rerun can be deleted before the browser fetches it,
        # which leaves a broken image when neurons are switched quickly.
        st.markdown(
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
            f'alt="dendrogram" style="max-width:100%">',
            unsafe_allow_html=True,
        )
        st.caption(
            f"Dendrogram of the {len(nd.examples)} examples; dashed line: this neuron's cut, at cosine "
            f"distance {nd.threshold:.3g} ({cut_rule(data)}); leaves labelled and coloured by cluster"
        )
    elif not nd.clustered:
        st.info("This run has no clusters yet: run the cluster stage to split the examples into features.")

    before = st.sidebar.number_input("Tokens before the key token", 0, 200, cfg.viewer.window_before)
    after = st.sidebar.number_input("Tokens after the key token", 0, 200, cfg.viewer.window_after)
    show_importance = st.toggle(
        "Token importance",
        key="importance",
        help=f"1 − act_masked / act_key, masking one earlier token at a time with token {mask_label(data, cfg)}",
    )

    clusters = nd.clusters()
    labels = {
        c: render.cluster_label(c, len(m), any(e.outlier for e in m), nd.labels.get(c)) for c, m in clusters.items()
    }
    tab_key = f"tabs_{layer}_{neuron}"
    target = ss.pop("cluster_target", None)
    if target in labels:
        ss[tab_key] = labels[target]
    tabs = st.tabs(list(labels.values()), key=tab_key, on_change="rerun")
    for (c, members), tab in zip(clusters.items(), tabs):
        if tab.open is False:
            continue
        with tab:
            imp = importance_for(nd, members, url, cfg, before, versions) if show_importance else None
            cluster_tab(data, url, nd, c, members, decode, (before, after), imp, versions)


def cluster_tab(
    data: RunData,
    url: str,
    nd: NeuronData,
    c: int,
    members: list[Example],
    decode,
    window: tuple[int, int],
    imp,
    versions,
) -> None:
    """One cluster's tab: its examples, its scores on held-out text, and its similar features."""
    before, after = window
    left, right = st.columns([3, 2], gap="large")
    if c >= 0:
        st.query_params["cluster"] = str(c)
        with right:
            similar_features(data, url, nd.layer, nd.neuron, c, decode, before, after, versions)
    left.caption(
        "Central example first. Hover a token for its activation; the outlined token is the key token."
        + (" Blue: masking the token lowers the activation; red: raises it." if imp is not None else "")
    )
    if c >= 0 and (text := render.scores_text(nd.scores.get(c))):
        left.caption(text)
    rows = [render.example_html(e, decode, nd.scale, before, after, imp.get(e.rank) if imp else None) for e in members]
    left.html(render.EXAMPLE_CSS + f'<div class="ne-cluster" data-cluster="{c}">' + "".join(rows) + "</div>")


def mask_label(data: RunData, cfg) -> str:
    token = cfg.importance.mask_token
    if token is None:
        token = data.model_info().get("pad_token_id")
        return f"{token} (the tokenizer's pad/EOS token)" if token is not None else "pad/EOS"
    return str(token)


def importance_for(nd: NeuronData, members: list[Example], url: str, cfg, before: int, versions: tuple):
    """Importance by rank: precomputed where the run has it, else computed now (one forward per example)."""
    out = {e.rank: nd.importance[e.rank] for e in members if e.rank in nd.importance}
    todo = [e for e in members if e.rank not in out]
    if not todo:
        return out
    if len(todo) > ON_DEMAND:
        st.info(
            f"Importance is computed on demand for the first {ON_DEMAND} examples of a cluster; the rest keep "
            "their activation colours. `ne importance` precomputes it for every example of a run."
        )
        todo = todo[:ON_DEMAND]
    compute = get_importance(url, cfg.importance.mask_token, versions)
    if compute is None:
        st.warning(f"Token importance needs the run's model, which could not be loaded: {get_model(url, versions)[1]}")
        return out
    with st.spinner(f"Computing token importance of {len(todo)} examples…"):
        for e in todo:
            start = max(0, e.pos - before)
            out[e.rank] = (start, compute(e.tokens, e.ctx_id, e.pos, nd.layer, nd.neuron, start))
    return out


def cut_rule(data: RunData) -> str:
    """How the run's cluster stage cut its dendrograms, from the settings it recorded (runs made before
    `cluster.cut` existed used the fixed cut)."""
    settings = data.manifest()["stages"].get("cluster", {}).get("settings", {})
    if settings.get("cluster.cut", "fixed") == "fixed":
        return f"the run's fixed cut, cluster.threshold {settings.get('cluster.threshold', '?')}"
    return "chosen for this neuron by the silhouette of its clusters"


def metrics_panel(nd: NeuronData) -> None:
    m = nd.metrics
    cols = st.columns(4)
    cols[0].metric("examples", len(nd.examples))
    cols[1].metric("clusters", len({e.cluster for e in nd.examples if e.cluster is not None}) or "–")
    label = "min activation" if nd.max_act is not None and nd.max_act < 0 else "max activation"
    cols[2].metric(label, f"{nd.max_act:.4g}" if nd.max_act is not None else "–")
    sil = _num(m.get("silhouette")) if m else None
    cols[3].metric("silhouette", f"{sil:.3f}" if sil is not None else "–")
    if m:
        names = [k for k in m if f"raw_{k}" in m]
        with st.expander("Polysemy metrics: neuron embeddings vs raw pre-MLP embeddings"):
            st.dataframe(
                {
                    "metric": names,
                    "neuron embedding": [_num(m[k]) for k in names],
                    "raw h": [_num(m[f"raw_{k}"]) for k in names],
                },
                hide_index=True,
            )


def _num(v):
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def similar_features(data, url, layer, neuron, cluster, decode, before, after, versions) -> None:
    index, why = get_index(url, versions)
    if index is None:
        st.markdown("**Similar features**")
        st.caption(why)
        return
    if index.coactivation is not None:
        held_out_panel(index.coactivation, layer, neuron, cluster)
    choices = [
        c for c, ok in (("fires together", index.coactivation is not None), ("vector", index.index is not None)) if ok
    ]
    by = st.radio(
        "Similar features",
        choices,
        horizontal=True,
        key=f"by_{layer}_{neuron}_{cluster}",
        help="fires together: the features of other neurons that fire on the same held-out tokens "
        "(co-activation); vector: the nearest central examples in the FAISS index",
    )
    try:
        hits = index.query(layer, neuron, cluster, N_SIMILAR, by="vector" if by == "vector" else "auto")
    except NeError as exc:
        st.caption(str(exc))
        return
    if not hits:
        st.caption("No similar feature found.")
        return
    if hits[0].by == "behaviour":
        st.caption(
            f"Features of other neurons that fire on the same held-out tokens, best {index.coactivation.score} "
            "first; click one to open it."
        )
    elif by != "vector":
        st.caption(
            "This feature never fires with another in the held-out text, so these are the nearest central "
            "examples by vector instead; click one to open it."
        )
    else:
        st.caption(
            "Feature clusters of other neurons whose central example is closest (cosine similarity); "
            "click one to open it."
        )
    for i, h in enumerate(hits):
        what = (
            f"together on {h.count} tokens, {index.coactivation.score} {h.similarity:.3g}"
            if h.by == "behaviour"
            else f"similarity {h.similarity:.3f}"
        )
        label = data.labels(h.layer, h.neuron).get(h.cluster)
        text = f" · {render.markdown_escape(label)}" if label else ""
        st.button(
            f"L{h.layer} · N{h.neuron} · C{h.cluster}{text} — {what}",
            key=f"sim_{layer}_{neuron}_{cluster}_{i}",
            on_click=go,
            args=(h.layer, h.neuron, h.cluster),
            width="stretch",
        )
        central = data.central_example(h.layer, h.neuron, h.cluster)
        if central is not None:
            nd2 = get_neuron(url, h.layer, h.neuron, versions)
            st.html(render.EXAMPLE_CSS + render.example_html(central, decode, nd2.scale, before, after))


def held_out_panel(coactivation, layer: int, neuron: int, cluster: int) -> None:
    """The feature in held-out text: how often it fires, how strongly."""
    stats = coactivation.stats(layer, neuron, cluster)
    st.markdown("**In held-out text**")
    if stats is None or not stats["occurrences"]:
        st.caption(f"Never fires in the {coactivation.n_tokens:,} held-out tokens.")
        return
    cols = st.columns(3)
    cols[0].metric("tokens", f"{stats['occurrences']:,}")
    cols[1].metric("density", f"{stats['density']:.2%}")
    cols[2].metric("median activation", f"{stats['act_q50']:.3g}")
    st.caption(
        f"Fires on {stats['occurrences']:,} of {coactivation.n_tokens:,} held-out tokens; activation from "
        f"{stats['act_q10']:.3g} to {stats['act_q90']:.3g} (10th to 90th percentile), strongest "
        f"{stats['act_peak']:.3g}."
    )


@st.cache_resource(show_spinner="Loading the run's model and clusters…", max_entries=1)
def get_explainer(url: str, versions: tuple):
    """(Explainer, None) or (None, why texts cannot be explained); a new one once a stage is redone."""
    from ne.explain import Explainer

    model, why = get_model(url, versions)
    if model is None:
        return None, f"explaining a text needs the run's model, which could not be loaded: {why}"
    try:
        return Explainer.load(url, model=model), None
    except NeError as exc:
        return None, str(exc)


def explain_page(data: RunData, url: str) -> None:
    st.header("Explain text")
    st.caption(
        "Which units fire on each token (activation ≥ the run's frac × their maximum), and as which of "
        "their feature clusters: the one whose mean neuron embedding is nearest."
    )
    text = st.text_area("Text to explain", key="explain_text", height=120, placeholder="Type or paste a text")
    top = st.number_input("Units per token", 1, 50, 5, key="explain_top")
    if not st.button("Explain", type="primary") and not st.session_state.get("explained"):
        return
    st.session_state.explained = True
    explainer, why = get_explainer(url, data.versions())
    if explainer is None:
        st.error(why)
        return
    try:
        tokens = explainer.explain(text, top=int(top))
    except NeError as exc:
        st.error(str(exc))
        return
    st.html(render.EXAMPLE_CSS + render.explain_html(tokens, data.config().harvest.frac, explainer.direction))
    firing = [t for t in tokens if t.units]
    if not firing:
        st.info("No unit reaches its threshold on this text.")
        return
    st.caption(
        f"{len(firing)} of {len(tokens)} tokens have firing units; click one to open its neuron on that "
        "feature cluster."
    )
    for t in firing:
        st.markdown(f"**{t.pos}** `{t.token.strip() or repr(t.token)}`")
        for i, u in enumerate(t.units):
            label = f"L{u.layer} · N{u.neuron} · {of_extreme(u, explainer.direction)}"
            if u.cluster is not None:
                named = f" {render.markdown_escape(u.label)}" if u.label else ""
                label += f" → C{u.cluster}{named} ({u.cluster_size} examples, similarity {u.similarity:.2f})"
            left, right = st.columns([3, 2])
            left.button(
                label, key=f"explain_{t.pos}_{i}", on_click=go, args=(u.layer, u.neuron, u.cluster), width="stretch"
            )
            right.caption(u.central_text or "")


def table_page(data: RunData) -> None:
    st.header("Neurons by polysemy")
    try:
        table = data.metrics_table().to_pandas()
    except NeError as exc:
        st.error(str(exc))
        return
    metric_names = [c for c in table.columns if c not in ("layer", "neuron")]
    c1, c2, c3 = st.columns(3)
    metric = c1.selectbox(
        "Sort by", metric_names, index=metric_names.index("n_clusters") if "n_clusters" in metric_names else 0
    )
    descending = c2.toggle("Largest first", value=True)
    layers = c3.multiselect("Layers", sorted(table.layer.unique().tolist()))
    if layers:
        table = table[table.layer.isin(layers)]
    table = table.sort_values(metric, ascending=not descending, kind="stable").head(1000)
    event = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row", key="ntable")
    rows = event.selection.rows if event else []
    if rows:
        row = table.iloc[rows[0]]
        st.button(
            f"Open layer {int(row.layer)} neuron {int(row.neuron)}", on_click=go, args=(int(row.layer), int(row.neuron))
        )
    else:
        st.caption("Select a row to open its neuron (the first 1,000 rows are shown).")


def main() -> None:
    st.set_page_config(page_title="neuron-embeddings viewer", layout="wide")
    url = run_dir_arg()
    st.sidebar.title("neuron-embeddings")
    if not url:
        st.error("No run directory given: start the viewer with `ne view RUN_DIR`.")
        return
    st.sidebar.caption(f"run: `{url}`")
    data = get_data(url)
    status = data.status()
    for message in status.errors:
        st.error(message)
    if not status.kind:
        return
    for message in status.warnings:
        st.sidebar.caption(f"⚠ {message}")
    pages = (["Overview", "Neuron", "Neuron table", "Explain text"] if "lm" in status.kind else []) + (
        ["MNIST"] if "mnist" in status.kind else []
    )
    if "lm" in status.kind:
        init_state(data)
    if st.session_state.get("page") not in pages:
        st.session_state.page = pages[0]
    PAGES[st.sidebar.radio("Page", pages, key="page")](data, url)


def _neuron(data: RunData, url: str) -> None:
    sidebar_navigation(data)
    neuron_page(data, url)


def _mnist(data: RunData, url: str) -> None:
    from ne.viewer.mnist_page import mnist_page

    mnist_page(data)


# Each page of the sidebar, by name. (No docstring here: Streamlit would print a bare string of its script.)
PAGES = {
    "Overview": lambda data, url: overview_page(data, go),
    "Neuron": _neuron,
    "Neuron table": lambda data, url: table_page(data),
    "Explain text": explain_page,
    "MNIST": _mnist,
}


def _guarded() -> None:
    try:
        main()
    except NeError as exc:
        st.error(str(exc))
    except Exception as exc:  # a bug: log the traceback for us, show one readable line to the user
        log.exception("viewer error")
        st.error(
            f"The viewer hit an unexpected error ({type(exc).__name__}: {exc}); details are in the "
            "terminal that runs `ne view`."
        )


_guarded()
