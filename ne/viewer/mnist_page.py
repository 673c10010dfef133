"""The MNIST page: one neuron of the MLP's hidden layer or of an SAE trained on it.

The definitions are `ne.mnist.figures`' (Figure 5): dataset examples are the first 100 test images that activate
the neuron (as in the paper's Table 3), their neuron embeddings are x ⊙ W1[j] (MLP) or (a − b_dec) ⊙ W_enc[j]
(SAE), and their feature clusters come from `ne.compute.cluster`. The page adds the logit effects and the
activation distribution, and draws each cluster as an image grid with its central example first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch

from ne.compute.cluster import Clusters
from ne.compute.sae import SAE
from ne.config import ClusterConfig
from ne.errors import DataError
from ne.mnist import figures
from ne.mnist.data import MnistSplit, load_idx, scale_pixels
from ne.mnist.model import MLP, load_sae
from ne.rundir.store import RunDir
from ne.viewer import render

MODELS = {"MLP hidden layer": "mlp", "SAE (standard)": "sae_standard", "SAE (+ NE loss)": "sae_ne_loss"}


@dataclass
class MnistNeuron:
    acts: np.ndarray
    """The neuron's activation on every test image."""
    examples: np.ndarray
    """Indices of its dataset examples in the test set (`ne.mnist.figures.dataset_examples`)."""
    clusters: Clusters | None
    """Feature clusters of the examples (None with fewer than two)."""
    logit_effect: np.ndarray
    """Change of each digit's logit per unit of activation (through W2, and W_dec for an SAE)."""
    input_weights: np.ndarray | None
    """W1[j] as 28×28 for an MLP neuron; None for an SAE neuron, which does not read pixels directly."""
    activation_map: np.ndarray
    """`ne.mnist.figures.activation_map`, 28×28."""
    importance_map: np.ndarray
    """The mean example scaled by the activation map normalised to [0, 1], 28×28 (as in `ne.mnist.figures`)."""


def mnist_dir(manifest: dict) -> Path:
    """The MNIST IDX folder: the run's mnist_config data.dir, else NE_DATA_DIR/mnist, else ../shared/data."""
    candidates = []
    configured = manifest.get("mnist_config", {}).get("data", {}).get("dir")
    if configured:
        candidates.append(Path(configured))
    if os.environ.get("NE_DATA_DIR"):
        candidates.append(Path(os.environ["NE_DATA_DIR"]) / "mnist")
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist")
    for path in candidates:
        if path.is_dir():
            return path
    raise DataError(
        f"MNIST data not found (looked in {', '.join(map(str, candidates))}); set NE_DATA_DIR to the folder "
        "holding mnist/ with the IDX files"
    )


def load_models(run, kind: str) -> tuple[MLP, SAE | None]:
    """The run's MLP, and the SAE `kind` (None for the MLP itself)."""
    rel = f"mnist/{kind}.safetensors"
    for needed in ("mnist/mlp.safetensors", rel):
        if not run.exists(needed):
            raise DataError(f"{run.path(needed)} is missing; train it with `ne train` into this run directory")
    mlp = MLP.load(run.path("mnist/mlp.safetensors"))
    sae = None if kind == "mlp" else load_sae(run.path(rel), d_in=mlp.hidden_size)
    return mlp, sae


@torch.no_grad()
def analyse(
    mlp: MLP, sae: SAE | None, neuron: int, split: MnistSplit, cluster_cfg: ClusterConfig, max_examples: int = 100
) -> MnistNeuron:
    """Everything the page shows for one neuron, computed with `ne.mnist.figures`' definitions."""
    acts = torch.relu(figures.pre_activation(mlp, sae, neuron, scale_pixels(split.images))).numpy()
    idx, h, w = figures.dataset_examples(mlp, sae, neuron, split, max_examples)
    amap = figures.activation_map(mlp, sae, neuron)
    effect = mlp.W2[:, neuron] if sae is None else mlp.W2 @ sae.W_dec[:, neuron]
    return MnistNeuron(
        acts=acts,
        examples=idx,
        clusters=figures.feature_clusters(h, w, cluster_cfg) if len(idx) >= 2 else None,
        logit_effect=effect.numpy(),
        input_weights=mlp.W1[neuron].numpy().reshape(28, 28) if sae is None else None,
        activation_map=amap.numpy().reshape(28, 28),
        importance_map=figures.importance_map(split, idx, amap).numpy().reshape(28, 28),
    )


def heatmap_png(image: np.ndarray, title: str, diverging: bool = False) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6, 2.8), dpi=100)
    if diverging:
        lim = float(np.abs(image).max()) or 1.0
        im = ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(image, cmap="magma")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def mnist_page(data) -> None:
    """Streamlit page; `data` is the app's RunData."""
    st.header("MNIST")
    c1, c2, c3, c4 = st.columns(4)
    label = c1.selectbox("Model", list(MODELS), key="mnist_model")
    kind = MODELS[label]
    try:
        mlp, sae = _cached_models(data.url, kind)
        split = _cached_test(data.url)
    except DataError as exc:
        st.error(str(exc))
        return
    n = mlp.hidden_size if sae is None else sae.n_neurons
    neuron = int(c2.number_input(f"Neuron (0–{n - 1})", 0, n - 1, 0, key=f"mnist_neuron_{kind}"))
    threshold = c3.slider("Cluster cut (cosine distance)", 0.05, 1.5, ClusterConfig().threshold, 0.05)
    max_examples = c4.number_input("Examples (first active test images)", 2, 1000, 100, 10)
    view = analyse(mlp, sae, neuron, split, ClusterConfig(cut="fixed", threshold=threshold), int(max_examples))
    images, labels = split.images, split.labels

    st.subheader(f"{label} · neuron {neuron}")
    m1, m2, m3 = st.columns(3)
    m1.metric("max activation", f"{view.acts.max():.4g}")
    m2.metric("active on test images", f"{(view.acts > 0).mean():.1%}")
    m3.metric("examples · clusters", f"{len(view.examples)} · {view.clusters.n_clusters if view.clusters else '–'}")
    if len(view.examples) == 0:
        st.info(f"Neuron {neuron} of the {label} never fires on the test set: it has no dataset examples.")
        return

    maps = st.columns(3)
    if view.input_weights is not None:
        maps[0].image(heatmap_png(view.input_weights, "input weights W1[j]", diverging=True))
    maps[1].image(heatmap_png(view.activation_map, "activation map"))
    maps[2].image(heatmap_png(view.importance_map, "importance map"))

    left, right = st.columns(2)
    left.markdown("**Logit effect per unit of activation**")
    left.bar_chart(
        pd.DataFrame({"digit": [str(d) for d in range(10)], "effect": view.logit_effect}),
        x="digit",
        y="effect",
        height=220,
    )
    right.markdown("**Activation distribution on the test set** (nonzero activations)")
    nonzero = view.acts[view.acts > 0]
    counts, edges = np.histogram(nonzero, bins=30) if len(nonzero) else (np.zeros(1), np.zeros(2))
    centres = np.round((edges[:-1] + edges[1:]).astype(np.float64) / 2, 2)
    right.bar_chart(pd.DataFrame({"activation": centres, "images": counts}), x="activation", y="images", height=220)

    if view.clusters is None:
        st.image(_upscale(images[view.examples[0]]), caption="the only example")
        return
    groups = _members(view)
    tabs = st.tabs([render.cluster_label(c, len(m)) for c, m in groups.items()])
    for members, tab in zip(groups.values(), tabs):
        with tab:
            st.caption("Central example first; captions: digit label and activation.")
            ex = view.examples[members]
            st.image(
                [_upscale(images[i]) for i in ex[:60]],
                caption=[f"{int(labels[i])} · {view.acts[i]:.2f}" for i in ex[:60]],
                width=72,
            )


def _members(view: MnistNeuron) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    clusters = view.clusters
    if clusters is None:  # one example: nothing was clustered
        return out
    for c in range(clusters.n_clusters):
        idx = np.flatnonzero(clusters.labels == c)
        central = clusters.central[c]
        out[c] = np.r_[central, idx[idx != central]]
    return out


def _upscale(image: torch.Tensor) -> np.ndarray:
    return np.kron(image.numpy().reshape(28, 28), np.ones((3, 3), np.uint8))


@st.cache_resource(show_spinner="Loading the MNIST models…")
def _cached_models(url: str, kind: str):
    return load_models(RunDir(url), kind)


@st.cache_resource(show_spinner="Reading the MNIST test set…")
def _cached_test(url: str) -> MnistSplit:
    from ne.rundir.reader import RunData

    return load_idx(str(mnist_dir(RunData(url).manifest())), "test")
