"""The paper's 784-64-10 ReLU MLP on MNIST, its training epoch, and its activations.

Weights are read and written as safetensors with the authors' tensor names (`W1`, `b1`, `W2`, `b2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor, nn

from ne.compute.parallel import SINGLE, Shard, build_optimizer, epoch_batches
from ne.compute.sae import SAE
from ne.errors import DataError
from ne.mnist.config import MLPConfig
from ne.mnist.data import N_CLASSES, N_PIXELS, MnistSplit, scale_pixels
from ne.rundir.store import read_tensors


class MLP(nn.Module):
    """logits = W2 · relu(W1 · x + b1) + b2 on normalised, flattened images."""

    def __init__(self, hidden: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        self.W1 = nn.Parameter(_uniform((hidden, N_PIXELS), N_PIXELS, generator))
        self.b1 = nn.Parameter(_uniform((hidden,), N_PIXELS, generator))
        self.W2 = nn.Parameter(_uniform((N_CLASSES, hidden), hidden, generator))
        self.b2 = nn.Parameter(_uniform((N_CLASSES,), hidden, generator))

    @property
    def hidden_size(self) -> int:
        return self.W1.shape[0]

    def hidden(self, x: Float[Tensor, "n 784"]) -> Float[Tensor, "n hidden"]:
        return F.relu(x @ self.W1.T + self.b1)

    def head(self, a: Float[Tensor, "n hidden"]) -> Float[Tensor, "n 10"]:
        return a @ self.W2.T + self.b2

    def forward(self, x: Float[Tensor, "n 784"]) -> Float[Tensor, "n 10"]:
        return self.head(self.hidden(x))

    @classmethod
    def load(cls, path: str) -> MLP:
        t = read_tensors(path, {"W1": (None, N_PIXELS), "b1": (None,), "W2": (N_CLASSES, None), "b2": (N_CLASSES,)})
        hidden = t["W1"].shape[0]
        if t["b1"].shape[0] != hidden or t["W2"].shape[1] != hidden:
            raise DataError(
                f"{path!r}: W1 {list(t['W1'].shape)}, b1 {list(t['b1'].shape)} and W2 {list(t['W2'].shape)} "
                "disagree on the hidden width"
            )
        model = cls(hidden)
        model.load_state_dict(t)
        return model


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> Tensor:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a given generator."""
    bound = fan_in**-0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def mlp_optimizer(model: MLP, cfg: MLPConfig) -> torch.optim.Optimizer:
    return build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)


def train_mlp_epoch(
    model: MLP,
    opt: torch.optim.Optimizer,
    train: MnistSplit,
    cfg: MLPConfig,
    seed: int,
    epoch: int,
    shard: Shard = SINGLE,
) -> float:
    """One epoch of cross-entropy training on this worker's slices; returns the mean training loss."""
    total = torch.zeros(1, device=train.images.device)  # on the device: NCCL reduces only GPU tensors
    for batch in epoch_batches(len(train), cfg.batch_size, seed, epoch):
        rows = shard.rows(batch)
        logits = model(scale_pixels(train.images[rows]))
        loss = F.cross_entropy(logits, train.labels[rows], reduction="sum") / len(batch)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        shard.sum_grads(model)
        opt.step()
        total += loss.detach() * len(batch)
    return float(shard.sum(total)[0] / len(train))


@torch.no_grad()
def hidden_acts(model: MLP, images: UInt8[Tensor, "n 784"], batch_size: int = 4096) -> Float[Tensor, "n hidden"]:
    rows = range(0, len(images), batch_size)
    return torch.cat([model.hidden(scale_pixels(images[i : i + batch_size])) for i in rows])


@torch.no_grad()
def accuracy(model: MLP, split: MnistSplit, batch_size: int = 4096) -> float:
    correct = sum(
        int((model(scale_pixels(split.images[i : i + batch_size])).argmax(1) == split.labels[i : i + batch_size]).sum())
        for i in range(0, len(split), batch_size)
    )
    return correct / len(split)


def load_sae(path: str, d_in: int | None = None) -> SAE:
    """Read an SAE in the authors' format; `d_in`, when given, must match (the MLP's hidden width)."""
    t = read_tensors(path, {"W_enc": (None, d_in), "b_enc": (None,), "W_dec": (d_in, None), "b_dec": (d_in,)})
    m, d = t["W_enc"].shape
    if t["b_enc"].shape != (m,) or t["W_dec"].shape != (d, m) or t["b_dec"].shape != (d,):
        raise DataError(
            f"{path!r}: W_enc {list(t['W_enc'].shape)}, b_enc {list(t['b_enc'].shape)}, "
            f"W_dec {list(t['W_dec'].shape)} and b_dec {list(t['b_dec'].shape)} disagree; expected "
            f"[m, d], [m], [d, m], [d]"
        )
    sae = SAE(d, m)
    sae.load_state_dict(t)
    return sae
