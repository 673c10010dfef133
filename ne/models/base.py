"""The one interface every back end implements: a model with MLP layers.

`h` is the pre-MLP embedding: exactly the input of the MLP's first linear map (after its LayerNorm, with
the LayerNorm's weight and bias folded into `W_in`/`b_in` where the back end can fold them), so that
`act == act_fn(h @ W_in + b_in)` holds for every back end.

A gated MLP (Llama, Mistral, Qwen, Gemma, OLMo) has two input maps: neuron j fires as
`act_fn(h·g_j + c_j) · (h·u_j + d_j)`. There `W_in`/`b_in` are the gate (g, c: the input of act_fn) and
`W_up`/`b_up` the up projection (u, d), each with the norm's weight folded in, and
`act == act_fn(h @ W_in + b_in) * (h @ W_up + b_up)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class LayerOutput:
    h: Float[Tensor, "batch pos d_model"]
    """Pre-MLP embedding: the input of W_in."""
    act: Float[Tensor, "batch pos d_mlp"]
    """Neuron activations: act_fn(h @ W_in + b_in), times (h @ W_up + b_up) for a gated MLP."""


class UnitModel(ABC):
    """A model's units (the neurons of its MLP layers, or the latents of an SAE over it), seen only through what
    neuron embeddings need: each layer's input weights, the embedding h they read, and the units' activations."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_ctx_max: int
    """Longest context the model accepts."""
    d_vocab: int
    """Token ids are 0..d_vocab - 1 (the rows of the token embedding)."""
    act_fn: Callable[[Tensor], Tensor]
    """The MLP's activation function, applied to the pre-activation h @ W_in + b_in."""
    bos_token_id: int | None
    """Token prepended to every context, or None when the model uses none."""
    pad_token_id: int
    """Token used to pad short contexts; padded positions are never key tokens."""
    device: torch.device
    is_causal: bool
    """True when a token sees only earlier tokens, so whatever follows a key token cannot change it."""
    gated: bool = False
    """True for a gated MLP: `W_in`/`b_in` are then its gate and `W_up`/`b_up` its up projection."""

    @abstractmethod
    def W_in(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        """Input weights of layer `layer`; column j is neuron j's w_j."""

    @abstractmethod
    def b_in(self, layer: int) -> Float[Tensor, " d_mlp"]:
        """Input biases of layer `layer`."""

    def W_up(self, layer: int) -> Float[Tensor, "d_model d_mlp"] | None:
        """Up-projection weights of a gated MLP (column j is u_j); None for a plain MLP."""
        return None

    def b_up(self, layer: int) -> Float[Tensor, " d_mlp"] | None:
        return None

    def manifest_entry(self) -> dict:
        """What a run records of its model (the manifest's `model`): readers need no model to know its shape."""
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def input_weights(self, layer: int) -> dict[str, Tensor]:
        """What `weights/layer=L.safetensors` keeps: W_in, b_in; or W_gate, b_gate, W_up, b_up when gated."""
        if not self.gated:
            return {"W_in": self.W_in(layer), "b_in": self.b_in(layer)}
        W_up, b_up = self.W_up(layer), self.b_up(layer)
        assert W_up is not None and b_up is not None, "a gated model gives W_up and b_up"
        return {"W_gate": self.W_in(layer), "b_gate": self.b_in(layer), "W_up": W_up, "b_up": b_up}

    def signed(self) -> bool:
        """Whether an activation can be negative: always for a gated MLP (its up projection is signed),
        and for a plain one when act_fn goes below zero (GELU does, slightly; ReLU never)."""
        if self.gated:
            return True
        probe = torch.linspace(-20.0, 20.0, 4001, device=self.device, dtype=self.W_in(0).dtype)
        with torch.no_grad():
            return bool((self.act_fn(probe) < 0).any())

    @abstractmethod
    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        layers: list[int],
    ) -> dict[int, LayerOutput]:
        """Forward pass that returns h and activations for `layers` only, stopping after the last one."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or any special token."""

    @abstractmethod
    def decode_tokens(self, ids: list[int]) -> list[str]:
        """One display string per token id (for the viewer and the CLI)."""

    def check_layers(self, layers: list[int] | None) -> list[int]:
        from ne.errors import ConfigError

        if layers is None:
            return list(range(self.n_layers))
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ConfigError(
                    f"harvest.layers has layer {layer}, but {self.name} has layers 0..{self.n_layers - 1}"
                )
        return sorted(set(layers))
