"""Figure 5 for any MLP neuron or SAE neuron of the MNIST model, as PNG.

Panels: the input-weight image (MLP neurons: W1[j] as 28×28); the activation map, the largest increase of
the neuron's pre-activation that one pixel can induce (every image starts black, the MNIST background,
and pixel p alone turns white; for an MLP neuron this is relu(W1[j, p]) × the pixel range, for an SAE
neuron it goes through the MLP's ReLU); the importance map, the average of the neuron's dataset examples
(the first `max_examples` test images that activate it, as in Table 3) scaled by the activation map
normalised to [0, 1]; and the feature clusters of those examples (`ne.compute.cluster` on the cosine distances
of their neuron embeddings) as one row of images per cluster, largest first.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jaxtyping import Float  # noqa: E402
from torch import Tensor  # noqa: E402

from ne.compute.cluster import Clusters, cluster_neuron  # noqa: E402
from ne.compute.embed import cosine_distances  # noqa: E402
from ne.compute.sae import SAE  # noqa: E402
from ne.config import ClusterConfig  # noqa: E402
from ne.errors import ConfigError  # noqa: E402
from ne.mnist.data import N_PIXELS, MnistSplit, scale_pixels  # noqa: E402
from ne.mnist.model import MLP, hidden_acts  # noqa: E402


def _check(n_neurons: int, neuron: int, what: str) -> None:
    if not 0 <= neuron < n_neurons:
        raise ConfigError(f"neuron {neuron} does not exist: the {what} has neurons 0..{n_neurons - 1}")


@torch.no_grad()
def pre_activation(mlp: MLP, sae: SAE | None, neuron: int, x: Float[Tensor, "n 784"]) -> Float[Tensor, " n"]:
    if sae is None:
        return x @ mlp.W1[neuron] + mlp.b1[neuron]
    return (mlp.hidden(x) - sae.b_dec) @ sae.W_enc[neuron] + sae.b_enc[neuron]


@torch.no_grad()
def activation_map(mlp: MLP, sae: SAE | None, neuron: int) -> Float[Tensor, " 784"]:
    """Per pixel, relu(pre-activation with that pixel white - pre-activation of the black image)."""
    black = scale_pixels(torch.zeros(1, N_PIXELS, dtype=torch.uint8))
    single = scale_pixels((torch.eye(N_PIXELS) * 255).to(torch.uint8))
    return torch.relu(pre_activation(mlp, sae, neuron, single) - pre_activation(mlp, sae, neuron, black))


@torch.no_grad()
def dataset_examples(
    mlp: MLP, sae: SAE | None, neuron: int, split: MnistSplit, max_examples: int = 100
) -> tuple[np.ndarray, Float[Tensor, "k d"], Float[Tensor, " d"]]:
    """Indices of the first activating examples, their pre-layer embeddings h and the neuron's w_j."""
    x = scale_pixels(split.images)
    if sae is None:
        h, w, act = x, mlp.W1[neuron], torch.relu(pre_activation(mlp, None, neuron, x))
    else:
        a = hidden_acts(mlp, split.images)
        h, w, act = a - sae.b_dec, sae.W_enc[neuron], sae.encode(a)[:, neuron]
    idx = np.flatnonzero((act > 0).numpy())[:max_examples]
    return idx, h[idx], w


def importance_map(split: MnistSplit, idx: np.ndarray, amap: Float[Tensor, " 784"]) -> Float[Tensor, " 784"]:
    """The mean of the examples `idx` (pixels in [0, 1]) scaled by the activation map normalised to [0, 1]."""
    mean_img = split.images[idx].float().mean(0) / 255.0 if len(idx) else torch.zeros(N_PIXELS)
    return mean_img * amap / amap.max().clamp_min(1e-12)


def feature_clusters(h: Float[Tensor, "k d"], w: Float[Tensor, " d"], cfg: ClusterConfig) -> Clusters:
    dist = cosine_distances(h[None].detach(), w[None].detach(), device="cpu")[0].numpy()
    return cluster_neuron(dist, cfg)


def figure5(
    mlp: MLP,
    sae: SAE | None,
    neuron: int,
    split: MnistSplit,
    cluster_cfg: ClusterConfig | None = None,
    max_examples: int = 100,
    per_cluster: int = 8,
    max_clusters: int = 6,
    title: str = "",
) -> bytes:
    """The PNG of one neuron's Figure 5 panels and feature clusters."""
    _check(mlp.hidden_size if sae is None else sae.n_neurons, neuron, "MLP hidden layer" if sae is None else "SAE")
    cluster_cfg = cluster_cfg or ClusterConfig()
    amap = activation_map(mlp, sae, neuron)
    idx, h, w = dataset_examples(mlp, sae, neuron, split, max_examples)
    panels: list[tuple[str, np.ndarray, str]] = []
    if sae is None:
        weights = mlp.W1[neuron].detach().numpy()
        panels.append(("input weights", weights, "coolwarm"))
    panels.append(("activation map", amap.numpy(), "viridis"))
    if len(idx):
        panels.append(("importance map", importance_map(split, idx, amap).numpy(), "viridis"))
    clusters = feature_clusters(h, w, cluster_cfg) if len(idx) else None
    n_rows = 1 + (min(clusters.n_clusters, max_clusters) if clusters else 0)
    n_cols = max(per_cluster, len(panels))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, img, cmap) in zip(axes[0], panels):
        lim = np.abs(img).max() or 1.0
        ax.imshow(img.reshape(28, 28), cmap=cmap, vmin=-lim if cmap == "coolwarm" else 0, vmax=lim)
        ax.set_title(name, fontsize=8)
    if clusters is not None:
        for c in range(n_rows - 1):
            members = np.flatnonzero(clusters.labels == c)
            for k, m in enumerate(members[:per_cluster]):
                ax = axes[c + 1, k]
                ax.imshow(split.images[idx[m]].reshape(28, 28).numpy(), cmap="gray")
                if k == 0:
                    ax.set_title(f"cluster {c}: {len(members)} examples", fontsize=7, loc="left")
    fig.suptitle(title or f"{'MLP' if sae is None else 'SAE'} neuron {neuron}: {len(idx)} examples", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
