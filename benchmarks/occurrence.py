"""The occurrence pass's cost: tokens/s against one plain forward pass, bytes per million tokens, peak memory at
two corpus sizes, and a projection to GPT2-small × 10k contexts and Llama-3-8B × 10M tokens.

    python benchmarks/occurrence.py runs/demo                  # CPU, the run's own held-out contexts
    python benchmarks/occurrence.py runs/demo --device cuda    # where a GPU is lent
    python benchmarks/occurrence.py runs/demo --skip-memory    # without the two subprocess runs

Speed: the same held-out contexts through `model.run` alone (the forward pass with every layer's h and
activations, as the harvest runs it) and through `part_occurrences` (that forward pass, the firing test and the
cluster assignment), alternated `--repeats` times; the medians' ratio is the cost (target <= 1.5). Memory: the
whole `ne occurrence` stage (occurrences and co-activation, in process) in a subprocess on a view of the run
(upstream folders linked, never written), at `--contexts` and 4 × that many held-out contexts; peak RSS of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne.compute.harvest import batches  # noqa: E402
from ne.explain import Explainer  # noqa: E402
from ne.occurrence import heldout_parts, part_occurrences, read_heldout  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402

GPT2_SMALL = {"units": 12 * 3072, "tokens": 10_000 * 127, "d_model": 768}
LLAMA3_8B = {"units": 32 * 14336, "tokens": 10_000_000, "d_model": 4096}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(run_dir: str, n_contexts: int, repeats: int, frac: float | None, device: str, batch_size: int) -> dict:
    from ne.models import load_units
    from ne.rundir.reader import RunData

    run = RunDir(run_dir)
    cfg = RunData(run_dir).config()  # each setting as the stage that made what is read ran with it
    cfg.model.device = device
    model = load_units(cfg)
    start = time.perf_counter()
    explainer = Explainer.load(run_dir, model, frac if frac is not None else cfg.occurrence.frac)
    for layer in explainer.layers:
        explainer.clusters(layer)
    load_s = time.perf_counter() - start
    contexts = [c for p in heldout_parts(run) for c in read_heldout(run, p)][:n_contexts]
    n_tokens = sum(len(t) - int(model.bos_token_id is not None) for _, t in contexts)

    def forward() -> None:
        with torch.inference_mode():
            for _, tokens, mask in batches(contexts, batch_size, model.pad_token_id):
                model.run(tokens.to(model.device), mask.to(model.device), explainer.layers)

    tables = {}

    def occurrences() -> None:
        tables.update(part_occurrences(explainer, contexts, batch_size))

    forward()  # warm-up
    times: dict[str, list[float]] = {"forward": [], "pass": []}
    for _ in range(repeats):
        for name, fn in (("forward", forward), ("pass", occurrences)):
            sync(model.device)
            t = time.perf_counter()
            fn()
            sync(model.device)
            times[name].append(time.perf_counter() - t)
    rows = sum(t.num_rows for t in tables.values())
    nbytes = 0
    for t in tables.values():
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd", write_page_checksum=True, row_group_size=65_536)
        nbytes += buf.tell()
    fwd, occ = float(np.median(times["forward"])), float(np.median(times["pass"]))
    units = int(sum(len(explainer.max_act[layer]) for layer in explainer.layers))
    return {
        "contexts": len(contexts),
        "tokens": n_tokens,
        "forward_s": fwd,
        "pass_s": occ,
        "ratio": occ / fwd,
        "forward_tok_s": n_tokens / fwd,
        "pass_tok_s": n_tokens / occ,
        "rows": rows,
        "rows_per_token": rows / n_tokens,
        "bytes_per_mtok": nbytes / n_tokens * 1e6,
        "bytes_per_row": nbytes / max(rows, 1),
        "units": units,
        "load_s": load_s,
        "frac": frac if frac is not None else cfg.occurrence.frac,
    }


def view_of(run_dir: str, work: Path) -> Path:
    """A run directory whose upstream outputs are links to `run_dir`'s and whose manifest lacks the occurrence and
    co-activation stages: the stage runs in it from scratch and writes only there."""
    from ne.rundir.graph import GRAPH

    own = {out.split("/")[0] for s in ("occurrence", "coactivation") for out in GRAPH[s].outputs}
    view = work / "run"
    view.mkdir(parents=True)
    for entry in Path(run_dir).iterdir():
        if entry.name in own or entry.name in ("manifest.json", ".lock"):
            continue
        os.symlink(entry.resolve(), view / entry.name)
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    for s in ("occurrence", "coactivation"):
        manifest["stages"].pop(s, None)
    (view / "manifest.json").write_text(json.dumps(manifest))
    return view


def peak_memory(run_dir: str, n_contexts: int, work: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `ne occurrence` in process over n_contexts held-out contexts."""
    view = view_of(run_dir, work / f"n{n_contexts}")
    manifest = json.loads((view / "manifest.json").read_text())
    config = work / f"n{n_contexts}.json"
    cfg = manifest["config"]
    cfg.update(run_dir=str(view))
    cfg.setdefault("harvest", {})["num_workers"] = 0
    cfg.setdefault("occurrence", {})["contexts"] = n_contexts
    config.write_text(json.dumps(cfg))
    code = (
        "import resource, sys, time; from ne.cli import main; t = time.perf_counter(); "
        f"rc = main(['occurrence', '--config', {str(config)!r}]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t); "
        "sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    peak, seconds = next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1:]
    return float(peak), float(seconds)


def projection(s: dict, pairs_per_token: float | None) -> list[str]:
    """Rows, bytes and time for two larger runs, from this run's per-unit firing rate and the pass's cost."""
    rate = s["rows_per_token"] / s["units"]
    lines = [
        f"firing rate at frac {s['frac']}: {rate:.3%} of units per token; {s['bytes_per_row']:.1f} B per "
        f"occurrence; the pass costs {s['ratio']:.2f} × one forward pass"
    ]
    for name, m in (("GPT2-small × 10k contexts", GPT2_SMALL), ("Llama-3-8B × 10M tokens", LLAMA3_8B)):
        rows = rate * m["units"] * m["tokens"]
        line = (
            f"{name}: {m['tokens']:,} tokens, {rate * m['units']:.0f} occurrences per token, {rows:.3g} rows, "
            f"{rows * s['bytes_per_row'] / 1e9:.1f} GB of occurrences; time {s['ratio']:.2f} × its forward pass"
        )
        if pairs_per_token is not None:
            line += (
                f"; co-activation counts at most {pairs_per_token:.0f} pairs per token: "
                f"{pairs_per_token * m['tokens']:.3g} pair instances"
            )
        lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frac", type=float, default=None, help="default: the run's occurrence.frac")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    s = speed(args.run_dir, args.contexts, args.repeats, args.frac, args.device, args.batch_size)
    print(
        f"{args.run_dir}: {s['contexts']} held-out contexts, {s['tokens']:,} tokens, {s['units']:,} units, frac "
        f"{s['frac']}, device {args.device}, batch {args.batch_size}, {args.repeats} repeats (medians)"
    )
    print(f"  forward pass alone         {s['forward_tok_s']:>9,.0f} tokens/s")
    print(
        f"  occurrence pass            {s['pass_tok_s']:>9,.0f} tokens/s   = {s['ratio']:.2f} × the forward pass's "
        "time (target <= 1.5)"
    )
    print(
        f"  occurrences                {s['rows_per_token']:>9.1f} per token, {s['bytes_per_mtok'] / 2**20:,.1f} MiB "
        f"per million tokens ({s['bytes_per_row']:.1f} B each)"
    )
    print(f"  cluster vectors loaded in  {s['load_s']:>9.1f} s (once per worker)")
    run = RunDir(args.run_dir)
    co_info = run.manifest()["stages"].get("coactivation", {}).get("info", {})
    cap = co_info.get("max_per_token")
    if not args.skip_memory:
        work = Path(tempfile.mkdtemp(prefix="ne-occ-bench"))
        try:
            for n in (args.contexts, 4 * args.contexts):
                peak, seconds = peak_memory(args.run_dir, n, work)
                print(
                    f"  whole stage, {n:>4} contexts  peak RSS {peak:,.0f} MB, {seconds:.0f} s (occurrences and "
                    "co-activation, in process)"
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for line in projection(s, None if cap is None else cap * (cap - 1)):
        print("  " + line)
    print(f"  (maximum RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB)")


if __name__ == "__main__":
    main()
