"""Language-model SAE training: speed and memory on all-MiniLM-L6-v2's residual stream before layer 3 (pydoc).

    python benchmarks/lm_sae.py --speed      # streaming vs a plain forward pass; NE loss vs standard; 1 vs 2 workers
    python benchmarks/lm_sae.py --memory [--contexts N]   # peak memory of training on a corpus and on one 4x larger
    python benchmarks/lm_sae.py --sweep 0.3 1 3   # λ2 of the NE loss, one seed, in process (how configs chose it)
    python benchmarks/lm_sae.py --mnist      # the paper's own MNIST SAEs: NE-space against raw-space distances
    python benchmarks/lm_sae.py --encoders runs/lm-sae/standard-seed0 runs/lm-sae/ne0.3-seed0   # where they read

Every figure is printed with the CPU time the process used beside its wall time: on a shared machine the
ratios, measured within one run, are the figures to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import schema  # noqa: E402
from ne.compute.lm_sae import init_sae  # noqa: E402
from ne.compute.parallel import SINGLE  # noqa: E402
from ne.compute.sae import NeuronEmbeddingLoss  # noqa: E402
from ne.config import DataConfig, ModelConfig, RunConfig, UnitsSAEConfig  # noqa: E402
from ne.lm_sae.buffer import ActivationBuffer, ShufflePlan, hook_rows, stream_contexts, stream_rows  # noqa: E402
from ne.lm_sae.config import LMSAEConfig, SAETrainerConfig  # noqa: E402
from ne.lm_sae.train import hook_width, sae_step  # noqa: E402
from ne.models import load_model  # noqa: E402
from ne.rundir.contexts import write_contexts  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402

MINILM = ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu")
HOOK = "blocks.3.hook_resid_pre"


def corpus(work: Path, contexts: int | None = None, repeat: int = 1) -> RunConfig:
    """A run directory holding the pydoc corpus (`repeat` times over) tokenised for MiniLM."""
    paths = []
    if repeat > 1:
        from pydoc_data.topics import topics

        path = work / f"pydoc-x{repeat}.jsonl"
        with open(path, "w") as f:
            for _ in range(repeat):
                for key in sorted(topics):
                    f.write(json.dumps({"text": topics[key]}) + "\n")
        paths = [str(path)]
    data = DataConfig(
        source="files" if paths else "pydoc", paths=paths, n_ctx=128, max_contexts=contexts, contexts_per_part=64
    )
    cfg = RunConfig(run_dir=str(work / f"corpus-{contexts}-x{repeat}"), model=MINILM, data=data)
    if not RunDir(cfg.run_dir).exists("contexts"):
        write_contexts(RunDir(cfg.run_dir), cfg, load_model(MINILM))
    return cfg


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def streaming_vs_forward(run: RunDir, model, cfg: LMSAEConfig, steps: int) -> None:
    """Rows/s the stream delivers (shuffling buffer included, no training) against the forward passes alone."""
    plan = ShufflePlan(stream_contexts(run, 0, 10, 1), cfg.buffer_tokens, cfg.batch_size, 0, steps)
    buffer = ActivationBuffer(
        lambda cs: hook_rows(model, HOOK, cs, cfg.contexts_per_batch), SINGLE, hook_width(model, HOOK)
    )
    hook_rows(model, HOOK, list(stream_contexts(run, 1, 10, 1))[:32], cfg.contexts_per_batch)  # warm up
    contexts = []
    with Clock() as streamed:
        for added, ids in plan:
            buffer.add(added)
            buffer.take(ids)
            contexts += added
    with Clock() as forward:
        hook_rows(model, HOOK, contexts, cfg.contexts_per_batch)
    rows = steps * cfg.batch_size
    computed = sum(c.n_rows for c in contexts)
    print(
        f"streaming: {rows:,} rows in {streamed.wall:.1f} s wall ({streamed.cpu:.1f} s CPU): "
        f"{rows / streamed.wall:,.0f} rows/s ({computed:,} rows computed, the buffer's last fill included)"
    )
    print(
        f"forward passes alone over the same {len(contexts)} contexts: {forward.wall:.1f} s wall "
        f"({forward.cpu:.1f} s CPU): {computed / forward.wall:,.0f} rows/s"
    )
    print(
        f"  streaming / forward: {computed / streamed.wall / (computed / forward.wall):.2f} of the forward rate "
        f"(CPU time ratio {forward.cpu / streamed.cpu:.2f})"
    )


def ne_loss_cost(model, run: RunDir, steps: int) -> None:
    """Seconds per optimiser step on activations held in memory: the NE loss's cost over each architecture."""
    cfg = LMSAEConfig(batch_size=1024, buffer_tokens=16384)
    plan = ShufflePlan(stream_contexts(run, 0, 10, 1), cfg.buffer_tokens, cfg.batch_size, 0, 8)
    buffer = ActivationBuffer(lambda cs: hook_rows(model, HOOK, cs, 16), SINGLE, hook_width(model, HOOK))
    batches = []
    for added, ids in plan:
        buffer.add(added)
        batches.append(buffer.take(ids))
    for arch in ("standard", "topk", "jumprelu"):
        times = {}
        for loss in ("none", "ne"):
            c = replace(cfg, architecture=arch, k=32, loss=loss, ne_start=0.0)
            sae = init_sae(c, batches[0].mean(0), torch.Generator().manual_seed(0))
            opt = torch.optim.Adam(sae.parameters(), lr=c.lr)
            ne = NeuronEmbeddingLoss(sae.n_neurons, sae.W_enc.shape[1], c.ne_momentum) if loss == "ne" else None
            sae_step(sae, opt, batches[0], 1024, c, ne, True, SINGLE)  # warm up
            with Clock() as clock:
                for i in range(steps):
                    sae_step(sae, opt, batches[i % len(batches)], 1024, c, ne, True, SINGLE)
            times[loss] = clock
        std, ne = times["none"], times["ne"]
        print(
            f"{arch:>9}: {1024 * steps / std.wall:,.0f} tokens/s standard, {1024 * steps / ne.wall:,.0f} with the NE "
            f"loss: NE / standard = {ne.wall / std.wall:.2f} in wall time, {ne.cpu / std.cpu:.2f} in CPU time "
            f"(d_in 384, 1,536 latents, batch 1,024, {steps} steps)"
        )


def workers(base: RunConfig, tokens: int) -> None:
    """Tokens/s of the whole training job on Ray Train with 1 and 2 workers (same seed and global batch)."""
    from jobs.lm_sae import train_run_sae

    model = load_model(MINILM)
    results = {}
    for n in (1, 2):
        cfg = replace(
            base,
            run_dir=base.run_dir,
            sae=UnitsSAEConfig(
                train_hook=HOOK,
                train=LMSAEConfig(architecture="topk", k=32, batch_size=1024, buffer_tokens=16384, train_tokens=tokens),
                trainer=SAETrainerConfig(num_workers=n, checkpoint_every=10**6),
            ),
        )
        RunDir(cfg.run_dir).remove(schema.WORK_DIR)  # no checkpoint of the other run to resume from
        t0 = time.perf_counter()
        info = train_run_sae(RunDir(cfg.run_dir), cfg, model)
        wall = time.perf_counter() - t0
        results[n] = info
        print(
            f"{n} worker(s): {info['tokens']:,} tokens in {info['train_seconds']:.1f} s of training "
            f"({info['tokens'] / info['train_seconds']:,.0f} tokens/s); {wall:.1f} s with Ray Train's start "
            f"({info['tokens'] / wall:,.0f} tokens/s); MSE {info['mse']:.5f}"
        )
    print(
        f"  2 workers / 1: {results[1]['train_seconds'] / results[2]['train_seconds']:.2f}x the training rate; "
        f"MSE differs by {abs(results[1]['mse'] - results[2]['mse']) / results[1]['mse']:.1e} (relative)"
    )


def peak_memory(work: Path, contexts: int | None) -> None:
    """Peak RSS of training (in a fresh process, no Ray) on the whole stream of a corpus (`contexts` of pydoc, all
    by default) and of one 4x larger (pydoc 4 times over): the buffer bounds it, not the corpus."""
    for repeat in (1, 4):
        cfg = corpus(work, contexts=contexts and contexts * repeat, repeat=repeat)
        rows = stream_rows(RunDir(cfg.run_dir), 10, 1)
        code = f"""
import torch
from ne.config import ModelConfig
from ne.models import load_model
from ne.rundir.store import RunDir
from ne.lm_sae.config import LMSAEConfig
from ne.lm_sae.train import train_sae
torch.set_num_threads(2)
model = load_model(ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu"))
cfg = LMSAEConfig(architecture="topk", k=32, batch_size=1024, buffer_tokens=16384, loss="ne")
train_sae(model, RunDir({cfg.run_dir!r}), {HOOK!r}, cfg, 10, 0, {rows} // 1024)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        peak = int(out.stdout.strip().splitlines()[-1]) / 1024
        print(
            f"corpus x{repeat}: {rows:,} training tokens, peak RSS {peak:,.0f} MB ({time.perf_counter() - t0:.0f} "
            f"s); holding the activations instead would take {rows * 384 * 4 / 2**20:,.0f} MB"
        )


def sweep(work: Path, coeffs: list[float]) -> None:
    """The NE loss's λ2 on the configs/lm-sae.yaml SAE, seed 0, in process: FVU and L_N per value."""
    from jobs.lm_sae import train_run_sae
    from ne.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "lm-sae.yaml")
    data = corpus(work, contexts=base.data.max_contexts)
    model = load_model(MINILM)
    for coeff in [0.0, *coeffs]:
        train = replace(base.sae.train, loss="ne" if coeff else "none", ne_coeff=coeff or 1.0)
        cfg = replace(
            base,
            run_dir=data.run_dir,
            sae=replace(
                base.sae,
                train=train,
                compare=replace(base.sae.compare, seeds=[]),
                trainer=SAETrainerConfig(num_workers=0),
            ),
        )
        with Clock() as clock:
            info = train_run_sae(RunDir(cfg.run_dir), cfg, model)
        print(
            f"λ2 {coeff:g}: training MSE {info['mse']:.4f}, L_N {info['l_n']:.4f}, L0 {info['l0']:.1f} "
            f"({clock.wall:.0f} s wall, {clock.cpu:.0f} s CPU)",
            flush=True,
        )


def mnist_authors(folder: Path, mnist: Path) -> None:
    """The authors' MNIST SAEs (../shared/data/mechmnistic): per neuron, the mean pairwise cosine distance of its
    first 100 active test examples as neuron embeddings (the paper's Table 3) and as raw hidden activations
    (a - b_dec, no weighting), medians over neurons; and how many of the 64 inputs its encoder row reads (the
    participation ratio, median over live neurons)."""
    import numpy as np

    from ne.compute.embed import cosine_distances, pad_rows
    from ne.mnist import data as mnist_data
    from ne.mnist.eval import first_active
    from ne.mnist.model import MLP, hidden_acts, load_sae

    test = mnist_data.load_mnist("idx", str(mnist), "test")
    mlp = MLP.load(str(folder / "mlp.safetensors"))
    acts = hidden_acts(mlp, test.images)
    for name in ("standard", "ne_loss"):
        sae = load_sae(str(folder / f"sae_{name}.safetensors"), mlp.hidden_size)
        with torch.no_grad():
            lists = first_active(sae.encode(acts), 100)
        x = (acts - sae.b_dec).detach().numpy()
        medians = {}
        for space in ("neuron embeddings", "raw activations"):
            means = []
            for j, idx in enumerate(lists):
                if len(idx) >= 2:
                    h, _ = pad_rows(x, [idx])
                    w = sae.W_enc[[j]].detach() if space == "neuron embeddings" else None
                    d = cosine_distances(h, w, device="cpu").numpy()[0, : len(idx), : len(idx)]
                    means.append(d[np.triu_indices(len(idx), 1)].mean())
            medians[space] = float(np.median(means))
        w2 = sae.W_enc.detach().square()
        live = torch.tensor([len(idx) > 0 for idx in lists])
        ratio = float((w2.sum(1) ** 2 / w2.square().sum(1))[live].median())
        print(
            f"authors' {name} SAE: median mean distance {medians['neuron embeddings']:.3f} as neuron embeddings, "
            f"{medians['raw activations']:.3f} as raw activations; encoder rows read {ratio:.1f} of 64 inputs"
        )


def encoders(runs: list[str]) -> None:
    """For each run's SAE: the input dimension that is the largest weight of the most encoder rows, how many, and
    that dimension's spread over the run's held-out tokens against the median dimension's."""
    import collections

    from safetensors.torch import load_file

    from ne.compute.harvest import pad_batch
    from ne.config import from_dict
    from ne.lm_sae.eval import eval_contexts
    from ne.models.hooks import read_hook

    for path in runs:
        run = RunDir(path)
        cfg = from_dict(RunConfig, run.manifest()["config"])
        W = load_file(run.path(schema.SAE_DIR, "sae_weights.safetensors"))["W_enc"].T  # [d_sae, d_in]
        dim, count = collections.Counter(W.square().argmax(1).tolist()).most_common(1)[0]
        model = load_model(cfg.model)
        contexts = list(eval_contexts(run, cfg.sae.eval.holdout_every))[:64]
        rows = []
        for i in range(0, len(contexts), 16):
            tokens, mask = pad_batch([t for _, t in contexts[i : i + 16]], model.pad_token_id)
            real = mask.bool().clone()
            real[:, : int(model.bos_token_id is not None)] = False
            rows.append(read_hook(model, tokens, mask, cfg.sae.train_hook)[real])
        std = torch.cat(rows).std(0)
        print(
            f"{path}: dimension {dim} is the largest weight of {count} of {len(W)} encoder rows; its std over "
            f"held-out tokens is {std[dim]:.2f} (rank {int((std > std[dim]).sum()) + 1} of {len(std)}; median "
            f"{std.median():.2f})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--sweep", type=float, nargs="+")
    p.add_argument("--encoders", nargs="+", metavar="RUN", help="where each run's SAE encoder reads")
    p.add_argument("--mnist", action="store_true", help="the authors' MNIST SAEs: NE-space vs raw-space distances")
    p.add_argument(
        "--data",
        default=os.environ.get("NE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="folder with mechmnistic/ and mnist/ (--mnist; default $NE_DATA_DIR or ../shared/data)",
    )
    p.add_argument("--steps", type=int, default=30, help="optimiser steps timed per setting (--speed)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens each Ray Train job trains on (--speed)")
    p.add_argument("--contexts", type=int, help="contexts of the smaller corpus (--memory; default: all of pydoc)")
    p.add_argument("--work", help="where corpora are tokenised (default: a temporary directory)")
    args = p.parse_args()
    os.environ.setdefault("NE_RAY_NUM_CPUS", str(os.cpu_count()))
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="ne-lm-sae-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.speed:
        cfg = corpus(work)
        model = load_model(MINILM)
        streaming_vs_forward(RunDir(cfg.run_dir), model, LMSAEConfig(batch_size=1024, buffer_tokens=16384), 40)
        ne_loss_cost(model, RunDir(cfg.run_dir), args.steps)
        workers(cfg, args.tokens)
    if args.memory:
        peak_memory(work, args.contexts)
    if args.sweep:
        sweep(work, args.sweep)
    if args.encoders:
        encoders(args.encoders)
    if args.mnist:
        mnist_authors(Path(args.data) / "mechmnistic", Path(args.data) / "mnist")


if __name__ == "__main__":
    main()
