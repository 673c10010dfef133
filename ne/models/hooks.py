"""Activations at a TransformerLens hook name, on every back end: read them, or replace them (a splice).

TransformerLens models reach every hook in their `hook_dict`. Hugging Face models reach four per block, named
as TransformerLens names them:
  blocks.L.hook_resid_pre    the block's input (the residual stream before block L)
  blocks.L.hook_resid_post   the block's output
  blocks.L.hook_mlp_out      the MLP's output, before it joins the residual stream (BERT: `output.dense`)
  blocks.L.mlp.hook_post     the MLP neurons: the activation function's output, or what a gated MLP's
                             `down_proj` receives (act_fn(gate) · up), as `UnitModel.run` gives them
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ne.errors import ConfigError
from ne.models.base import UnitModel

if TYPE_CHECKING:
    from ne.models.hf import HFModel

HF_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "mlp.hook_post")
"""The hooks (after `blocks.L.`) the Hugging Face back end reaches."""

Splice = Callable[[Tensor], Tensor | None]
"""Called with the activation at the hook; returns its replacement, or None to leave it."""


class _Stop(Exception):
    """Raised once the hooked activation is captured: nothing after it needs to run."""


def hook_layer(hook: str) -> int:
    """The block a hook name lies in (`blocks.L....`)."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    if not match:
        raise ConfigError(f"hook {hook!r} lies in no block; use a hook inside one, such as blocks.3.hook_resid_pre")
    return int(match.group(1))


def check_hook(model: UnitModel, hook: str, who: str = "the SAE reads") -> None:
    """A ConfigError unless `model`'s back end reaches `hook`; `who` begins the message."""
    from ne.models.tl import TLModel

    if isinstance(model, TLModel):
        if hook not in model.model.hook_dict:
            raise ConfigError(
                f"{who} {hook!r}, which {model.name} has no hook named; see its hook_dict, e.g. "
                "blocks.0.hook_resid_pre, blocks.0.hook_mlp_out, blocks.0.mlp.hook_post"
            )
        return
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if not match or match.group(2) not in HF_HOOKS or int(match.group(1)) >= model.n_layers:
        raise ConfigError(
            f"{who} {hook!r}, which the {type(model).__name__} back end cannot reach; it reaches "
            f"blocks.L.{', blocks.L.'.join(HF_HOOKS)} for L < {model.n_layers}"
        )


@contextmanager
def hooked(model: UnitModel, hook: str, fn: Splice) -> Iterator[None]:
    """Within the block, every forward pass of `model` calls `fn` on the activation at `hook`."""
    from ne.models.tl import TLModel

    check_hook(model, hook)
    if isinstance(model, TLModel):
        with model.model.hooks(fwd_hooks=[(hook, lambda x, hook: fn(x))]):
            yield
        return
    handle = _hf_handle(cast("HFModel", model), hook, fn)  # check_hook admits TransformerLens and HF only
    try:
        yield
    finally:
        handle.remove()


def _hf_handle(model: HFModel, hook: str, fn: Splice) -> RemovableHandle:
    layer, name = hook_layer(hook), hook.split(".", 2)[2]
    block = hf_blocks(model.model)[layer]

    def on_input(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = fn(x)
        if y is None:
            return None
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    def on_output(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = fn(x)
        if y is None:
            return None
        return (y, *output[1:]) if isinstance(output, tuple) else y

    if name == "hook_resid_pre":
        return block.register_forward_pre_hook(on_input, with_kwargs=True)
    if name == "hook_resid_post":
        return block.register_forward_hook(on_output)
    if name == "hook_mlp_out":
        return _mlp_out_module(block).register_forward_hook(on_output)
    if model.gated:  # the neurons are what down_proj receives
        return model.gated_sites[layer].proj("down_proj").register_forward_pre_hook(on_input, with_kwargs=True)
    return model.plain_sites[layer].act_module.register_forward_hook(on_output)


def _mlp_out_module(block: nn.Module) -> nn.Module:
    """The module whose output is the block's MLP output: `mlp` (GPT-2, gated decoders), or BERT's `output.dense`
    (its MLP output before dropout and the post-LayerNorm residual sum)."""
    return cast(nn.Module, block.mlp if hasattr(block, "mlp") else cast(nn.Module, block.output).dense)


@torch.no_grad()
def read_hook(model: UnitModel, tokens: Tensor, attention_mask: Tensor, hook: str) -> Float[Tensor, "batch pos d"]:
    """The activation at `hook`, from a forward pass stopped right after it."""
    from ne.models.tl import TLModel

    out: dict[str, Tensor] = {}

    def grab(x: Tensor) -> None:
        out["x"] = x
        raise _Stop

    tokens, attention_mask = tokens.to(model.device), attention_mask.to(model.device)
    try:
        with hooked(model, hook, grab):
            if isinstance(model, TLModel):
                mask = None if bool(attention_mask.all()) else attention_mask
                model.model(tokens, return_type=None, stop_at_layer=hook_layer(hook) + 1, attention_mask=mask)
            else:
                cast("HFModel", model).model(input_ids=tokens, attention_mask=attention_mask)
    except _Stop:
        pass
    return out["x"]


def hf_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face model (BERT family, GPT-2, Llama-style)."""
    for path in ("encoder.layer", "h", "layers", "model.layers", "transformer.h"):
        node: nn.Module | None = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise ConfigError(f"cannot find the blocks of {type(model).__name__} to read its activations")
