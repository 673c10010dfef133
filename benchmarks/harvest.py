"""Harvest speed and memory: forward pass alone vs our two-pass harvest vs a naive baseline.

    python benchmarks/harvest.py                     # GPT2-small-shaped model (random weights) and MiniLM
    python benchmarks/harvest.py --models minilm --contexts 128
    python benchmarks/harvest.py --device cuda --dtype bfloat16 --contexts 2048 --batch-size 64   # on a GPU

Prints tokens/s for each, the ratios harvest / (2 × forward) (target <= 1.3) and naive / harvest (target >= 10),
and the peak memory of the whole harvest job (in process) for two corpus sizes 4x apart. The outputs grow until
every neuron has its k examples (at most k x neurons rows), so the check uses k=10 and 1,024 vs 4,096 contexts,
where both runs keep about the same outputs and only the corpus differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from ne.compute import harvest
from ne.config import DataConfig, ModelConfig
from ne.data import iter_contexts, iter_documents
from ne.models import load_model
from ne.models.tl import wrap_hooked_transformer
from ne.models.tokenizers import gpt2_tokenizer

MINILM = ModelConfig(backend="hf", name="all-MiniLM-L6-v2")


def gpt2_small_shaped(device: str, dtype: str):
    """GPT2-small's architecture with random weights, LayerNorm folded as for the real model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        d_mlp=3072,
        n_heads=12,
        d_head=64,
        n_ctx=1024,
        d_vocab=50257,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        device=device,
        dtype=getattr(torch, dtype),
    )
    model = HookedTransformer(cfg)
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return wrap_hooked_transformer(model, "gpt2-small-shaped", gpt2_tokenizer())


def contexts_for(model, n: int, n_ctx: int) -> list[harvest.Context]:
    docs = iter_documents(DataConfig(source="pydoc"))
    out = [(c, t) for c, _, t in iter_contexts(docs, model.encode, model.bos_token_id, n_ctx, max_contexts=n)]
    if len(out) < n:  # the pydoc corpus is finite; repeat it for large GPU runs
        out = [(i, out[i % len(out)][1]) for i in range(n)]
    return out


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, contexts, batch_size) -> float:
    layers = list(range(model.n_layers))
    sync(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for _, tokens, mask in harvest.batches(contexts, batch_size, model.pad_token_id):
            model.run(tokens.to(model.device), mask.to(model.device), layers)
    sync(model)
    return time.perf_counter() - start


def time_harvest(model, contexts, batch_size, n_ctx) -> float:
    layers = list(range(model.n_layers))
    sync(model)
    start = time.perf_counter()
    maxima = harvest.shard_maxima(model, contexts, layers, batch_size)
    thresholds = {layer: harvest.thresholds_from_maxima(m, 0.75) for layer, m in maxima.items()}
    harvest.shard_examples(model, contexts, thresholds, 100, (20, 5), n_ctx, batch_size)
    sync(model)
    return time.perf_counter() - start


@torch.inference_mode()
def time_naive(model, contexts, batch_size) -> float:
    """What a basic implementation does: cache everything, then loop over neurons in Python."""
    layers = list(range(model.n_layers))
    has_bos = model.bos_token_id is not None
    start = time.perf_counter()
    maxima = {(layer, n): float("-inf") for layer in layers for n in range(model.d_mlp)}
    for _, tokens, mask in harvest.batches(contexts, batch_size, model.pad_token_id):  # pass 1
        cache = run_with_cache(model, tokens, mask, layers)
        for layer in layers:
            act = cache[layer][1]
            for n in range(model.d_mlp):
                for b in range(act.shape[0]):
                    length = int(mask[b].sum())
                    maxima[layer, n] = max(maxima[layer, n], float(act[b, int(has_bos) : length, n].max()))
    counts = dict.fromkeys(maxima, 0)
    for _, tokens, mask in harvest.batches(contexts, batch_size, model.pad_token_id):  # pass 2
        cache = run_with_cache(model, tokens, mask, layers)
        for layer in layers:
            h, act = cache[layer]
            for n in range(model.d_mlp):
                for b in range(act.shape[0]):
                    length = int(mask[b].sum())
                    row = act[b, int(has_bos) : length, n]
                    pos = int(row.argmax())
                    if counts[layer, n] < 100 and float(row[pos]) >= 0.75 * maxima[layer, n]:
                        counts[layer, n] += 1
                        _ = h[b, pos + int(has_bos)].clone()
    return time.perf_counter() - start


def run_with_cache(model, tokens, mask, layers):
    """TransformerLens's run_with_cache where the model has it; the back end's hooks otherwise."""
    if hasattr(model, "model") and hasattr(model.model, "run_with_cache"):
        _, cache = model.model.run_with_cache(tokens)  # everything cached, logits computed: the usual first try
        return {i: (cache[f"blocks.{i}.ln2.hook_normalized"], cache[f"blocks.{i}.mlp.hook_post"]) for i in layers}
    out = model.run(tokens, mask, layers)
    return {i: (out[i].h, out[i].act) for i in layers}


def peak_memory_mb(n_contexts: int, corpus: str, k: int) -> tuple[float, int]:
    """Peak RSS of a whole in-process harvest job (contexts, both passes, merge) in a fresh process.

    Read from VmHWM: Linux's ru_maxrss would also count this parent's memory at fork time. Returns
    (MB, examples kept): the kept examples, at most k per neuron, are the one output allowed to grow."""
    code = f"""
import json, tempfile
from jobs.harvest import run_harvest
from ne.config import *
with tempfile.TemporaryDirectory() as d:
    cfg = RunConfig(run_dir=d, model=ModelConfig(backend="hf", name="all-MiniLM-L6-v2"),
                    data=DataConfig(source="files", paths=[{corpus!r}], max_contexts={n_contexts},
                                    contexts_per_part=64),
                    harvest=HarvestConfig(num_workers=0, batch_size=16, k={k}))
    kept = sum(run_harvest(cfg).examples.values())
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps([int(hwm.split()[1]) / 1024, kept]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def repeated_pydoc(path: str, times: int) -> str:
    """The pydoc corpus `times` over, as JSONL: enough text for corpora larger than pydoc's ~1,050 contexts."""
    with open(path, "w") as f:
        for _ in range(times):
            for text in iter_documents(DataConfig(source="pydoc")):
                f.write(json.dumps({"text": text}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-shape,minilm")
    parser.add_argument("--contexts", type=int, default=32, help="contexts for forward and harvest timings")
    parser.add_argument("--naive-contexts", type=int, default=8, help="contexts for the (slow) naive baseline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory", type=int, default=1024, help="smaller corpus of the memory check (0: skip)")
    parser.add_argument(
        "--memory-k",
        type=int,
        default=10,
        help="k for the memory check: small enough that every neuron's k examples are found in both "
        "corpora, so the outputs (bounded by k per neuron) are the same size",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads, dtype {args.dtype}, batch {args.batch_size} x {args.n_ctx}"
    )
    for name in filter(None, args.models.split(",")):
        if name == "gpt2-shape":
            model = gpt2_small_shaped(args.device, args.dtype)
        else:
            model = load_model(ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device=args.device, dtype=args.dtype))
        contexts = contexts_for(model, args.contexts, args.n_ctx)
        tokens = sum(len(t) for _, t in contexts)
        time_forward(model, contexts[: args.batch_size], args.batch_size)  # warm-up
        # Interleaved repeats, best of each: other load on the machine only ever adds time.
        forward, ours = float("inf"), float("inf")
        for _ in range(args.repeats):
            forward = min(forward, time_forward(model, contexts, args.batch_size))
            ours = min(ours, time_harvest(model, contexts, args.batch_size, args.n_ctx))
        naive_ctx = contexts[: args.naive_contexts]
        naive = time_naive(model, naive_ctx, args.batch_size) if args.naive_contexts else float("nan")
        naive_tps = sum(len(t) for _, t in naive_ctx) / naive
        print(f"\n{name}: {model.n_layers} layers x {model.d_mlp} neurons, {len(contexts)} contexts, {tokens} tokens")
        print(f"  forward pass alone      {tokens / forward:10,.0f} tokens/s")
        print(f"  harvest (both passes)   {tokens / ours:10,.0f} tokens/s")
        print(f"  naive baseline          {naive_tps:10,.0f} tokens/s  ({len(naive_ctx)} contexts)")
        print(f"  harvest / (2 x forward) {ours / (2 * forward):10.2f}   (target <= 1.3)")
        print(f"  naive / harvest         {(tokens / ours) / naive_tps:10.1f}x  (target >= 10)")
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = repeated_pydoc(f"{tmp}/pydoc.jsonl", times=max(1, 4 * args.memory // 1000 + 1))
            small, kept_small = peak_memory_mb(args.memory, corpus, args.memory_k)
            large, kept_large = peak_memory_mb(4 * args.memory, corpus, args.memory_k)
        print(
            f"\npeak memory of the whole harvest job (MiniLM, k={args.memory_k}, in process, VmHWM): "
            f"{args.memory} contexts "
            f"{small:,.0f} MB ({kept_small:,} examples kept), {4 * args.memory} contexts {large:,.0f} MB "
            f"({kept_large:,} kept), ratio {large / small:.2f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
