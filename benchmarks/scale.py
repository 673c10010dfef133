"""The pipeline at Llama-3-8B's layer shape on this CPU, and what a full-size run would take.

    python benchmarks/scale.py --work /tmp/scale            # 2 random layers, d_model 4096, d_mlp 14336, 64 contexts
    python benchmarks/scale.py --work /tmp/scale --flat     # cluster-stage peak RSS at d_mlp and 4 × d_mlp

The default mode builds a random Llama-shaped model (RMSNorm, SwiGLU, GQA; GPT-2's BPE, offline), runs every
stage of `ne run` in its own process (in-process harvest and cluster, so that a process's peak RSS is the
stage's), then `ne view`'s reads and `ne run` itself, which finds every stage done. Per stage it prints
seconds, peak RSS and bytes on disk (per example, per h row); then how far float16 or bfloat16 h moves the
cosine distances from float32, and the projection to Llama-3-8B and GPT2-small × 10M tokens.

`--flat` builds two synthetic harvested runs (no model: examples, h rows and gated weights written directly)
that differ only in d_mlp, 4× apart, and runs the cluster stage on each with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA3_8B = {"name": "Llama-3-8B", "layers": 32, "d_model": 4096, "d_mlp": 14336, "params": 8.03e9}
GPT2_SMALL = {"name": "GPT2-small", "layers": 12, "d_model": 768, "d_mlp": 3072, "params": 124e6}
TOKENS = 10_000_000
GPU_FLOPS = 0.4 * 989e12
"""Assumed sustained GPU throughput for the projection: 40% of an H100's dense bf16 peak (not measured here)."""


def python(code: str, env: dict | None = None) -> tuple[float, float, str]:
    """Run `code` in a fresh interpreter: (seconds, peak RSS in MB, output tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"stage failed:\n{out[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out


def build_model(path: Path, d_model: int, d_mlp: int, layers: int) -> None:
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from ne.models.tokenizers import gpt2_tokenizer
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size={d_model}, intermediate_size={d_mlp}, num_hidden_layers={layers},
                  num_attention_heads={d_model // 128}, num_key_value_heads={max(1, d_model // 512)},
                  max_position_embeddings=8192, vocab_size=50257, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
with torch.no_grad():  # random RMSNorm weights, so that folding them matters as in a trained model
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
model.save_pretrained({str(path)!r})
gpt2_tokenizer().save_pretrained({str(path)!r})
"""
    python(code)


def folder_stats(run: Path, rel: str) -> tuple[int, int]:
    """(bytes on disk, rows) of a Parquet folder or a file."""
    import pyarrow.parquet as pq

    path = run / rel
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    rows = sum(pq.read_metadata(p).num_rows for p in files if p.suffix == ".parquet")
    return size, rows


def distance_error(run_dir: str, max_neurons: int) -> dict[str, float]:
    """Largest |cosine distance(h rounded) − cosine distance(float32 h)| over the run's neurons, for the
    concat and gate embeddings and raw h, with h rounded to float16 and to bfloat16."""
    import torch

    from ne import schema
    from ne.compute.embed import cosine_distances
    from ne.rundir.h import load_h
    from ne.rundir.store import RunDir
    from ne.rundir.weights import read_layer_weights

    run = RunDir(run_dir)
    worst: dict[str, float] = {}
    for layer in run.layers(schema.EXAMPLES_DIR):
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "h_id"]).to_pandas()
        layer_h, weights = load_h(run, layer), read_layer_weights(run, layer)
        pairs = [(n, g.h_id.to_numpy()) for n, g in ex.groupby("neuron") if len(g) > 1][:max_neurons]
        for n, ids in pairs:
            h = torch.from_numpy(layer_h.take(ids))[None]
            for mode in ("concat", "gate", "raw"):
                w = None if mode == "raw" else torch.from_numpy(weights.unit_weights([n], mode))
                ref = cosine_distances(h, w, device="cpu")
                for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
                    got = cosine_distances(h.to(dtype).float(), w, device="cpu")
                    key = f"{mode}/{name}"
                    worst[key] = max(worst.get(key, 0.0), float((got - ref).abs().max()))
    return worst


def fp16_h_bytes(run: Path) -> float:
    """Bytes per h row on disk had the run stored float16 (its h parts re-encoded, as the harvest writes)."""
    import io

    import pyarrow.parquet as pq

    from ne import schema

    size = rows = 0
    for part in (run / "h").rglob("*.parquet"):
        table = pq.read_table(part)
        d = table.schema.field("h").type.list_size
        table = table.cast(schema.h_schema(d, "float16"))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        size, rows = size + len(buf.getvalue()), rows + table.num_rows
    return size / max(rows, 1)


def full_run(args) -> None:
    work = Path(args.work)
    model_dir = work / f"llama-{args.d_model}x{args.d_mlp}"
    if not (model_dir / "config.json").exists():
        print(f"building a random Llama-shaped model in {model_dir} ...", flush=True)
        build_model(model_dir, args.d_model, args.d_mlp, args.layers)
    run_dir = work / "run"
    cfg = {
        "run_dir": str(run_dir),
        "model": {"backend": "hf", "name": str(model_dir), "device": "cpu", "dtype": "float32"},
        "data": {"source": "pydoc", "n_ctx": 128, "max_contexts": args.contexts, "contexts_per_part": 16},
        "harvest": {"k": 100, "frac": 0.75, "batch_size": 8, "num_workers": 0, "h_dtype": "float32"},
        "cluster": {"neurons_per_task": 256},
        "index": {"exact_below": 1_000_000},  # Flat: an IVF over ~10^5 vectors of 8192 takes > 15 min on 2 cores
    }
    config = work / "scale.yaml"
    config.write_text(yaml.safe_dump(cfg))
    load = f"from ne.config import load_config; cfg = load_config({str(config)!r})"
    stages = [
        ("harvest", f"{load}; from jobs.harvest import run_harvest; print(run_harvest(cfg).describe())"),
        (
            "cluster",
            f"{load}; from jobs.cluster import run_cluster; print(run_cluster(cfg, in_process=True).describe())",
        ),
        ("index", f"{load}; from index.build import run_index; print(run_index(cfg).describe())"),
        (
            "view",
            f"import sys; sys.argv = ['viewer.py', {str(run_dir)!r}, '--neurons', '20']; "
            "sys.path.insert(0, 'benchmarks'); import viewer; viewer.main()",
        ),
    ]
    measured = {}
    for name, code in stages:
        if name in args.redo:
            code = code.replace("(cfg", f"(cfg, force=[{name!r}]" if name != "harvest" else "(cfg")
        elif name != "view" and (run_dir / "manifest.json").exists() and _done(run_dir, name):
            print(f"{name}: already done in {run_dir}; remove it to measure again")
            continue
        seconds, rss, out = python(code)
        measured[name] = (seconds, rss)
        (work / "measured.json").write_text(json.dumps({**_load(work), **measured}))
        print(f"--- {name}: {seconds:.1f} s, peak RSS {rss:,.0f} MB\n{_tail(out, 6)}", flush=True)
    measured = {**_load(work), **measured}
    serve_check(run_dir)
    out = subprocess.run(
        [sys.executable, "-m", "ne.cli", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    print(f"--- ne run --config {config} (every stage done: it checks and skips them)\n{_tail(out.stdout, 8)}")
    report(run_dir, measured, args)


def _done(run_dir: Path, name: str) -> bool:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    names = {"harvest": ["contexts", "weights", "maxima", "examples"]}.get(name, [name])
    return all(stages.get(n, {}).get("status") == "done" for n in names)


def _load(work: Path) -> dict:
    path = work / "measured.json"
    return {k: tuple(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def _tail(text: str, n: int) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("harvest ", "cluster:", "["))]
    return "\n".join("    " + ln for ln in lines[-n:])


def serve_check(run_dir: Path, port: int = 8765) -> None:
    """`ne view RUN`: the server starts and answers; the neuron page's reads are timed by the view stage."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ne.cli", "view", str(run_dir), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    print(
                        f"--- ne view {run_dir}: serving at port {port}, health check {r.status} "
                        f"{r.read().decode()[:20]!r}"
                    )
                    return
            except OSError:
                time.sleep(1)
        print(f"--- ne view {run_dir}: no answer within 60 s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ne view` and the Streamlit server it started
        proc.wait()


def report(run_dir: Path, measured: dict, args) -> None:
    from ne import schema

    manifest = json.loads((run_dir / "manifest.json").read_text())
    ex_bytes, n_examples = folder_stats(run_dir, schema.EXAMPLES_DIR)
    h_bytes, n_h = folder_stats(run_dir, schema.H_DIR)
    cl_bytes, _ = folder_stats(run_dir, schema.CLUSTERS_DIR)
    dn_bytes, _ = folder_stats(run_dir, schema.DENDROGRAMS_DIR)
    ctx_bytes, _ = folder_stats(run_dir, schema.CONTEXTS_DIR)
    w_bytes, _ = folder_stats(run_dir, "weights")
    ix_bytes, _ = folder_stats(run_dir, schema.INDEX_DIR)
    h16 = fp16_h_bytes(run_dir)
    neurons = args.layers * args.d_mlp
    tokens = args.contexts * 128
    index = manifest["stages"]["index"]["info"]
    print(f"\n=== {run_dir}: {args.layers} layers × d_mlp {args.d_mlp}, d_model {args.d_model}, {tokens:,} tokens")
    print(f"{'stage':<8} {'seconds':>8} {'peak RSS MB':>12}  disk")
    disk = {
        "harvest": f"examples {ex_bytes / max(n_examples, 1):,.0f} B/example ({n_examples:,}); h "
        f"{h_bytes / max(n_h, 1):,.0f} B/row float32, {h16:,.0f} float16 ({n_h:,} rows); contexts "
        f"{ctx_bytes / tokens:.2f} B/token; weights {w_bytes / 2**20:,.0f} MiB",
        "cluster": f"clusters {cl_bytes / max(n_examples, 1):.1f} B/example, dendrograms "
        f"{dn_bytes / max(n_examples, 1):.1f} B/example",
        "index": f"{ix_bytes / max(index['n_vectors'], 1):,.0f} B/vector ({index['n_vectors']:,} vectors, "
        f"d {index['d']})",
        "view": "reads only",
    }
    for name in ("harvest", "cluster", "index", "view"):
        seconds, rss = measured.get(name, (float("nan"), float("nan")))
        print(f"{name:<8} {seconds:>8.1f} {rss:>12,.0f}  {disk[name]}")
    err = distance_error(str(run_dir), args.check_neurons)
    print(
        "\nlargest cosine-distance change from float32 h (all neurons with 2+ examples"
        f"{'' if args.check_neurons >= neurons else f', first {args.check_neurons} per layer'}):"
    )
    for mode in ("concat", "gate", "raw"):
        print(f"  {mode:<6} float16 {err[f'{mode}/float16']:.2e}   bfloat16 {err[f'{mode}/bfloat16']:.2e}")
    print(f"  bound for float16: 2 × 2^-11 = {2 * 2**-11:.2e} (each element's relative rounding error ≤ 2^-11)")
    harvest_s = measured.get("harvest", (float("nan"),))[0]
    project(
        n_h / max(n_examples, 1),
        ex_bytes / max(n_examples, 1),
        h16 / args.d_model,
        (cl_bytes + dn_bytes) / max(n_examples, 1),
        ctx_bytes / tokens,
        index["n_vectors"] / neurons,
        tokens / harvest_s,
    )


def project(h_per_example, b_example, b_h16_per_dim, b_cluster, b_token, clusters_per_neuron, cpu_tokens_s) -> None:
    """Disk, RAM and GPU time for 10M tokens, all layers, from the per-unit figures measured above."""
    print(f"\n=== projection to {TOKENS:,} tokens, all layers, k=100 (a long corpus gives every neuron its k)")
    print(
        "| model | neurons | examples | disk: examples + h + clusters | contexts | weights file | harvest RAM per "
        "worker (host) | cluster RAM | index RAM | GPU time, 2 passes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, gated, per_part, tasks in ((LLAMA3_8B, True, 128, 64), (GPT2_SMALL, False, 1024, 256)):
        neurons, d = m["layers"] * m["d_mlp"], m["d_model"]
        examples = neurons * 100
        h_bytes = 2 if d >= 2048 else 4  # harvest.h_dtype auto
        h_row = b_h16_per_dim * d * h_bytes / 2
        disk = examples * (b_example + b_cluster + h_row)  # one h row per example: no sharing assumed
        weights = m["layers"] * m["d_mlp"] * d * 4 * (2 if gated else 1)
        host = m["layers"] * per_part * 128 * d * h_bytes
        cluster = 4096 * 2**20 + tasks * 100 * d * 16
        index = neurons * clusters_per_neuron * d * (2 if gated else 1) * 4
        flops = 2 * 2 * m["params"] * TOKENS  # two passes, 2 FLOPs per parameter per token
        print(
            f"| {m['name']} | {neurons:,} | {examples / 1e6:.1f}M | {disk / 1e9:,.0f} GB | "
            f"{TOKENS * b_token / 1e6:,.0f} MB | {weights / 1e9:.1f} GB | {host / 1e9:.1f} GB + model "
            f"(contexts_per_part {per_part}) | {cluster / 1e9:.1f} GB + {tasks * 100 * d * 16 / 1e9:.2f} GB per "
            f"extra task (neurons_per_task {tasks}) | {index / 1e9:.1f} GB | {flops / GPU_FLOPS / 3600:.3g} GPU-h |"
        )
    print(
        f"Disk: one h row per example (the {TOKENS // 10**6}M-token corpus spreads each neuron's first k examples "
        f"over many contexts; this run shared rows at {h_per_example:.2f} per example); h in float16 from d_model "
        f"2048 (harvest.h_dtype auto), float32 below. Harvest RAM: the worst case of a part's h rows (every "
        "position of every context), all layers in one pass; the model itself sits on the GPU(s). Cluster RAM: "
        "cluster.h_memory_mb (4096) plus one task's working set. Index RAM: its float32 vectors, "
        f"{clusters_per_neuron:.1f} clusters per neuron as measured here. GPU time: an estimate, two forward "
        f"passes at {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained (no GPU in this session; this CPU harvested "
        f"{cpu_tokens_s:.0f} tokens/s)."
    )


def flat(args) -> None:
    """Cluster-stage peak RSS for the same settings at d_mlp and 4 × d_mlp (synthetic harvested runs)."""
    work = Path(args.work)
    rows = []
    for d_mlp in (args.d_mlp, 4 * args.d_mlp):
        run_dir = work / f"flat-{d_mlp}"
        code = (
            f"import sys; sys.path.insert(0, 'benchmarks'); import scale; scale.synthetic_run({str(run_dir)!r}, "
            f"{args.d_model}, {d_mlp}, {args.flat_k}, {args.flat_pool})"
        )
        if not (run_dir / "manifest.json").exists():
            python(code)
        cfg = {"run_dir": str(run_dir), "cluster": {"neurons_per_task": 256, "h_memory_mb": args.h_memory_mb}}
        config = work / f"flat-{d_mlp}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        seconds, rss, out = python(
            f"from ne.config import load_config; from jobs.cluster import run_cluster; "
            f"print(run_cluster(load_config({str(config)!r}), force=['cluster'], "
            f"in_process=True).describe())"
        )
        rows.append((d_mlp, seconds, rss))
        print(f"d_mlp {d_mlp:>6}: cluster stage {seconds:6.1f} s, peak RSS {rss:,.0f} MB", flush=True)
    (d0, _, r0), (d1, _, r1) = rows
    print(
        f"d_mlp ×{d1 / d0:.0f} → peak RSS ×{r1 / r0:.2f} (d_model {args.d_model}, k {args.flat_k}, "
        f"cluster.h_memory_mb {args.h_memory_mb}, neurons_per_task 256; h rows {args.flat_pool:,} per layer)"
    )


def synthetic_run(url: str, d_model: int, d_mlp: int, k: int, pool: int) -> None:
    """One harvested gated layer: k examples per neuron over `pool` shared h rows (float16), random weights."""
    import pyarrow as pa
    import torch

    from ne import schema
    from ne.config import RunConfig
    from ne.rundir.store import RunDir
    from ne.rundir.weights import weights_file
    from tests.viewer.viewer_run import stage

    run, cfg, rng = RunDir(url), RunConfig(run_dir=url), np.random.default_rng(0)
    n_ctx = 128
    h_ids = np.sort(rng.choice(pool * 4, pool, replace=False)) + n_ctx
    with stage(run, "contexts", cfg):
        ctx = np.unique(h_ids // n_ctx)
        run.write_parquet(
            f"{schema.CONTEXTS_DIR}/{schema.part_name(0)}",
            pa.table({"ctx_id": ctx, "doc_id": ctx, "tokens": [[1] * n_ctx] * len(ctx)}, schema=schema.CONTEXTS),
        )
    with stage(run, "weights", cfg, layers=[0]):
        g = torch.randn(d_model, d_mlp)
        u = torch.randn(d_model, d_mlp)
        run.write_bytes(
            schema.weights_path(0),
            weights_file({"W_gate": g, "b_gate": torch.zeros(d_mlp), "W_up": u, "b_up": torch.zeros(d_mlp)}),
        )
        del g, u
    with stage(run, "maxima", cfg, layers=[0]):
        run.write_parquet(
            schema.MAXIMA,
            pa.table(
                {
                    "layer": np.zeros(d_mlp, np.int16),
                    "neuron": np.arange(d_mlp, dtype=np.int32),
                    "max_act": np.ones(d_mlp, np.float32),
                },
                schema=schema.MAXIMA_SCHEMA,
            ),
        )
    with stage(run, "examples", cfg, layers=[0], rows=d_mlp * k):
        per_part = 4096
        for i, lo in enumerate(range(0, d_mlp, per_part)):
            n = min(per_part, d_mlp - lo)
            spread = (rng.integers(0, pool, n)[:, None] + np.arange(k) * (pool // k)) % pool  # k distinct rows each
            hid = np.sort(h_ids[spread], axis=1).ravel()
            table = pa.table(
                {
                    "layer": np.zeros(n * k, np.int16),
                    "neuron": np.repeat(np.arange(lo, lo + n, dtype=np.int32), k),
                    "rank": np.tile(np.arange(k, dtype=np.int16), n),
                    "ctx_id": hid // n_ctx,
                    "pos": (hid % n_ctx).astype(np.int16),
                    "act": np.ones(n * k, np.float32),
                    "window_start": (hid % n_ctx).astype(np.int16),
                    "window": [[1.0]] * (n * k),
                    "h_id": hid,
                },
                schema=schema.EXAMPLES,
            )
            run.write_parquet(
                f"{schema.layer_dir(schema.EXAMPLES_DIR, 0)}/{schema.part_name(i)}", table, row_group_size=64 * k
            )
        rows_per_part = 16384
        for i, lo in enumerate(range(0, pool, rows_per_part)):
            ids = h_ids[lo : lo + rows_per_part]
            h = rng.normal(size=(len(ids), d_model)).astype(np.float16)
            run.write_parquet(
                f"{schema.layer_dir(schema.H_DIR, 0)}/{schema.part_name(i)}",
                pa.table(
                    {
                        "h_id": ids,
                        "ctx_id": ids // n_ctx,
                        "pos": (ids % n_ctx).astype(np.int16),
                        "h": pa.FixedSizeListArray.from_arrays(pa.array(h.ravel()), d_model),
                    },
                    schema=schema.h_schema(d_model, "float16"),
                ),
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/ne-scale", help="where the model and run directories go")
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-mlp", type=int, default=14336)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--check-neurons", type=int, default=100_000, help="neurons per layer in the float16 check")
    p.add_argument("--redo", action="append", default=[], help="measure this stage (cluster, index) again")
    p.add_argument("--flat", action="store_true", help="cluster-stage peak RSS at d_mlp and 4 × d_mlp instead")
    p.add_argument("--flat-k", type=int, default=20, help="with --flat: examples per neuron")
    p.add_argument("--flat-pool", type=int, default=60_000, help="with --flat: distinct h rows of the layer")
    p.add_argument("--h-memory-mb", type=int, default=256, help="with --flat: cluster.h_memory_mb")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    flat(args) if args.flat else full_run(args)


if __name__ == "__main__":
    main()
