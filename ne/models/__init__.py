"""Models with MLP layers: `load_model(cfg)` picks the back end named by `cfg.backend`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ne import schema
from ne.compute.device import resolve_device
from ne.config import ModelConfig
from ne.errors import ConfigError
from ne.models.base import LayerOutput, UnitModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig, n_devices: int = 1) -> UnitModel:
    """The model of `cfg`, on its device, or split over `n_devices` GPUs (`harvest.gpus_per_worker`)."""
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    check_devices(n_devices, device)
    if cfg.backend == "hf":
        from ne.models.hf import load_hf

        return load_hf(cfg, load_model_tokenizer(cfg), device, dtype, n_devices)
    from ne.models import tl

    loader = tl.load_by_name if cfg.backend == "transformer_lens" else tl.load_safetensors_model
    return loader(cfg, device, dtype, n_devices)


def check_devices(n_devices: int, device: torch.device) -> None:
    """A model split over `n_devices` needs that many CUDA GPUs visible here (Ray gives an actor its own)."""
    if n_devices <= 1:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type != "cuda" or visible < n_devices:
        raise ConfigError(
            f"harvest.gpus_per_worker is {n_devices} but this process sees {visible} CUDA GPUs (model.device "
            f"{device}); split a model only over GPUs it can see, or set harvest.gpus_per_worker: 1"
        )


def sae_path(cfg) -> str | None:
    """The SAE whose latents a run harvests: sae.path, or the one trained into RUN/sae/, or None."""
    if cfg.sae.path:
        return cfg.sae.path
    return f"{cfg.run_dir.rstrip('/')}/{schema.SAE_DIR}" if cfg.sae.train_hook else None


def load_units(cfg, n_devices: int = 1) -> UnitModel:
    """The units a run (`RunConfig`) harvests: the model's MLP neurons, or an SAE's latents on the model."""
    return units_on(load_model(cfg.model, n_devices), cfg)


def units_on(model: UnitModel, cfg) -> UnitModel:
    """The run's units on an already loaded model: its own MLP neurons, or the run's SAE's latents."""
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


__all__ = [
    "LayerOutput",
    "UnitModel",
    "load_model",
    "load_units",
    "sae_path",
    "load_model_tokenizer",
    "load_token_decoder",
    "DTYPES",
]
