"""SAE latents as units: a model's residual stream read through a SAELens SAE.

For latent j, `h` is the SAE's encoder input after its own input processing (`process_sae_in`: input
normalisation and the `b_dec` subtraction where its config asks for them), `w_j = W_enc[:, j]` and `act` the
SAE's activation (ReLU, JumpReLU with its threshold, or TopK), so `sum(h ⊙ w_j) + b_enc[j]` is the latent's
pre-activation, as for an MLP neuron. A TopK SAE that rescales its pre-activations by the decoder norms has
them folded into W_in and b_in. The SAE is loaded with the `sae-lens` package (`pip install -e ".[sae]"`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import fsspec
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ne.errors import ConfigError, DataError
from ne.models.base import LayerOutput, MLPModel

SUPPORTED = ("standard", "jumprelu", "topk")
"""SAELens architectures whose encoder is act(h @ W_enc + b_enc) latent by latent (TopK: over latents)."""
HF_HOOKS = ("hook_resid_pre", "hook_resid_post")


def load_sae(path: str):
    """A SAELens SAE from a directory (cfg.json + sae_weights.safetensors), local or any fsspec URL."""
    try:
        from sae_lens import SAE
    except ImportError:
        raise ConfigError('sae.path needs the sae-lens package: pip install -e ".[sae]"') from None
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/cfg.json"):
        raise DataError(f"sae.path {path!r} is not a SAELens SAE directory (no cfg.json); give the folder that "
                        "holds cfg.json and sae_weights.safetensors")
    local = root
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        local = tempfile.mkdtemp(prefix="ne-sae-")
        fs.get(f"{root}/*", local + "/")
    try:
        sae = SAE.load_from_disk(local, device="cpu")
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"sae.path {path!r} could not be loaded by sae_lens: {exc}") from None
    arch = sae.cfg.architecture()
    if arch not in SUPPORTED:
        raise ConfigError(f"the SAE at {path!r} is a {arch!r} SAE; neuron embeddings need an encoder of the form "
                          f"act(h @ W_enc + b_enc), which {', '.join(SUPPORTED)} SAEs have")
    if not sae.cfg.metadata.hook_name:
        raise DataError(f"the SAE at {path!r} names no hook_name in cfg.json's metadata; neuron embeddings need "
                        "to know where it reads the model")
    return sae.eval()


def sae_files(path: str) -> list[str]:
    """The files of an SAE directory that its latents depend on (stage "sae" records them as its inputs, so a
    rerun notices an SAE replaced under the same path)."""
    fs, root = fsspec.core.url_to_fs(path)
    return [f"{path.rstrip('/')}/{name}" for name in ("cfg.json", "sae_weights.safetensors")
            if fs.exists(f"{root}/{name}")]


def hook_layer(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    if not match:
        raise ConfigError(f"the SAE reads {hook!r}; only hooks inside a block (blocks.L....) are supported")
    return int(match.group(1))


class SAEUnits(MLPModel):
    """A base model's residual stream at the SAE's hook, seen as `d_sae` units of layer L (the hook's block)."""

    def __init__(self, base: MLPModel, sae, path: str):
        self.base, self.sae, self.path = base, sae, path
        self.hook = sae.cfg.metadata.hook_name
        self.layer = hook_layer(self.hook)
        self.name = f"{base.name} + SAE {Path(path).name} @ {self.hook}"
        self.n_layers, self.n_ctx_max, self.d_vocab = base.n_layers, base.n_ctx_max, base.d_vocab
        self.d_model, self.d_mlp = sae.cfg.d_in, sae.cfg.d_sae
        self.bos_token_id, self.pad_token_id, self.is_causal = base.bos_token_id, base.pad_token_id, base.is_causal
        self.device = base.device
        self.act_fn = nn.ReLU()
        self.sae.to(base.device)
        self._scale = (sae.W_dec.norm(dim=-1) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
                       else torch.ones(sae.cfg.d_sae, device=base.device))
        check_reachable(base, self.hook)
        probe = torch.tensor([[base.bos_token_id if base.bos_token_id is not None else base.pad_token_id]])
        width = residual(base, probe, torch.ones_like(probe), self.hook).shape[2:]
        if tuple(width) != (self.d_model,):
            raise ConfigError(f"the SAE reads {self.hook}, whose activations have shape [..., "
                              f"{', '.join(map(str, width))}] in {base.name}, but its d_in is {self.d_model}")

    def check_layers(self, layers: list[int] | None) -> list[int]:
        if layers is not None and list(layers) != [self.layer]:
            raise ConfigError(f"harvest.layers is {layers}, but the SAE reads {self.hook}: its units are layer "
                              f"{self.layer}; set harvest.layers to [{self.layer}] or null")
        return [self.layer]

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_sae"]:
        return (self.sae.W_enc * self._scale).detach()

    def b_in(self, layer: int) -> Float[Tensor, " d_sae"]:
        return (self.sae.b_enc * self._scale).detach()

    @torch.no_grad()
    def run(self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], layers: list[int]):
        self.check_layers(layers)
        x = residual(self.base, tokens, attention_mask, self.hook)
        h = self.sae.process_sae_in(x)
        return {self.layer: LayerOutput(h=h, act=self.sae.encode(x))}

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return self.base.decode_tokens(ids)


class _Stop(Exception):
    """Raised once the hooked activation is captured: nothing after it needs to run."""


def check_reachable(base: MLPModel, hook: str) -> None:
    from ne.models.tl import TLModel

    if isinstance(base, TLModel):
        if hook not in base.model.hook_dict:
            raise ConfigError(f"the SAE reads {hook!r}, which {base.name} has no hook named; see its hook_dict")
    elif hook.split(".")[-1] not in HF_HOOKS or hook_layer(hook) >= base.n_layers:
        raise ConfigError(f"the SAE reads {hook!r}, which the {type(base).__name__} back end cannot reach; it "
                          f"reaches blocks.L.{' and blocks.L.'.join(HF_HOOKS)} for L < {base.n_layers}")


def residual(base: MLPModel, tokens: Tensor, attention_mask: Tensor, hook: str) -> Float[Tensor, "batch pos d"]:
    """The activation at `hook` (a TransformerLens hook name), from a forward pass stopped right after it."""
    from ne.models.tl import TLModel

    tokens, attention_mask = tokens.to(base.device), attention_mask.to(base.device)
    if isinstance(base, TLModel):
        out: dict[str, Tensor] = {}
        mask = None if bool(attention_mask.all()) else attention_mask
        base.model.run_with_hooks(tokens, return_type=None, stop_at_layer=hook_layer(hook) + 1, attention_mask=mask,
                                  fwd_hooks=[(hook, lambda x, hook: out.__setitem__("x", x))])
        return out["x"]
    block = hf_blocks(base.model)[hook_layer(hook)]
    out = {}

    def before(module, args, kwargs):
        out["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    def after(module, args, output):
        out["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = (block.register_forward_pre_hook(before, with_kwargs=True) if hook.endswith("hook_resid_pre")
              else block.register_forward_hook(after))
    try:
        base.model(input_ids=tokens, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    return out["x"]


def hf_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face model (BERT family, GPT-2, Llama-style)."""
    for path in ("encoder.layer", "h", "layers", "model.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise ConfigError(f"cannot find the blocks of {type(model).__name__} to read its residual stream")
