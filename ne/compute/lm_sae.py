"""The language-model SAE: standard, TopK and JumpReLU encoders over one decoder, their sparsity losses, and the
SAELens files they are saved as.

All three encode pre = W_enc (x - b_dec) + b_enc and decode x̂ = W_dec f + b_dec, with the tensor layout of
`ne.compute.sae.SAE` (W_enc [m, d]), so the paper's neuron-embedding loss (`ne.compute.sae.NeuronEmbeddingLoss`)
applies to them unchanged: latent j's neuron embedding is (x - b_dec) ⊙ W_enc[j].

Training sees activations scaled by one factor s so that their mean norm is sqrt(d_in) (as SAELens's
`expected_average_only_in` does), which lets the coefficients carry over between models. The saved SAE has s
folded in (W_enc·s, b_dec/s, W_dec/s): it reads and writes raw activations, with the same latents and the same
neuron embeddings, since (x·s - b_dec) ⊙ W_enc[j] = (x - b_dec/s) ⊙ (s·W_enc[j]).
"""

from __future__ import annotations

import json

import safetensors.torch
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from ne.compute.sae import SAE, unit_decoder
from ne.lm_sae.config import LMSAEConfig

ENC_INIT = 0.1
"""Norm of W_enc's rows at initialisation (W_enc = 0.1 · W_decᵀ, as Anthropic's April 2024 update has it): the
first reconstructions are small rather than several times the input."""
THRESHOLD_INIT = 0.01
"""A JumpReLU latent's threshold at initialisation (SAELens's default), on the scaled activations."""


class _Step(torch.autograd.Function):
    """H(pre - θ) forward; backward, a rectangle kernel of width `bandwidth` gives θ its gradient (the
    straight-through estimator of Rajamanoharan et al. 2024). `pre` gets none: the L0 term moves thresholds."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return None, -(near * grad).sum(0) / ctx.bandwidth, None


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre - θ); the gradient reaches pre where the latent fires, and θ through the same kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return (pre > threshold).to(pre.dtype) * grad, -(threshold / ctx.bandwidth * near * grad).sum(0), None


class LMSAE(SAE):
    """`ne.compute.sae.SAE` with a choice of activation: `standard` (ReLU), `topk` or `jumprelu`."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        architecture: str = "standard",
        k: int = 32,
        bandwidth: float = 0.05,
        generator: torch.Generator | None = None,
    ):
        super().__init__(d_in, n_latents, generator)
        self.architecture, self.k, self.bandwidth = architecture, k, bandwidth
        threshold = torch.full((n_latents,), THRESHOLD_INIT) if architecture == "jumprelu" else None
        self.threshold = None if threshold is None else nn.Parameter(threshold)

    def pre_acts(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def activate(self, pre: Float[Tensor, "n m"]) -> Float[Tensor, "n m"]:
        if self.architecture == "topk":
            values, index = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        if self.architecture == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        return F.relu(pre)

    def encode(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        return self.activate(self.pre_acts(x))

    def sparsity(self, pre: Float[Tensor, "n m"], f: Float[Tensor, "n m"], n_global: int, cfg: LMSAEConfig) -> Tensor:
        """The sparsity term of this worker's rows, as its share of the global batch's mean over tokens: λ1·Σ|f|
        (`standard`), λ0·L0 (`jumprelu`) or nothing (`topk`: L0 is k)."""
        if self.architecture == "standard":
            return cfg.l1_coeff * f.abs().sum() / n_global
        if self.architecture == "jumprelu":
            return cfg.l0_coeff * _Step.apply(pre, self.threshold, self.bandwidth).sum() / n_global
        return pre.new_zeros(())

    @torch.no_grad()
    def constrain(self) -> None:
        """After every optimiser step: decoder columns back to norm 1, thresholds back to >= 0."""
        unit_decoder(self)
        if self.threshold is not None:
            self.threshold.clamp_(min=0.0)


@torch.no_grad()
def init_sae(cfg: LMSAEConfig, b_dec: Float[Tensor, " d"], generator: torch.Generator) -> LMSAE:
    """A new SAE: decoder columns random unit directions, W_enc = ENC_INIT · W_decᵀ, b_enc = 0, b_dec the
    activations' mean (`b_dec`, on the scaled activations)."""
    d = b_dec.shape[0]
    sae = LMSAE(d, cfg.expansion * d, cfg.architecture, cfg.k, cfg.jumprelu_bandwidth, generator)
    directions = torch.randn(d, sae.n_neurons, generator=generator)
    directions /= directions.norm(dim=0, keepdim=True)
    sae.W_dec.copy_(directions)
    sae.W_enc.copy_(ENC_INIT * directions.T)
    sae.b_enc.zero_()
    sae.b_dec.copy_(b_dec.cpu())
    return sae.to(b_dec.device)


def sae_from_state(cfg: LMSAEConfig, state: dict[str, Tensor]) -> LMSAE:
    """An SAE of `cfg`'s architecture holding the parameters of a state dict (as `LMSAE.state_dict()` gives)."""
    m, d = state["W_enc"].shape
    sae = LMSAE(d, m, cfg.architecture, cfg.k, cfg.jumprelu_bandwidth, torch.Generator())
    sae.load_state_dict(state)
    return sae


def folded_tensors(sae: LMSAE, scale: float) -> dict[str, Tensor]:
    """SAELens's tensors (W_enc [d, m], W_dec [m, d]) of `sae` with the activation scale folded in."""
    out = {
        "W_enc": (sae.W_enc.detach() * scale).T,
        "b_enc": sae.b_enc.detach(),
        "W_dec": (sae.W_dec.detach() / scale).T,
        "b_dec": sae.b_dec.detach() / scale,
    }
    if sae.threshold is not None:
        out["threshold"] = sae.threshold.detach()
    return {k: v.float().cpu().contiguous() for k, v in out.items()}


def saelens_files(
    sae: LMSAE, scale: float, hook: str, model_name: str, context_size: int, prepend_bos: bool, dataset: str
) -> dict[str, bytes]:
    """cfg.json and sae_weights.safetensors as SAELens 6 writes them, for `sae.SAE.load_from_disk`."""
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.W_enc.shape[1],
        "d_sae": sae.n_neurons,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # sae_lens_version marks the layout as SAELens 6's (older layouts are read through a converter).
        "metadata": {
            "sae_lens_version": "6.0.0",
            "model_name": model_name,
            "hook_name": hook,
            "hook_head_index": None,
            "prepend_bos": prepend_bos,
            "context_size": context_size,
            "dataset_path": dataset,
            "sae_lens_training_version": None,
        },
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return {
        "cfg.json": json.dumps(cfg, indent=2).encode(),
        "sae_weights.safetensors": safetensors.torch.save(folded_tensors(sae, scale)),
    }
