"""The sparse autoencoder and the neuron-embedding loss (the paper's eqs. 4-6).

SAE neuron j's neuron embedding on input a is e_j = (a - b_dec) ⊙ W_enc[j]: summing it and adding b_enc
gives the neuron's pre-activation, exactly as h ⊙ w_j does for an MLP neuron. The loss never builds the
[n, m, d] tensor of embeddings: every quantity it needs is a matrix product,
  e_j · v_j   = (a - b_dec) @ (W_enc ⊙ v)ᵀ            |e_j|² = (a - b_dec)² @ (W_enc²)ᵀ
  Σ_i f_ij e_ij = (fᵀ @ (a - b_dec)) ⊙ W_enc,
which keeps a training step a few small matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ne.checks import at_least, check_choices, positive
from ne.errors import ConfigError, DataError
from ne.parallel import SINGLE, Shard, epoch_batches
from ne.store import read_tensors

EPS = 1e-12


@dataclass
class SAEConfig:
    expansion: int = 8
    """SAE width as a multiple of the MLP's hidden width (the paper: 8, so 512 neurons)."""
    epochs: int = 1
    """Training epochs over the training set (the paper: 1)."""
    batch_size: int = 128
    """Global batch size, split evenly between the Ray workers."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """`adam` or `sgd`."""
    lr: float = 1e-3
    """Learning rate."""
    l1_coeff: float = 1e-3
    """λ1: weight of the L1 term, the mean over the batch of Σ_j |f_j|."""
    ne_coeff: float = 1.0
    """λ2: weight of the neuron-embedding loss L_N (used by the `ne_loss` SAE only)."""
    ne_momentum: float = 0.9
    """m of eq. 6: weight of the running average embedding against the batch's (the paper: 0.9)."""
    ne_examples: Literal["active", "all"] = "active"
    """Which (example, neuron) pairs L_N averages over: `active` (f > 0: the definition of the issue and,
    as we read it, the paper) or `all` (every example of the batch, active or not). `all` pulls inactive
    examples towards each neuron's feature, so neurons fire more; see the report for its measured effects."""
    ne_start_step: int = 200
    """Optimiser step at which L_N is switched on (the paper: 200). The running averages are tracked from
    step 0, so they are warm when L_N starts."""

    def __post_init__(self):
        at_least("sae.expansion", self.expansion, 1)
        at_least("sae.epochs", self.epochs, 1)
        at_least("sae.batch_size", self.batch_size, 1)
        check_choices(self, "sae")
        positive("sae.lr", self.lr)
        if self.l1_coeff < 0 or self.ne_coeff < 0:
            raise ConfigError(f"sae.l1_coeff ({self.l1_coeff}) and sae.ne_coeff ({self.ne_coeff}) must be >= 0")
        if not 0.0 <= self.ne_momentum < 1.0:
            raise ConfigError(f"sae.ne_momentum is {self.ne_momentum}; it must lie in [0, 1), e.g. 0.9")
        at_least("sae.ne_start_step", self.ne_start_step, 0)




class SAE(nn.Module):
    """f = relu(W_enc (a - b_dec) + b_enc), â = W_dec f + b_dec; tensor names as in the authors' files."""

    def __init__(self, d_in: int = 64, n_neurons: int = 512, generator: torch.Generator | None = None):
        super().__init__()
        # nn.Linear's initialisation for both maps, as the authors' weights suggest (their decoder columns
        # are not unit-normalised and encoder and decoder are not tied).
        enc, dec = d_in**-0.5, n_neurons**-0.5
        self.W_enc = nn.Parameter((torch.rand(n_neurons, d_in, generator=generator) * 2 - 1) * enc)
        self.b_enc = nn.Parameter((torch.rand(n_neurons, generator=generator) * 2 - 1) * enc)
        self.W_dec = nn.Parameter((torch.rand(d_in, n_neurons, generator=generator) * 2 - 1) * dec)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def n_neurons(self) -> int:
        return self.W_enc.shape[0]

    def encode(self, a: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        return F.relu((a - self.b_dec) @ self.W_enc.T + self.b_enc)

    def decode(self, f: Float[Tensor, "n m"]) -> Float[Tensor, "n d"]:
        return f @ self.W_dec.T + self.b_dec

    def forward(self, a: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n m"], Float[Tensor, "n d"]]:
        f = self.encode(a)
        return f, self.decode(f)

    def embeddings(self, a: Float[Tensor, "n d"], neuron: int) -> Float[Tensor, "n d"]:
        """Neuron `neuron`'s neuron embeddings (a - b_dec) ⊙ W_enc[neuron] of the inputs a."""
        return (a - self.b_dec) * self.W_enc[neuron]

    @classmethod
    def load(cls, path: str, d_in: int | None = None) -> SAE:
        """Read an SAE in the authors' format; `d_in`, when given, must match (the MLP's hidden width)."""
        t = read_tensors(path, {"W_enc": (None, d_in), "b_enc": (None,), "W_dec": (d_in, None), "b_dec": (d_in,)})
        m, d = t["W_enc"].shape
        if t["b_enc"].shape != (m,) or t["W_dec"].shape != (d, m) or t["b_dec"].shape != (d,):
            raise DataError(
                f"{path!r}: W_enc {list(t['W_enc'].shape)}, b_enc {list(t['b_enc'].shape)}, "
                f"W_dec {list(t['W_dec'].shape)} and b_dec {list(t['b_dec'].shape)} disagree; expected "
                f"[m, d], [m], [d, m], [d]"
            )
        sae = cls(d, m)
        sae.load_state_dict(t)
        return sae


class NeuronEmbeddingLoss(nn.Module):
    """L_N: mean cosine distance between each active (example, neuron) embedding and the neuron's running
    average embedding, which is detached and updated with momentum m by the batch's activation-weighted
    mean embedding (eq. 6). A neuron's average starts as its first batch mean; inactive neurons keep theirs.
    """

    def __init__(self, n_neurons: int, d_in: int, momentum: float = 0.9, only_active: bool = True):
        super().__init__()
        self.momentum = momentum
        self.only_active = only_active
        self.register_buffer("avg", torch.zeros(n_neurons, d_in))
        self.register_buffer("seen", torch.zeros(n_neurons, dtype=torch.bool))

    @torch.no_grad()
    def update(self, sae: SAE, a: Float[Tensor, "n d"], f: Float[Tensor, "n m"], shard: Shard = SINGLE) -> None:
        """Fold this global batch's activation-weighted mean embeddings into the running averages."""
        weighted = (f.T @ (a - sae.b_dec)) * sae.W_enc  # Σ_i f_ij e_ij
        weight = f.sum(0)
        packed = shard.sum(torch.cat([weighted, weight[:, None]], dim=1))
        weighted, weight = packed[:, :-1], packed[:, -1]
        active = weight > 0
        batch_mean = weighted[active] / weight[active, None]
        m = self.momentum
        old = self.avg[active]
        self.avg[active] = torch.where(self.seen[active, None], m * old + (1 - m) * batch_mean, batch_mean)
        self.seen |= active

    def distances(self, sae: SAE, a: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        """1 - cos(e_ij, avg_j) for every example and neuron (differentiable in the SAE's parameters)."""
        x = a - sae.b_dec
        dot = x @ (sae.W_enc * self.avg).T
        norm_e = (x.square() @ sae.W_enc.square().T).clamp_min(EPS).sqrt()
        norm_avg = self.avg.norm(dim=1).clamp_min(EPS)
        return 1.0 - dot / (norm_e * norm_avg).clamp_min(EPS)

    def forward(
        self, sae: SAE, a: Float[Tensor, "n d"], f: Float[Tensor, "n m"], shard: Shard = SINGLE
    ) -> Tensor:
        """This worker's share of L_N over the global batch (its sum over local active pairs / global count)."""
        pairs = (f > 0) if self.only_active else torch.ones_like(f, dtype=torch.bool)
        active: Bool[Tensor, "n m"] = pairs & self.seen
        count = shard.sum(active.sum().to(torch.float32).reshape(1))[0]
        if count == 0:
            return a.new_zeros(())
        return (self.distances(sae, a) * active).sum() / count


def train_sae_epoch(
    sae: SAE,
    opt: torch.optim.Optimizer,
    acts: Float[Tensor, "N d"],
    cfg: SAEConfig,
    seed: int,
    epoch: int,
    step: int,
    ne_loss: NeuronEmbeddingLoss | None = None,
    shard: Shard = SINGLE,
) -> tuple[int, dict[str, float]]:
    """One epoch over the hidden activations; returns the next global step and epoch-mean loss terms.

    Each worker's loss is its share of the global batch's loss and gradients are summed over workers, so
    the update does not depend on the number of workers. With `ne_loss`, the running averages are updated
    every step and L_N joins the loss from step `cfg.ne_start_step` on.
    """
    sums = acts.new_zeros(3)  # mse, l1, l_n; on the device, as NCCL reduces only GPU tensors
    d = acts.shape[1]
    for batch in epoch_batches(len(acts), cfg.batch_size, seed, epoch):
        a = acts[shard.rows(batch)]
        f, a_hat = sae(a)
        mse = (a_hat - a).square().sum() / (len(batch) * d)
        l1 = f.abs().sum() / len(batch)
        loss = mse + cfg.l1_coeff * l1
        l_n = acts.new_zeros(())
        if ne_loss is not None:
            ne_loss.update(sae, a, f.detach(), shard)
            if step >= cfg.ne_start_step:
                l_n = ne_loss(sae, a, f, shard)
                loss = loss + cfg.ne_coeff * l_n
        opt.zero_grad(set_to_none=False)
        loss.backward()
        shard.sum_grads(sae)
        opt.step()
        step += 1
        sums += torch.stack([mse.detach(), l1.detach(), l_n.detach()])
    sums = shard.sum(sums)
    n_batches = -(-len(acts) // cfg.batch_size)
    return step, {k: float(v / n_batches) for k, v in zip(("mse", "l1", "l_n"), sums)}
