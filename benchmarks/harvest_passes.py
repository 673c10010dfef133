"""Why the harvest makes two forward passes over every context: the measurements behind the design.

    python benchmarks/harvest_passes.py               # MiniLM over the demo corpus (pydoc), k=100 and k=10

From every neuron's peak activation in every context (one forward pass), it prints:
- the share of contexts that hold an example of some neuron: the contexts pass 2 could skip if it knew them;
- the rows an exact single-pass harvest would have to keep (every context whose peak reaches frac x a running
  maximum seeded from a prefix of the corpus, since the true maximum is unknown until the end), against the
  rows the two-pass harvest writes per part and the final first-k rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import harvest  # noqa: E402
from ne.config import DataConfig, ModelConfig  # noqa: E402
from ne.data import iter_contexts, iter_documents  # noqa: E402
from ne.models import load_model  # noqa: E402


@torch.inference_mode()
def peaks(model, n_ctx: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[contexts, layers x d_mlp] peak activations and their positions (BOS and padding excluded)."""
    docs = iter_documents(DataConfig(source="pydoc"))
    contexts = [(c, t) for c, _, t in iter_contexts(docs, model.encode, model.bos_token_id, n_ctx)]
    layers = list(range(model.n_layers))
    values, positions = [], []
    for _, tokens, mask in harvest.batches(contexts, batch_size, model.pad_token_id):
        out = model.run(tokens, mask, layers)
        best = [harvest.key_activations(out[i].act, mask, model.bos_token_id is not None).max(1) for i in layers]
        values.append(torch.cat([b.values for b in best], 1).float().numpy())
        positions.append(torch.cat([b.indices for b in best], 1).numpy())
    return np.concatenate(values), np.concatenate(positions)


def first_k(ok: np.ndarray, k: int) -> np.ndarray:
    return ok & (np.cumsum(ok, 0) <= k)


def rows_and_h(selected: np.ndarray, pos: np.ndarray, d_mlp: int) -> tuple[int, int]:
    """Example rows, and distinct (layer, context, position) h rows they need."""
    ctx, neuron = np.nonzero(selected)
    keys = ((neuron // d_mlp) * len(pos) + ctx) * (pos.max() + 1) + pos[ctx, neuron]
    return len(ctx), len(np.unique(keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frac", type=float, default=0.75)
    p.add_argument("--part", type=int, default=128, help="contexts per part, as in configs/demo.yaml")
    p.add_argument("--prefix", type=int, default=64, help="contexts whose maximum seeds the single pass")
    args = p.parse_args()
    model = load_model(ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu"))
    peak, pos = peaks(model, 128, 16)
    n_contexts = len(peak)
    top = peak.max(0)
    ok = peak >= np.where(top > 0, args.frac * top, np.inf)
    print(f"MiniLM over the pydoc corpus: {n_contexts} contexts, {peak.shape[1]} neurons, frac {args.frac}")
    for k in (100, 10):
        used = first_k(ok, k).any(1).mean()
        print(f"k={k}: contexts holding an example of some neuron: {used:.1%}")
    k = 100
    two_pass = np.zeros_like(ok)
    single = np.zeros_like(ok)
    seed = peak[: args.prefix].max(0)
    for lo in range(0, n_contexts, args.part):
        part = slice(lo, lo + args.part)
        two_pass[part] = first_k(ok[part], k)
        # a part can drop what falls below frac x its own running maximum at the part's end, not earlier rows
        running = np.maximum(seed, peak[part].max(0))
        single[part] = (peak[part] >= args.frac * running) & (running > 0)
    for name, sel in (
        ("final first-k", first_k(ok, k)),
        ("two-pass part files", two_pass),
        (f"single pass (prefix {args.prefix})", single),
    ):
        rows, h = rows_and_h(sel, pos, model.d_mlp)
        print(f"k={k}, {name:28s} {rows:9,d} example rows {h:9,d} h rows")


if __name__ == "__main__":
    main()
