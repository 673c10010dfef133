"""TransformerLens back ends: a model by name, or a config plus local safetensors weights.

LayerNorm is folded into `W_in`/`b_in` (TransformerLens's `fold_ln`), so `h` is the normalised input of
the MLP: the hook `blocks.L.ln2.hook_normalized`.

A `GatedMLP` (Llama, Mistral, Qwen, Gemma, OLMo) computes act_fn(h @ W_gate) * (h @ W_in) + b_in, with the
RMSNorm's weight folded into both W_gate and W_in. In this package's terms its gate is `W_in` and its up
projection `W_up` (TransformerLens's W_in); TransformerLens adds its b_in after the product, which is no
input bias of either map, so a gated model must have b_in = 0 (every converted model has).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import cast

import fsspec
import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP
from transformers import PreTrainedTokenizerBase

from ne.config import ModelConfig
from ne.errors import ConfigError, DataError
from ne.models.base import LayerOutput, UnitModel
from ne.models.tokenizers import decode_each, encode_plain, load_tokenizer

FOLDED_NORMS = ("LNPre", "RMSPre")


class TLModel(UnitModel):
    """A `HookedTransformer` with folded LayerNorm, seen through the `UnitModel` interface."""

    def __init__(self, model: HookedTransformer, name: str, tokenizer: PreTrainedTokenizerBase):
        cfg = model.cfg
        kinds = {type(block.mlp) for block in model.blocks}
        if kinds not in ({MLP}, {GatedMLP}):
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise ConfigError(
                f"model {name} has {names} MLPs; only dense MLPs are supported, plain (MLP) or gated (GatedMLP), "
                "not mixture-of-experts"
            )
        self.gated = kinds == {GatedMLP}
        if self.gated:
            for i, block in enumerate(model.blocks):
                if bool(cast(Tensor, block.mlp.b_in).detach().any()):
                    raise ConfigError(
                        f"model {name} layer {i}: its GatedMLP adds a non-zero b_in after act_fn(gate) * up, which "
                        "no input weight can carry; neuron embeddings need b_in = 0 (as every converted model has)"
                    )
        if cfg.normalization_type not in FOLDED_NORMS:
            raise ConfigError(
                f"model {name} has normalization_type {cfg.normalization_type!r}; neuron embeddings need "
                f"LayerNorm folded into W_in ({' or '.join(FOLDED_NORMS)}): load it with fold_ln=True"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.n_layers = cfg.n_layers
        self.d_model = cfg.d_model
        self.d_mlp = cast(int, cfg.d_mlp)  # set for every model with an MLP, the only ones let through above
        self.n_ctx_max = cfg.n_ctx
        self.d_vocab = cfg.d_vocab
        self.act_fn = model.blocks[0].mlp.act_fn
        # SoLU-LN models normalise after act_fn; the activation proper is then hook_mid.
        self._act_hook = "hook_mid" if cfg.is_layer_norm_activation() else "hook_post"
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos  # GPT-2: <|endoftext|>
        self.bos_token_id = bos if cfg.default_prepend_bos else None
        self.pad_token_id = next(i for i in (tokenizer.pad_token_id, eos, 0) if i is not None)
        self.device = next(model.parameters()).device
        self.is_causal = cfg.attention_dir == "causal"

    def _mlp_tensor(self, layer: int, name: str) -> Tensor:
        """`W_in`, `W_gate` or `b_in` of one layer's MLP, detached, on the model's first device."""
        return getattr(self.model.blocks[layer].mlp, name).detach().to(self.device)

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        return self._mlp_tensor(layer, "W_gate" if self.gated else "W_in")

    def b_in(self, layer: int) -> Float[Tensor, " d_mlp"]:
        b = self._mlp_tensor(layer, "b_in")
        return torch.zeros_like(b) if self.gated else b  # a gated b_in is refused unless zero

    def W_up(self, layer: int) -> Float[Tensor, "d_model d_mlp"] | None:
        return self._mlp_tensor(layer, "W_in") if self.gated else None

    def b_up(self, layer: int) -> Float[Tensor, " d_mlp"] | None:
        return torch.zeros_like(self._mlp_tensor(layer, "b_in")) if self.gated else None

    def run(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], layers: list[int]
    ) -> dict[int, LayerOutput]:
        layers = self.check_layers(layers)
        out: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}

        def keep(layer: int, key: str):
            def hook(x: Tensor, hook) -> None:
                # LayerNormPre's hook sees float32; the MLP gets it cast to the model's dtype. A model split over
                # several GPUs has each block on its own device: gather on the first.
                out[layer][key] = x.to(self.model.cfg.dtype).to(self.device)

            return hook

        hooks: list[tuple[str | Callable, Callable]] = []
        for layer in layers:
            hooks.append((f"blocks.{layer}.ln2.hook_normalized", keep(layer, "h")))
            hooks.append((f"blocks.{layer}.mlp.{self._act_hook}", keep(layer, "act")))
        tokens = tokens.to(self.device)
        # Without padding the mask changes nothing (and TransformerLens is faster without it).
        mask = None if bool(attention_mask.all()) else attention_mask.to(self.device)
        with torch.no_grad():
            self.model.run_with_hooks(
                tokens, return_type=None, stop_at_layer=max(layers) + 1, attention_mask=mask, fwd_hooks=hooks
            )
        return {layer: LayerOutput(**out[layer]) for layer in layers}

    def encode(self, text: str) -> list[int]:
        return encode_plain(self.tokenizer, text)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return decode_each(self.tokenizer, ids)


def wrap_hooked_transformer(
    model: HookedTransformer, name: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> TLModel:
    """The one way a built `HookedTransformer` becomes an `UnitModel` (by name or from safetensors)."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ConfigError(f"model {name} has no tokenizer; set model.tokenizer ('gpt2' or a local directory)")
    return TLModel(model, name, tokenizer)


def check_model_name(name: str) -> str:
    """The official TransformerLens name of `name`, or a ConfigError suggesting close matches."""
    from transformer_lens.loading_from_pretrained import get_official_model_name
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    try:
        return get_official_model_name(name)
    except ValueError:
        known = list(OFFICIAL_MODEL_NAMES) + [a for aliases in MODEL_ALIASES.values() for a in aliases]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see TransformerLens's list of supported models"
        raise ConfigError(f"model.name {name!r} is not a TransformerLens model; {hint}") from None


def load_by_name(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, n_devices: int = 1) -> TLModel:
    official = check_model_name(cfg.name)
    try:
        model = HookedTransformer.from_pretrained(
            official, fold_ln=True, center_writing_weights=True, center_unembed=True, device="cpu"
        )
    except OSError as exc:
        raise DataError(f"could not load model {cfg.name!r} from the Hugging Face hub: {exc}") from None
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    return wrap_hooked_transformer(_place(model, device, dtype, n_devices), cfg.name, tokenizer)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A safetensors file from any fsspec path, as a dict of tensors."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"model.weights file {path!r} does not exist; give the path of a .safetensors file") from None
    try:
        return load_safetensors_bytes(data)
    except SafetensorError as exc:
        raise DataError(f"model.weights file {path!r} is not a valid safetensors file ({exc})") from None


def check_state_dict(state: dict[str, Tensor], model: HookedTransformer, path: str) -> None:
    """Every weight present with its shape, and nothing unknown: TransformerLens would silently fill gaps.

    Missing biases are allowed: TransformerLens fills them with zeros, as for models without biases.
    """
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    known = set(model.state_dict())
    missing = sorted(k for k in set(expected) - set(state) if not k.rsplit(".", 1)[-1].startswith("b"))
    unknown = sorted(set(state) - known)
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"missing tensors: {', '.join(missing[:5])}" if missing else "",
        f"unknown tensors: {', '.join(unknown[:5])}" if unknown else "",
        f"wrong shapes: {', '.join(wrong[:5])}" if wrong else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise DataError(
            f"model.weights {path!r} does not match model.architecture ({'; '.join(problems)}); save a "
            "TransformerLens state dict of the same architecture"
        )


def load_safetensors_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, n_devices: int = 1) -> TLModel:
    if cfg.weights is None or cfg.architecture is None:
        raise ConfigError(
            "model.backend safetensors needs model.weights (a state dict) and model.architecture (its "
            "HookedTransformerConfig); set both"
        )
    tokenizer = load_tokenizer(cfg.tokenizer)
    arch = {"d_vocab": len(tokenizer), **cfg.architecture, "device": "cpu"}
    try:
        tl_cfg = HookedTransformerConfig(**arch)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"model.architecture is not a valid HookedTransformerConfig: {exc}") from None
    if tl_cfg.d_vocab < len(tokenizer):
        raise ConfigError(
            f"model.architecture.d_vocab is {tl_cfg.d_vocab} but tokenizer {cfg.tokenizer!r} has "
            f"{len(tokenizer)} tokens; the vocabulary must cover the tokenizer"
        )
    state = read_state_dict(cfg.weights)
    model = HookedTransformer(tl_cfg, move_to_device=False)
    check_state_dict(state, model, cfg.weights)
    model.load_and_process_state_dict(
        {k: v.float() for k, v in state.items()}, fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    return wrap_hooked_transformer(_place(model, device, dtype, n_devices), cfg.name, tokenizer)


def _place(model: HookedTransformer, device: torch.device, dtype: torch.dtype, n_devices: int = 1) -> HookedTransformer:
    """Cast and move after folding, which is done in float32 for accuracy (TransformerLens advises so).

    With `n_devices` > 1 the blocks are spread over that many GPUs by TransformerLens itself (`cfg.n_devices`)."""
    model = model.to(dtype, print_details=False)
    if n_devices > 1:
        model.cfg.device, model.cfg.n_devices = "cuda", n_devices
        model.move_model_modules_to_device()
        return model
    # A string keeps the device index in model.cfg.device (a torch.device would keep only its type).
    return model.to(str(device), print_details=False)
