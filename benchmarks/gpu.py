"""The whole pipeline on a GPT2-small-shaped model (random weights, no hub), stage by stage, on any device.

    python benchmarks/gpu.py --device cuda --dtype bfloat16 --contexts 10000 --n-ctx 128 --batch-size 128
    python benchmarks/gpu.py --device cpu --contexts 16 --n-ctx 32 --layers 1          # a few seconds

Prints: forward tokens/s (all layers, hooks on); the harvest's tokens/s through both passes (selection
included, files not); the cluster stage's neurons/s (in process, reads and writes included); the index build
time; the whole `ne run` (tokenising, Ray start-up and every write included) as a subprocess; the peak GPU
memory; and each figure as a multiple of one forward pass over the corpus. `--skip-run` leaves out the whole
`ne run` (CI runs the script that way, for a few seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harvest import contexts_for, time_forward, time_harvest  # noqa: E402
from index.build import run_index  # noqa: E402
from jobs.cluster import run_cluster  # noqa: E402
from jobs.harvest import run_harvest  # noqa: E402
from ne.config import ClusterConfig, DataConfig, HarvestConfig, IndexConfig, ModelConfig, RunConfig, to_dict  # noqa: E402
from ne.models import load_model  # noqa: E402

GPT2_SMALL = {
    "n_layers": 12,
    "d_model": 768,
    "d_mlp": 3072,
    "n_heads": 12,
    "d_head": 64,
    "n_ctx": 1024,
    "d_vocab": 50257,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
}


def write_model(folder: Path, n_layers: int) -> ModelConfig:
    """GPT2-small's shape with random weights, saved as a TransformerLens state dict (safetensors)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    arch = {**GPT2_SMALL, "n_layers": n_layers}
    model = HookedTransformer(HookedTransformerConfig(**arch, seed=0, device="cpu"))
    path = folder / "gpt2-small-shaped.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith(("IGNORE", "mask"))}, str(path)
    )
    return ModelConfig(
        backend="safetensors", name="gpt2-small-shaped", weights=str(path), architecture=arch, tokenizer="gpt2"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12, help="GPT2-small has 12; fewer for a quick check")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="harvest actors in the `ne run` measurement")
    parser.add_argument("--work", default=None, help="folder for the model and runs (default: a temp folder)")
    parser.add_argument("--skip-run", action="store_true", help="leave out the whole `ne run` measurement")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ne-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = write_model(work, args.layers)
    model_cfg.device, model_cfg.dtype = args.device, args.dtype
    model = load_model(model_cfg)
    cuda = model.device.type == "cuda"
    name = torch.cuda.get_device_name(model.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    tokens = args.contexts * args.n_ctx
    print(
        f"device: {name}; {args.layers}-layer GPT2-small shape, {args.dtype}; {args.contexts} contexts × "
        f"{args.n_ctx} tokens = {tokens:,} tokens; batch {args.batch_size}"
    )

    contexts = contexts_for(model, args.contexts, args.n_ctx)
    time_forward(model, contexts[: args.batch_size], args.batch_size)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_forward = time_forward(model, contexts, args.batch_size)
    t_harvest = time_harvest(model, contexts, args.batch_size, args.n_ctx)
    del model

    def config(run_dir: Path, workers: int) -> RunConfig:
        return RunConfig(
            run_dir=str(run_dir),
            model=model_cfg,
            data=DataConfig(
                source="pydoc",
                n_ctx=args.n_ctx,
                max_contexts=args.contexts,
                contexts_per_part=max(1, args.contexts // max(1, 4 * workers)),
            ),
            harvest=HarvestConfig(k=100, frac=0.75, batch_size=args.batch_size, num_workers=workers),
            cluster=ClusterConfig(),
            index=IndexConfig(device=args.device),
        )

    cfg = config(work / "in-process", 0)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    run_harvest(cfg)  # the run the cluster and index stages read
    start = time.perf_counter()
    summary = run_cluster(cfg, in_process=True)
    t_cluster = time.perf_counter() - start
    start = time.perf_counter()
    run_index(cfg)
    t_index = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    t_run = None if args.skip_run else time_ne_run(config(work / "ne-run", args.workers), work / "ne-run.yaml")

    print(f"forward (hooks on every layer):  {tokens / t_forward:12,.0f} tok/s   {t_forward:8.2f} s   1.00×")
    print(
        f"harvest, both passes:            {tokens / t_harvest:12,.0f} tok/s   {t_harvest:8.2f} s "
        f"{t_harvest / t_forward:6.2f}×"
    )
    print(
        f"cluster stage, in process:       {summary.neurons / t_cluster:12,.0f} neurons/s {t_cluster:6.2f} s "
        f"{t_cluster / t_forward:6.2f}×  ({summary.neurons:,} neurons)"
    )
    print(f"index build:                     {'':>12}           {t_index:8.2f} s {t_index / t_forward:6.2f}×")
    if t_run is not None:
        print(
            f"whole `ne run` ({args.workers} harvest actor(s), Ray start-up included): {t_run:8.2f} s "
            f"{t_run / t_forward:6.2f}×"
        )
    print(f"peak GPU memory of the in-process stages: {peak:.2f} GiB" if cuda else "peak GPU memory: no GPU")


def time_ne_run(cfg: RunConfig, config_file: Path) -> float:
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ne.cli", "run", "--config", str(config_file)],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
