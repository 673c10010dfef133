"""Similar-features index: build time, recall@k against exact search and single-query latency.

    python benchmarks/index.py                  # 200,000 vectors of d 768 (GPT2-small's d_model)
    python benchmarks/index.py --n 50000 --d 384
    python benchmarks/index.py --run runs/demo   # a real run's vectors (after `ne cluster`), and HNSW too
    python benchmarks/index.py --run runs/demo --vectors neuron

Vectors are a mixture of Gaussians (features cluster), L2-normalised, as the index stores them. Queries
are new points from the same mixture, one at a time, as `ne similar` and the viewer send them. With
`--run`, the vectors are a real run's (as `ne index` builds them, `--vectors` of them) and the queries are
sampled from them; real vectors are far harder for approximate search than the mixture, so that is the figure
to quote. HNSW32 (efConstruction 80) is searched at the smallest efSearch (a power of two) reaching recall 0.95.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.build import build_index, recall_at_k  # noqa: E402
from ne.compute.embed import unit_rows  # noqa: E402
from ne.config import IndexConfig  # noqa: E402


def mixture(n: int, d: int, centers: np.ndarray, rng) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return unit_rows(x)


def run_vectors(url: str, vectors: str) -> np.ndarray:
    from index.build import central_vectors
    from ne.rundir.store import RunDir

    run = RunDir(url)
    m = run.require_manifest()
    gated = m.get("config", {}).get("model", {}).get("gated_embedding", "concat")
    layers = m["stages"]["cluster"]["info"]["layers"]
    return np.concatenate([central_vectors(run, layer, vectors, gated)[1] for layer in layers])


def hnsw(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, target: float = 0.95):
    """(build s, efSearch, recall, latencies) of HNSW32 at the smallest efSearch reaching `target`."""
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(x)
    build = time.perf_counter() - start
    ef = 16
    while True:
        index.hnsw.efSearch = ef
        recall = recall_at_k(index.search(queries, k)[0], truth)
        if recall >= target or ef >= 4096:
            return build, ef, recall, latencies_ms(index, queries, k)
        ef *= 2


def latencies_ms(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        out.append(1000 * (time.perf_counter() - start))
    return np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", help="benchmark a run directory's vectors instead")
    p.add_argument("--vectors", default=IndexConfig().vectors, help="with --run: which of its vectors")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.run:
        x, source = run_vectors(args.run, args.vectors), f"{args.vectors} vectors of {args.run}"
        queries = x[rng.choice(len(x), min(args.queries, len(x)), replace=False)]
    else:
        centers = rng.normal(size=(max(10, args.n // 100), args.d)).astype(np.float32)
        x, source = mixture(args.n, args.d, centers, rng), "a Gaussian mixture"
        queries = mixture(args.queries, args.d, centers, rng)
    args.n = len(x)
    print(
        f"{len(x):,} vectors of d {x.shape[1]} ({source}), {len(queries)} single queries, k={args.k}, "
        f"{args.threads} threads"
    )

    start = time.perf_counter()
    exact, _ = build_index(x, IndexConfig(exact_below=args.n + 1))
    t_exact = time.perf_counter() - start
    truth = exact.search(queries, args.k)[0]
    start = time.perf_counter()
    ivf, info = build_index(x, IndexConfig(exact_below=0, recall_k=args.k))
    t_ivf = time.perf_counter() - start
    recall = recall_at_k(ivf.search(queries, args.k)[0], truth)
    lat_exact, lat_ivf = latencies_ms(exact, queries, args.k), latencies_ms(ivf, queries, args.k)
    print(
        f"Flat (exact):      build {t_exact:6.2f} s, p50 {np.median(lat_exact):7.3f} ms, "
        f"p95 {np.percentile(lat_exact, 95):7.3f} ms per query"
    )
    print(
        f"{info['type']} nprobe {info['nprobe']}: build {t_ivf:6.2f} s (incl. recall tuning), "
        f"p50 {np.median(lat_ivf):7.3f} ms, p95 {np.percentile(lat_ivf, 95):7.3f} ms per query"
    )
    print(f"recall@{args.k} vs exact: {recall:.4f} on these queries, {info['recall']:.4f} measured at build time")
    print(f"speed-up of the p50 query over exact: {np.median(lat_exact) / np.median(lat_ivf):.1f}x")
    if args.run:
        build, ef, recall_h, lat_h = hnsw(x, queries, truth, args.k)
        print(
            f"HNSW32 efSearch {ef}: build {build:6.2f} s, p50 {np.median(lat_h):7.3f} ms, recall@{args.k} "
            f"{recall_h:.4f}; p50 {np.median(lat_h) / np.median(lat_exact):.2f}x Flat's"
        )


if __name__ == "__main__":
    main()
