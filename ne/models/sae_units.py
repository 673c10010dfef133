"""SAE latents as units: a model's activations at one hook read through a SAELens SAE.

For latent j, `h` is the SAE's encoder input after its own input processing (`process_sae_in`: input
normalisation and the `b_dec` subtraction where its config asks for them), `w_j = W_enc[:, j]` and `act` the
SAE's activation (ReLU, JumpReLU with its threshold, or TopK), so `sum(h ⊙ w_j) + b_enc[j]` is the latent's
pre-activation, as for an MLP neuron. A TopK SAE that rescales its pre-activations by the decoder norms has
them folded into W_in and b_in. The SAE is loaded with the `sae-lens` package (`pip install -e ".[sae]"`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ne.errors import ConfigError, DataError
from ne.models.base import LayerOutput, UnitModel
from ne.models.hooks import check_hook, hook_layer, read_hook

SUPPORTED = ("standard", "jumprelu", "topk")
"""SAELens architectures whose encoder is act(h @ W_enc + b_enc) latent by latent (TopK: over latents)."""


def load_sae(path: str):
    """A SAELens SAE from a directory (cfg.json + sae_weights.safetensors), local or any fsspec URL."""
    try:
        from sae_lens import SAE
    except ImportError:
        raise ConfigError('sae.path needs the sae-lens package: pip install -e ".[sae]"') from None
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/cfg.json"):
        raise DataError(
            f"sae.path {path!r} is not a SAELens SAE directory (no cfg.json); give the folder that "
            "holds cfg.json and sae_weights.safetensors"
        )
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
        raise ConfigError(
            f"the SAE at {path!r} is a {arch!r} SAE; neuron embeddings need an encoder of the form "
            f"act(h @ W_enc + b_enc), which {', '.join(SUPPORTED)} SAEs have"
        )
    if not sae.cfg.metadata.hook_name:
        raise DataError(
            f"the SAE at {path!r} names no hook_name in cfg.json's metadata; neuron embeddings need "
            "to know where it reads the model"
        )
    return sae.eval()


def sae_files(path: str) -> list[str]:
    """The files of an SAE directory that its latents depend on (stage "sae" records them as its inputs, so a
    rerun notices an SAE replaced under the same path)."""
    fs, root = fsspec.core.url_to_fs(path)
    return [
        f"{path.rstrip('/')}/{name}" for name in ("cfg.json", "sae_weights.safetensors") if fs.exists(f"{root}/{name}")
    ]


class SAEUnits(UnitModel):
    """A base model's activations at the SAE's hook, seen as `d_sae` units of layer L (the hook's block)."""

    def __init__(self, base: UnitModel, sae, path: str):
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
        self._scale = (
            sae.W_dec.norm(dim=-1)
            if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
            else torch.ones(sae.cfg.d_sae, device=base.device)
        )
        check_hook(base, self.hook)
        probe = torch.tensor([[base.bos_token_id if base.bos_token_id is not None else base.pad_token_id]])
        width = read_hook(base, probe, torch.ones_like(probe), self.hook).shape[2:]
        if tuple(width) != (self.d_model,):
            raise ConfigError(
                f"the SAE reads {self.hook}, whose activations have shape [..., "
                f"{', '.join(map(str, width))}] in {base.name}, but its d_in is {self.d_model}"
            )

    def check_layers(self, layers: list[int] | None) -> list[int]:
        if layers is not None and list(layers) != [self.layer]:
            raise ConfigError(
                f"harvest.layers is {layers}, but the SAE reads {self.hook}: its units are layer "
                f"{self.layer}; set harvest.layers to [{self.layer}] or null"
            )
        return [self.layer]

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_sae"]:
        return (self.sae.W_enc * self._scale).detach()

    def b_in(self, layer: int) -> Float[Tensor, " d_sae"]:
        return (self.sae.b_enc * self._scale).detach()

    @torch.no_grad()
    def run(self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], layers: list[int]):
        self.check_layers(layers)
        x = read_hook(self.base, tokens, attention_mask, self.hook)
        h = self.sae.process_sae_in(x)
        return {self.layer: LayerOutput(h=h, act=self.sae.encode(x))}

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return self.base.decode_tokens(ids)
