"""Models with MLP layers: `load_model(cfg)` picks the back end named by `cfg.backend`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ne.config import ModelConfig
from ne.device import resolve_device
from ne.models.base import LayerOutput, MLPModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig) -> MLPModel:
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.backend == "hf":
        from ne.models.hf import load_hf

        return load_hf(cfg, device, dtype)
    from ne.models import tl

    loader = tl.load_by_name if cfg.backend == "transformer_lens" else tl.load_safetensors_model
    return loader(cfg, device, dtype)


def sae_path(cfg) -> str | None:
    """The SAE whose latents a run harvests: sae.path, or the one trained into RUN/sae/, or None."""
    if cfg.sae.path:
        return cfg.sae.path
    return f"{cfg.run_dir.rstrip('/')}/sae" if cfg.sae.train_hook else None


def load_units(cfg) -> MLPModel:
    """The units a run (`RunConfig`) harvests: the model's MLP neurons, or an SAE's latents on the model."""
    model = load_model(cfg.model)
    path = sae_path(cfg)
    if path is None:
        return model
    from ne.models.sae_units import SAEUnits, load_sae

    return SAEUnits(model, load_sae(path), path)


# TransformerLens models whose tokenizer is GPT-2's BPE, which ships offline: no hub round trip to decode them.
GPT2_BPE_MODELS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}


def load_model_tokenizer(cfg: ModelConfig):
    """The tokenizer a run's model uses, without loading its weights."""
    from ne.models.tokenizers import gpt2_tokenizer, load_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.backend == "hf":
        from transformers import AutoTokenizer

        from ne.models.hf import model_path

        return AutoTokenizer.from_pretrained(model_path(cfg.name))
    if cfg.backend == "transformer_lens":
        from ne.models.tl import check_model_name

        official = check_model_name(cfg.name)
        if official in GPT2_BPE_MODELS:
            return gpt2_tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(official)
    return load_tokenizer(cfg.tokenizer)  # a safetensors model names its tokenizer; this says so if it doesn't


def load_token_decoder(cfg: ModelConfig) -> Callable[[Sequence[int]], list[str]]:
    """Token ids to display strings (one per token) with the run's tokenizer: viewing never needs the weights."""
    from ne.models.tokenizers import decode_each

    return functools.partial(decode_each, load_model_tokenizer(cfg))


__all__ = ["LayerOutput", "MLPModel", "load_model", "load_units", "sae_path", "load_model_tokenizer",
           "load_token_decoder", "DTYPES"]
