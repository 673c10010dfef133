"""Settings of a language-model SAE: how it is trained (`sae.train`), on how many workers (`sae.trainer`), how it
is evaluated (`sae.eval`) and which SAEs a comparison trains side by side (`sae.compare`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ne.checks import at_least, check_choices, positive
from ne.errors import ConfigError


@dataclass
class LMSAEConfig:
    architecture: Literal["standard", "topk", "jumprelu"] = "standard"
    """`standard`: f = ReLU(pre), sparse through λ1·Σ|f| (the paper's). `topk`: the k largest pre-activations
    of each token, ReLU'd (L0 = k by construction, so SAEs compare at matched L0). `jumprelu`: f = pre where
    pre > θ_j (a learnt threshold per latent), sparse through λ0·L0 with straight-through gradients (Gemma
    Scope's). All three are saved as the SAELens architecture of the same name."""
    expansion: int = 4
    """Latents as a multiple of the hook's width (d_in)."""
    k: int = 32
    """`topk` only: latents active per token."""
    l1_coeff: float = 0.003
    """λ1 (`standard`): weight of the mean over tokens of Σ_j |f_j| (decoder columns have norm 1)."""
    l0_coeff: float = 0.003
    """λ0 (`jumprelu`): weight of the mean over tokens of the number of active latents."""
    jumprelu_bandwidth: float = 0.05
    """`jumprelu`: width of the rectangle kernel of the threshold's straight-through gradient."""
    lr: float = 1e-3
    """Adam's learning rate (default betas, no weight decay)."""
    batch_size: int = 1024
    """Tokens per optimiser step (the global batch, split between the workers)."""
    train_tokens: int | None = None
    """Tokens to train on, one pass, in steps of batch_size. None: the whole training stream (the corpus less
    the held-out contexts of `sae.eval.holdout_every`). More than the stream holds is an error."""
    buffer_tokens: int = 32_768
    """Rows (tokens) the shuffling buffer holds: the stream's activations are mixed within it, and it bounds
    the trainer's memory (buffer_tokens × d_in floats per worker at most). At least batch_size."""
    contexts_per_batch: int = 16
    """Contexts per forward pass of the model while streaming activations (memory only)."""
    loss: Literal["none", "ne"] = "none"
    """`ne` adds λ2·L_N, the paper's neuron-embedding loss (`ne.compute.sae.NeuronEmbeddingLoss`): for latent j and
    token x its neuron embedding is (x - b_dec) ⊙ W_enc[j], whose sum plus b_enc[j] is the pre-activation;
    L_N is the mean cosine distance of the active (token, latent) pairs' embeddings to each latent's running
    average embedding (activation-weighted, momentum `ne_momentum`). `none`: the plain SAE."""
    ne_coeff: float = 1.0
    """λ2: weight of L_N."""
    ne_momentum: float = 0.9
    """m of the paper's eq. 6: weight of the running average embedding against the batch's."""
    ne_start: float = 0.4
    """Fraction of the training steps taken before L_N switches on (the paper: 200 of ~470 steps, 0.43); the
    running averages are tracked from the first step, so they are warm when it does."""

    def __post_init__(self):
        check_choices(self, "sae.train")
        at_least("sae.train.expansion", self.expansion, 1, "an SAE has at least as many latents as its input")
        at_least("sae.train.k", self.k, 1, "a TopK SAE keeps at least one latent per token")
        at_least("sae.train.batch_size", self.batch_size, 1)
        at_least("sae.train.contexts_per_batch", self.contexts_per_batch, 1)
        for key in ("lr", "jumprelu_bandwidth"):
            positive(f"sae.train.{key}", getattr(self, key))
        for key in ("l1_coeff", "l0_coeff", "ne_coeff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sae.train.{key} is {getattr(self, key)}; it must be >= 0")
        if self.train_tokens is not None:
            at_least(
                "sae.train.train_tokens",
                self.train_tokens,
                self.batch_size,
                "at least one batch of sae.train.batch_size",
            )
        if self.buffer_tokens < self.batch_size:
            raise ConfigError(
                f"sae.train.buffer_tokens ({self.buffer_tokens:,}) is smaller than sae.train.batch_size "
                f"({self.batch_size:,}): the buffer must hold a whole batch, better several to mix "
                "them; raise buffer_tokens or lower batch_size"
            )
        if not 0.0 <= self.ne_momentum < 1.0:
            raise ConfigError(f"sae.train.ne_momentum is {self.ne_momentum}; it must lie in [0, 1), e.g. 0.9")
        if not 0.0 <= self.ne_start < 1.0:
            raise ConfigError(
                f"sae.train.ne_start is {self.ne_start}; it is a fraction of the steps in [0, 1), e.g. 0.4"
            )

    def unused(self) -> tuple[str, ...]:
        """Keys (as `settings_of` prefixes to drop) that do not change this SAE: another architecture's
        coefficients, the NE loss's without it, and how many contexts go through the model at once."""
        out = ["-sae.train.contexts_per_batch"]
        out += [] if self.architecture == "standard" else ["-sae.train.l1_coeff"]
        out += [] if self.architecture == "topk" else ["-sae.train.k"]
        out += [] if self.architecture == "jumprelu" else ["-sae.train.l0_coeff", "-sae.train.jumprelu_bandwidth"]
        out += [] if self.loss == "ne" else ["-sae.train.ne_"]
        return tuple(out)

    def check_width(self, d_in: int, hook: str) -> None:
        """Settings that make sense only against the hook's width."""
        if self.architecture == "topk" and self.k > self.expansion * d_in:
            raise ConfigError(
                f"sae.train.k is {self.k} but the SAE has only {self.expansion * d_in} latents "
                f"(expansion {self.expansion} × {d_in}, the width of {hook}); lower k or raise expansion"
            )


@dataclass
class SAETrainerConfig:
    num_workers: int = 1
    """Ray Train workers, data parallel: each streams its share of the contexts and takes its rows of every
    global batch; gradients are summed, so any number of workers follows one trajectory up to float rounding.
    0 trains in this process, without Ray (tests, debugging)."""
    use_gpu: bool | None = None
    """One GPU per worker: None (the default) when the Ray cluster has GPUs, or true / false."""
    checkpoint_every: int = 100
    """Optimiser steps between checkpoints (each costs a Ray report, about 2 s on CPU); an interrupted job
    resumes from the last one."""
    max_failures: int = 1
    """Worker-group failures Ray Train recovers from within one job, each time from the last checkpoint."""

    def __post_init__(self):
        at_least("sae.trainer.num_workers", self.num_workers, 0)
        at_least("sae.trainer.checkpoint_every", self.checkpoint_every, 1)
        at_least("sae.trainer.max_failures", self.max_failures, 0)


@dataclass
class LMSAEEvalConfig:
    holdout_every: int = 10
    """Every holdout_every-th context of the corpus (ctx_id % n == n - 1) is kept out of training and used by
    the evaluation. 0: none held out (the evaluation then reads training contexts)."""
    tokens: int = 16_384
    """Held-out tokens the evaluation reads (fewer when fewer are held out)."""
    dense_threshold: float = 0.1
    """A latent is dense when it fires on more than this fraction of the evaluation's tokens."""

    def __post_init__(self):
        at_least("sae.eval.holdout_every", self.holdout_every, 0)
        if self.holdout_every == 1:
            raise ConfigError(
                "sae.eval.holdout_every is 1, which holds out every context and leaves none to train "
                "on; use 0 (none held out) or at least 2, e.g. 10"
            )
        at_least("sae.eval.tokens", self.tokens, 1)
        if not 0.0 < self.dense_threshold <= 1.0:
            raise ConfigError(f"sae.eval.dense_threshold is {self.dense_threshold}; it must lie in (0, 1], e.g. 0.1")


@dataclass
class SAECompareConfig:
    seeds: list[int] = field(default_factory=list)
    """Seeds of the comparison: for each, the SAE of `sae.train` (with loss none) and one NE-loss SAE per
    `ne_coeffs` entry, trained from the same initialisation on the same batches. Empty: no comparison."""
    ne_coeffs: list[float] = field(default_factory=list)
    """λ2 of each NE-loss SAE (one value: standard against NE loss; several: a sweep of the coefficient)."""

    def __post_init__(self):
        for s in self.seeds:
            at_least("sae.compare.seeds", s, 0, "seeds are non-negative integers")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sae.compare.seeds lists a seed twice ({self.seeds}); list each once")
        for c in self.ne_coeffs:
            positive("sae.compare.ne_coeffs", c)
        if self.seeds and not self.ne_coeffs:
            raise ConfigError(
                "sae.compare.seeds is set but sae.compare.ne_coeffs is empty; give at least one λ2 "
                "for the NE-loss SAEs, e.g. [1.0]"
            )

    @property
    def active(self) -> bool:
        return bool(self.seeds)
