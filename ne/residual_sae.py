"""An SAE of our own (`ne.compute.sae`) on a language model's activations at one hook, saved in SAELens's format.

Rows are sampled evenly from every token of the run's corpus that is neither BOS nor padding, so the sample
is deterministic and bounded by `sae.train_tokens` however long the corpus is. The SAE is saved as SAELens
writes one (`cfg.json` with architecture `standard`, `sae_weights.safetensors` with W_enc [d_in, d_sae],
b_enc, W_dec [d_sae, d_in], b_dec): our f = relu(W_enc (a - b_dec) + b_enc) is SAELens's standard SAE with
`apply_b_dec_to_input`, so `sae_lens.SAE.load_from_disk` gives back the same encoder.
"""

from __future__ import annotations

import json
import math

import safetensors.torch
import torch
from jaxtyping import Float
from torch import Tensor

from ne import schema
from ne.compute.harvest import batches
from ne.compute.sae import SAE, SAEConfig, fit_sae
from ne.models.base import MLPModel
from ne.models.sae_units import residual
from ne.rundir.contexts import iter_context_parts
from ne.rundir.store import RunDir

SAE_DIR = "sae"
WEIGHTS = "sae_weights.safetensors"


@torch.inference_mode()
def sample_activations(
    model: MLPModel, run: RunDir, hook: str, n_rows: int, batch_size: int
) -> Float[Tensor, "n d"]:
    """Up to `n_rows` activations at `hook`, evenly spaced over the corpus's real tokens (BOS excluded)."""
    lengths = run.read_parquet(schema.CONTEXTS_DIR, columns=["tokens"]).column("tokens").combine_chunks()
    first = int(model.bos_token_id is not None)
    total = sum(max(0, n - first) for n in lengths.value_lengths().to_pylist())
    stride = max(1, math.ceil(total / n_rows))
    rows, seen = [], 0
    for _, contexts in iter_context_parts(run):
        for _, tokens, mask in batches(contexts, batch_size, model.pad_token_id):
            x = residual(model, tokens, mask, hook).float().cpu()
            real = mask.bool().clone()
            real[:, :first] = False
            flat = x[real]
            index = torch.arange(seen, seen + len(flat))
            rows.append(flat[index % stride == 0])
            seen += len(flat)
    return torch.cat(rows)[:n_rows]


def train_sae(acts: Float[Tensor, "n d"], cfg: SAEConfig, seed: int) -> tuple[SAE, dict[str, float]]:
    """An SAE with expansion × d latents trained on `acts` (with the NE loss when cfg.ne_coeff > 0)."""
    sae, losses = fit_sae(acts, cfg, seed, with_ne=cfg.ne_coeff > 0)
    with torch.no_grad():
        f = sae.encode(acts)
        losses["l0"] = float((f > 0).float().sum(1).mean())
        losses["dead_pct"] = float(100 * (f.amax(0) <= 0).float().mean())
        losses["fvu"] = float((sae.decode(f) - acts).square().sum() / (acts - acts.mean(0)).square().sum())
    return sae, losses


def saelens_files(sae: SAE, hook: str, model_name: str, context_size: int, prepend_bos: bool) -> dict[str, bytes]:
    """cfg.json and sae_weights.safetensors of `sae` in SAELens's layout."""
    cfg = {
        "architecture": "standard", "d_in": sae.W_enc.shape[1], "d_sae": sae.n_neurons, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        # sae_lens_version marks the layout as SAELens 6's (older layouts are read through a converter).
        "metadata": {"sae_lens_version": "6.0.0", "model_name": model_name, "hook_name": hook, "hook_head_index": None,
                     "prepend_bos": prepend_bos, "context_size": context_size, "dataset_path": "pydoc_data.topics",
                     "sae_lens_training_version": None},
    }
    tensors = {"W_enc": sae.W_enc.detach().T.contiguous(), "b_enc": sae.b_enc.detach().contiguous(),
               "W_dec": sae.W_dec.detach().T.contiguous(), "b_dec": sae.b_dec.detach().contiguous()}
    return {"cfg.json": json.dumps(cfg, indent=2).encode(), WEIGHTS: safetensors.torch.save(tensors)}
