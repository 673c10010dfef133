"""Shared fixtures: a tiny GPT-2-shaped model with random weights (its config, and loaded), MiniLM loaded, and the
shared data directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ne.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]

TINY_ARCH = {
    "n_layers": 2,
    "d_model": 64,
    "d_mlp": 256,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": 128,
    "d_vocab": 50257,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
}
"""GPT-2's architecture, shrunk; the vocabulary stays GPT-2's so real text tokenises."""


def gpt2_state_dict(arch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random TransformerLens GPT-2 state dict, written from the format's definition (not from TL).

    LayerNorm weights and all biases are random too, so that folding them into W_in is really tested.
    """
    g = torch.Generator().manual_seed(seed)
    d, m, heads, dh = arch["d_model"], arch["d_mlp"], arch["n_heads"], arch["d_head"]

    def rand(*shape, mean=0.0, std=0.1):
        return mean + std * torch.randn(*shape, generator=g)

    state = {"embed.W_E": rand(arch["d_vocab"], d), "pos_embed.W_pos": rand(arch["n_ctx"], d)}
    for i in range(arch["n_layers"]):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            state[b + ln + ".w"], state[b + ln + ".b"] = rand(d, mean=1.0), rand(d)
        for w in "QKV":
            state[b + f"attn.W_{w}"], state[b + f"attn.b_{w}"] = rand(heads, d, dh, std=0.2), rand(heads, dh)
        state[b + "attn.W_O"], state[b + "attn.b_O"] = rand(heads, dh, d, std=0.2), rand(d)
        state[b + "mlp.W_in"], state[b + "mlp.b_in"] = rand(d, m, std=0.2), rand(m)
        state[b + "mlp.W_out"], state[b + "mlp.b_out"] = rand(m, d, std=0.1), rand(d)
    state["ln_final.w"], state["ln_final.b"] = rand(d, mean=1.0), rand(d)
    state["unembed.W_U"], state["unembed.b_U"] = rand(d, arch["d_vocab"]), rand(arch["d_vocab"])
    return state


def write_tiny_model(folder: Path, arch: dict = TINY_ARCH, seed: int = 0) -> ModelConfig:
    """Save a random GPT-2-shaped model as safetensors in `folder`; return its config."""
    weights = Path(folder) / "tiny-gpt2.safetensors"
    save_file(gpt2_state_dict(arch, seed), str(weights))
    return ModelConfig(
        backend="safetensors",
        name="tiny-gpt2",
        weights=str(weights),
        architecture=dict(arch),
        tokenizer="gpt2",
        device="cpu",
        dtype="float32",
    )


@pytest.fixture(scope="session")
def tiny_model_cfg(tmp_path_factory) -> ModelConfig:
    """A 2-layer GPT-2-shaped model (d_model 64, d_mlp 256, n_ctx 128, GPT-2 tokenizer), random and seeded."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, tiny_model_cfg) -> str:
    """A finished tiny language-model run (`tests/viewer/viewer_run.py`: harvest, clusters, labels, index), shared
    by the viewer's, the labels', the descriptions' and the exports' tests: read it, or copy it to change it."""
    from tests.viewer.viewer_run import build_lm_run

    root = tmp_path_factory.mktemp("viewer_run") / "run"
    build_lm_run(root, tiny_model_cfg)
    return str(root)


@pytest.fixture(scope="module")
def tiny(tiny_model_cfg):
    """The tiny model, loaded."""
    from ne.models import load_model

    return load_model(tiny_model_cfg)


MINILM = ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu")
"""The demo model: the real all-MiniLM-L6-v2, offline."""


@pytest.fixture(scope="module")
def minilm():
    from ne.models import load_model

    return load_model(MINILM)


def shared_data_dir() -> Path:
    """NE_DATA_DIR, else <repo>/../shared/data."""
    return Path(os.environ.get("NE_DATA_DIR") or REPO.parent / "shared" / "data")


def require_shared(sub: str) -> Path:
    """The shared data folder `sub`, or skip the test saying how to provide it."""
    path = shared_data_dir() / sub
    if not path.exists():
        pytest.skip(f"shared data {path} is absent; set NE_DATA_DIR to the folder holding {sub!r}")
    return path


@pytest.fixture(scope="session")
def local_ray():
    """One small local Ray cluster shared by every test that needs one: each start costs seconds."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay under 108 bytes
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


GATED_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": 50257,
}
"""A 2-layer gated decoder, shrunk; GPT-2's vocabulary so that real text tokenises with the offline BPE."""


def write_gated_hf(folder: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random Hugging Face gated decoder (llama, gemma, mistral, qwen2, olmo, mixtral...) with GPT-2's BPE.

    Norm weights are random too (HF initialises them to the identity), so folding them is really tested."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ne.models.tokenizers import gpt2_tokenizer

    torch.manual_seed(seed)
    extra = {"head_dim": 16} if model_type.startswith("gemma") else {}
    config = AutoConfig.for_model(
        model_type, **GATED_SHAPE, **extra, **overrides, bos_token_id=50256, eos_token_id=50256
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if model_type.startswith("gemma") else 1.0))
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
    path = Path(folder) / f"tiny-{model_type}"
    model.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path
