"""The sparse autoencoder and the neuron-embedding loss (the paper's eqs. 4-6).

SAE neuron j's neuron embedding on input a is e_j = (a - b_dec) ⊙ W_enc[j]: summing it and adding b_enc
gives the neuron's pre-activation, exactly as h ⊙ w_j does for an MLP neuron. The loss never builds the
[n, m, d] tensor of embeddings: every quantity it needs is a matrix product,
  e_j · v_j   = (a - b_dec) @ (W_enc ⊙ v)ᵀ            |e_j|² = (a - b_dec)² @ (W_enc²)ᵀ
  Σ_i f_ij e_ij = (fᵀ @ (a - b_dec)) ⊙ W_enc      (Σ_i f_ij e_ij / |e_ij|: the same with f / |e|),
which keeps a training step a few small matmuls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ne.checks import at_least, check_choices, positive
from ne.compute.parallel import SINGLE, Shard, build_optimizer, epoch_batches
from ne.errors import ConfigError

log = logging.getLogger(__name__)

EPS = 1e-12


@dataclass
class SAEConfig:
    expansion: int = 8
    """SAE width as a multiple of the MLP's hidden width (the paper: 8, so 512 neurons)."""
    epochs: int = 1
    """Training epochs over the training set (the paper: 1)."""
    batch_size: int = 128
    """Global batch size, split evenly between the Ray workers."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """`adam` (torch.optim.Adam, default betas: what the authors' weights show), `adamw` (the same with
    decoupled weight decay) or `sgd`."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.01
    """L2 weight decay on every SAE parameter, biases included: added to the gradient (torch's
    `weight_decay`) for `adam` and `sgd`, decoupled for `adamw`. The authors' neurons that never fire have
    weights ~1/150 of their initial size, which only a decay of every parameter explains; Adam with 0.01
    reproduces their sizes to within a few per cent (README, `benchmarks/train.py --evidence`)."""
    l1_coeff: float = 0.02
    """λ1: weight of the L1 term, the mean over the batch of Σ_j |f_j| (× ‖W_dec[:, j]‖ with
    `l1_weighting: decoder_norm`). 0.02 gives the paper's L1, L0 and accuracy loss for the standard SAE."""
    l1_weighting: Literal["plain", "decoder_norm"] = "plain"
    """`plain`: Σ_j |f_j|, the paper's eq. 5. `decoder_norm`: Σ_j |f_j| ‖W_dec[:, j]‖ (Anthropic's April 2024
    update), which makes the penalty invariant to trading activation size for decoder size."""
    decoder_norm: Literal["free", "unit"] = "free"
    """`free`: decoder columns keep any norm (the authors' median column norm is 0.09). `unit`: columns are
    rescaled to norm 1 at initialisation and after every optimiser step."""
    b_dec_init: Literal["zeros", "mean"] = "zeros"
    """`zeros`, or `mean`: the mean of the training activations (the authors' b_dec is not: its norm is
    0.64 against the mean's 14.6)."""
    w_dec_init: Literal["independent", "transpose"] = "independent"
    """`independent`: W_dec drawn like nn.Linear's weight, apart from W_enc (the authors' code: two
    nn.Linear layers). `transpose`: W_dec = W_encᵀ at initialisation."""
    ne_coeff: float = 60.0
    """λ2: weight of the neuron-embedding loss L_N (used by the `ne_loss` SAE only). 60 puts each of the
    paper's eight effects within a factor 1.4 of the paper's change (5 seeds; 40 and 80: 1.6 and 1.9)."""
    ne_momentum: float = 0.9
    """m of eq. 6: weight of the running average embedding against the batch's (the paper: 0.9)."""
    ne_examples: Literal["active", "all"] = "active"
    """Which (example, neuron) pairs L_N averages over: `active` (f > 0) or `all` (every example of the
    batch, active or not). `all` pulls inactive examples towards each neuron's feature: neurons fire on
    hundreds of examples, distances collapse and MSE barely moves (see the README)."""
    ne_aggregate: Literal["pairs", "neurons"] = "pairs"
    """`pairs`: the mean over every chosen (example, neuron) pair of the batch, so often-firing neurons
    weigh more. `neurons`: each neuron's mean distance, then the mean over neurons with a pair."""
    ne_average: Literal["activation", "unit"] = "activation"
    """What the batch adds to the running average h_avg (eq. 6): the activation-weighted mean of the
    neuron's embeddings (`activation`), or of their unit vectors (`unit`: h_avg normalised per example)."""
    ne_distance: Literal["cosine", "euclidean"] = "cosine"
    """Distance of an embedding to h_avg: `cosine` (1 - cos, the paper's eq. 3) or `euclidean` (squared
    distance of the raw vectors, which also penalises their length)."""
    ne_start_step: int = 200
    """Optimiser step at which L_N is switched on (the paper: 200). The running averages are tracked from
    step 0, so they are warm when L_N starts."""

    def __post_init__(self):
        at_least("sae.expansion", self.expansion, 1)
        at_least("sae.epochs", self.epochs, 1)
        at_least("sae.batch_size", self.batch_size, 1)
        check_choices(self, "sae")
        positive("sae.lr", self.lr)
        for key in ("l1_coeff", "ne_coeff", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sae.{key} is {getattr(self, key)}; it must be >= 0")
        if not 0.0 <= self.ne_momentum < 1.0:
            raise ConfigError(f"sae.ne_momentum is {self.ne_momentum}; it must lie in [0, 1), e.g. 0.9")
        at_least("sae.ne_start_step", self.ne_start_step, 0)


def sae_optimizer(sae: nn.Module, cfg: SAEConfig) -> torch.optim.Optimizer:
    return build_optimizer(cfg.optimizer, sae.parameters(), cfg.lr, cfg.weight_decay)


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


def build_sae(cfg: SAEConfig, acts: Float[Tensor, "N d"], generator: torch.Generator | None = None) -> SAE:
    """A new SAE for activations like `acts`, initialised as `cfg` says (on acts' device)."""
    d = acts.shape[1]
    sae = SAE(d, cfg.expansion * d, generator).to(acts.device)
    with torch.no_grad():
        if cfg.w_dec_init == "transpose":
            sae.W_dec.copy_(sae.W_enc.T)
        if cfg.b_dec_init == "mean":
            sae.b_dec.copy_(acts.mean(0))
    if cfg.decoder_norm == "unit":
        unit_decoder(sae)
    return sae


@torch.no_grad()
def unit_decoder(sae: SAE) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=0, keepdim=True).clamp_min(EPS))


class NeuronEmbeddingLoss(nn.Module):
    """L_N: the mean distance between each chosen (example, neuron) embedding and the neuron's running
    average embedding h_avg, which is detached and updated with momentum m by the batch's
    activation-weighted mean embedding (eq. 6). A neuron's average starts as its first batch mean; inactive
    neurons keep theirs. The keyword options are the readings of `SAEConfig.ne_*`.
    """

    avg: Float[Tensor, "m d"]
    seen: Bool[Tensor, " m"]

    def __init__(
        self,
        n_neurons: int,
        d_in: int,
        momentum: float = 0.9,
        examples: str = "active",
        aggregate: str = "pairs",
        average: str = "activation",
        distance: str = "cosine",
    ):
        super().__init__()
        self.momentum, self.examples, self.aggregate = momentum, examples, aggregate
        self.average, self.distance = average, distance
        self.register_buffer("avg", torch.zeros(n_neurons, d_in))
        self.register_buffer("seen", torch.zeros(n_neurons, dtype=torch.bool))

    @classmethod
    def from_config(cls, n_neurons: int, d_in: int, cfg: SAEConfig) -> NeuronEmbeddingLoss:
        return cls(n_neurons, d_in, cfg.ne_momentum, cfg.ne_examples, cfg.ne_aggregate, cfg.ne_average, cfg.ne_distance)

    @torch.no_grad()
    def update(self, sae: SAE, a: Float[Tensor, "n d"], f: Float[Tensor, "n m"], shard: Shard = SINGLE) -> None:
        """Fold this global batch's activation-weighted mean embeddings into the running averages."""
        x = a - sae.b_dec
        coeff = f if self.average == "activation" else f / embedding_norms(x, sae.W_enc)
        weighted = (coeff.T @ x) * sae.W_enc  # Σ_i f_ij e_ij (or Σ_i f_ij e_ij / |e_ij|)
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
        """Distance of e_ij to avg_j for every example and neuron (differentiable in the SAE's parameters)."""
        x = a - sae.b_dec
        dot = x @ (sae.W_enc * self.avg).T
        norm_e = embedding_norms(x, sae.W_enc)
        norm_avg = self.avg.norm(dim=1)
        if self.distance == "euclidean":
            return norm_e.square() - 2 * dot + norm_avg.square()
        return 1.0 - dot / (norm_e * norm_avg.clamp_min(EPS)).clamp_min(EPS)

    def forward(self, sae: SAE, a: Float[Tensor, "n d"], f: Float[Tensor, "n m"], shard: Shard = SINGLE) -> Tensor:
        """This worker's share of L_N over the global batch (local sums divided by global counts)."""
        chosen = (f > 0) if self.examples == "active" else torch.ones_like(f, dtype=torch.bool)
        pairs: Bool[Tensor, "n m"] = chosen & self.seen
        summed = (self.distances(sae, a) * pairs).sum(0)
        if self.aggregate == "pairs":
            count = shard.sum(pairs.sum().to(a.dtype).reshape(1))[0]
            return summed.sum() / count if count > 0 else a.new_zeros(())
        counts = shard.sum(pairs.sum(0).to(a.dtype))
        live = counts > 0
        if not live.any():
            return a.new_zeros(())
        return (summed[live] / counts[live]).sum() / live.sum()


def embedding_norms(x: Float[Tensor, "n d"], W_enc: Float[Tensor, "m d"]) -> Float[Tensor, "n m"]:
    """|e_ij| = |x_i ⊙ W_enc[j]|, kept away from 0 so that a zero embedding has a finite gradient."""
    return (x.square() @ W_enc.square().T).clamp_min(EPS).sqrt()


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
        size = f.abs() if cfg.l1_weighting == "plain" else f.abs() * sae.W_dec.norm(dim=0)
        l1 = size.sum() / len(batch)
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
        if cfg.decoder_norm == "unit":
            unit_decoder(sae)
        step += 1
        sums += torch.stack([mse.detach(), l1.detach(), l_n.detach()])
    sums = shard.sum(sums)
    n_batches = -(-len(acts) // cfg.batch_size)
    return step, {k: float(v / n_batches) for k, v in zip(("mse", "l1", "l_n"), sums)}


def fit_sae(acts: Float[Tensor, "N d"], cfg: SAEConfig, seed: int, with_ne: bool) -> tuple[SAE, dict[str, float]]:
    """An SAE trained in one process on `acts` for cfg.epochs (with the NE loss when `with_ne`); returns it and
    the last epoch's mean loss terms."""
    sae = build_sae(cfg, acts, torch.Generator().manual_seed(seed))
    opt = sae_optimizer(sae, cfg)
    ne_loss = NeuronEmbeddingLoss.from_config(sae.n_neurons, acts.shape[1], cfg) if with_ne else None
    step, losses = 0, dict[str, float]()
    for epoch in range(cfg.epochs):
        step, losses = train_sae_epoch(sae, opt, acts, cfg, seed, epoch, step, ne_loss)
        log.info("SAE epoch %d: %s", epoch, {k: round(v, 4) for k, v in losses.items()})
    return sae, losses
