"""The paper's Tables 2 and 3 for SAEs on the MNIST MLP's hidden layer.

Table 2 (test set): MSE of the reconstruction (mean over examples and dimensions); L1 = Σ_j |f_j| per
example, also ×128 and as the paper computed it (`l1_paper`: the mean over test batches of 128, in file
order, of the batch's Σ|f|; the last batch holds 16 examples, which is why it is 1.1% below ×128);
L0 = % of SAE neurons active per example; accuracy loss = drop in test accuracy, in points, when the hidden
layer is replaced by its reconstruction.
Table 3: for each SAE neuron, the first `max_examples` test examples (file order) with nonzero activation;
max and mean pairwise cosine distance of their neuron embeddings, median over neurons with at least two;
size = median over live neurons (≥ 1 activating test example) of the number of activating test examples;
dead = % of neurons whose maximum activation over the training set rounds to 0.00.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ne.compute.embed import cosine_distances, pad_rows
from ne.compute.sae import SAE
from ne.errors import DataError
from ne.mnist.config import SAEEvalConfig
from ne.mnist.data import MnistSplit
from ne.mnist.model import MLP, accuracy, hidden_acts, load_sae
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

NEURON_CHUNK = 128
DEFAULT_EVAL = SAEEvalConfig()


@dataclass
class SAEMetrics:
    mse: float
    """Table 2: mean squared reconstruction error per hidden unit."""
    l1: float
    """Σ_j |f_j| per test example, averaged."""
    l1_x128: float
    """l1 × 128: a batch of 128's Σ|f|."""
    l1_paper: float
    """The paper's L1: mean over test batches of 128 of each batch's Σ|f|."""
    l0_pct: float
    """% of SAE neurons active per test example."""
    acc: float
    """Test accuracy (%) of the MLP alone."""
    acc_sae: float
    """Test accuracy (%) with the hidden layer replaced by the SAE's reconstruction."""
    acc_loss: float
    """acc - acc_sae, in points."""
    max_dist: float
    """Table 3: median over neurons of the max pairwise cosine distance of their neuron embeddings."""
    mean_dist: float
    """Median over neurons of the mean pairwise cosine distance."""
    size: float
    """Median over live neurons of the number of test examples that activate them."""
    dead_pct: float
    """% of neurons whose maximum activation over the training set rounds to 0.00."""
    n_dist: int
    """Neurons with at least two activating test examples (those in the distance medians)."""


# Tables 2 and 3 of the paper, standard SAE and NE-loss SAE.
PAPER = {
    "standard": {
        "mse": 0.33,
        "l1_paper": 2600,
        "l0_pct": 2.4,
        "acc_loss": 1.5,
        "max_dist": 0.45,
        "mean_dist": 0.21,
        "size": 7,
        "dead_pct": 23.8,
    },
    "ne_loss": {
        "mse": 0.55,
        "l1_paper": 3300,
        "l0_pct": 9.1,
        "acc_loss": 4.6,
        "max_dist": 0.28,
        "mean_dist": 0.08,
        "size": 32,
        "dead_pct": 3.7,
    },
}


@torch.no_grad()
def encode_all(sae: SAE, acts: Float[Tensor, "n d"], batch_size: int) -> Float[Tensor, "n m"]:
    return torch.cat([sae.encode(acts[i : i + batch_size]) for i in range(0, len(acts), batch_size)])


@torch.no_grad()
def max_activation(sae: SAE, mlp: MLP, split: MnistSplit, batch_size: int) -> Float[Tensor, " m"]:
    """Each SAE neuron's maximum activation over a split, streamed batch by batch."""
    top = torch.zeros(sae.n_neurons)
    for i in range(0, len(split), batch_size):
        f = sae.encode(hidden_acts(mlp, split.images[i : i + batch_size]))
        top = torch.maximum(top, f.max(0).values)
    return top


def first_active(f: Float[Tensor, "n m"], k: int) -> list[np.ndarray]:
    """Per neuron, the indices of the first k rows (file order) where it is active."""
    active = (f > 0).numpy()
    return [np.flatnonzero(active[:, j])[:k] for j in range(f.shape[1])]


@torch.no_grad()
def distance_stats(
    sae: SAE, acts: Float[Tensor, "n d"], index_lists: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, max and mean pairwise cosine distance of its examples' neuron embeddings (NaN with < 2)."""
    x = (acts - sae.b_dec).numpy()
    max_d = np.full(len(index_lists), np.nan)
    mean_d = np.full(len(index_lists), np.nan)
    for start in range(0, len(index_lists), NEURON_CHUNK):
        chunk = list(range(start, min(start + NEURON_CHUNK, len(index_lists))))
        h, counts = pad_rows(x, [index_lists[j] for j in chunk])
        dist = cosine_distances(h, sae.W_enc[chunk], device="cpu").numpy()
        for b, (j, n) in enumerate(zip(chunk, counts)):
            if n >= 2:
                pairs = dist[b, :n, :n][np.triu_indices(n, 1)]
                max_d[j], mean_d[j] = pairs.max(), pairs.mean()
    return max_d, mean_d


def evaluate(mlp: MLP, sae: SAE, train: MnistSplit, test: MnistSplit, cfg: SAEEvalConfig = DEFAULT_EVAL) -> SAEMetrics:
    if sae.W_enc.shape[1] != mlp.hidden_size:
        raise DataError(f"the SAE reads {sae.W_enc.shape[1]} units but the MLP's hidden layer has {mlp.hidden_size}")
    mlp.eval()
    sae.eval()
    with torch.no_grad():
        a = hidden_acts(mlp, test.images, cfg.batch_size)
        f = encode_all(sae, a, cfg.batch_size)
        a_hat = sae.decode(f)
        per_example_l1 = f.abs().sum(1)
        batch_l1 = [
            float(per_example_l1[i : i + cfg.paper_batch_size].sum()) for i in range(0, len(f), cfg.paper_batch_size)
        ]
        acc = accuracy(mlp, test, cfg.batch_size)
        acc_sae = float((mlp.head(a_hat).argmax(1) == test.labels).float().mean())
    max_d, mean_d = distance_stats(sae, a, first_active(f, cfg.max_examples))
    counts = (f > 0).sum(0).numpy()
    dead = max_activation(sae, mlp, train, cfg.batch_size).round(decimals=2) == 0
    return SAEMetrics(
        mse=float((a_hat - a).square().mean()),
        l1=float(per_example_l1.mean()),
        l1_x128=float(per_example_l1.mean()) * 128,
        l1_paper=float(np.mean(batch_l1)),
        l0_pct=float((f > 0).float().mean()) * 100,
        acc=acc * 100,
        acc_sae=acc_sae * 100,
        acc_loss=(acc - acc_sae) * 100,
        max_dist=_median(max_d),
        mean_dist=_median(mean_d),
        size=_median(counts[counts > 0].astype(float)),
        dead_pct=float(dead.float().mean()) * 100,
        n_dist=int(np.isfinite(max_d).sum()),
    )


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan


# --- tables ---------------------------------------------------------------------------------------------

COLUMNS = [f.name for f in fields(SAEMetrics)]
FORMATS = {
    "mse": "{:.3f}",
    "l1": "{:.2f}",
    "l1_x128": "{:.0f}",
    "l1_paper": "{:.0f}",
    "l0_pct": "{:.2f}",
    "acc": "{:.2f}",
    "acc_sae": "{:.2f}",
    "acc_loss": "{:.2f}",
    "max_dist": "{:.3f}",
    "mean_dist": "{:.3f}",
    "size": "{:.1f}",
    "dead_pct": "{:.2f}",
    "n_dist": "{:.0f}",
}


def summarise(runs: list[SAEMetrics]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of every metric over runs (e.g. seeds)."""
    values = np.array([[asdict(r)[c] for c in COLUMNS] for r in runs], dtype=float)
    std = values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(COLUMNS))
    return dict(zip(COLUMNS, values.mean(0))), dict(zip(COLUMNS, std))


def to_csv(rows: dict[str, dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sae", *COLUMNS])
    for name, row in rows.items():
        writer.writerow([name, *(row.get(c, "") for c in COLUMNS)])
    return buf.getvalue()


def to_markdown(rows: dict[str, dict[str, float]], stds: dict[str, dict[str, float]] | None = None) -> str:
    """One Markdown table; a row with an entry in `stds` shows mean ± std."""
    lines = ["| sae | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in COLUMNS:
            if c not in row or row[c] is None or (isinstance(row[c], float) and math.isnan(row[c])):
                cells.append("")
                continue
            text = FORMATS[c].format(row[c])
            if stds and name in stds:
                text += " ± " + FORMATS[c].format(stds[name][c])
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_dir(
    weights: str, train: MnistSplit, test: MnistSplit, cfg: SAEEvalConfig = DEFAULT_EVAL
) -> dict[str, SAEMetrics]:
    """Evaluate every `sae_*.safetensors` next to `mlp.safetensors` in a directory (ours or the authors')."""
    folder = RunDir(weights)
    names = sorted(
        (n for n in folder.ls(suffix=".safetensors") if n.startswith("sae_")),
        key=lambda n: (n != "sae_standard.safetensors", n),
    )  # the baseline first
    if not folder.exists("mlp.safetensors") or not names:
        raise DataError(
            f"{weights!r} must hold mlp.safetensors and at least one sae_*.safetensors (the authors' layout); "
            f"found {folder.ls(suffix='.safetensors') or 'none'}"
        )
    mlp = MLP.load(f"{weights.rstrip('/')}/mlp.safetensors")
    return {
        n.removeprefix("sae_").removesuffix(".safetensors"): evaluate(
            mlp, load_sae(f"{weights.rstrip('/')}/{n}", mlp.hidden_size), train, test, cfg
        )
        for n in names
    }


def write_tables(
    out: RunDir, rows: dict[str, dict[str, float]], stds: dict | None = None, stem: str = "sae_eval"
) -> str:
    """Write `stem`.md and `stem`.csv (atomically); returns the Markdown."""
    md = to_markdown(rows, stds)
    out.write_bytes(f"{stem}.md", md.encode())
    out.write_bytes(f"{stem}.csv", to_csv(rows).encode())
    return md


def with_paper(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The rows followed by the paper's, labelled `paper <name>`."""
    return {**rows, **{f"paper {k}": v for k, v in PAPER.items()}}
