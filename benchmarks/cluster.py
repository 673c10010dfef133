"""Cluster-stage throughput, and the measurements behind the default cut threshold.

    python benchmarks/cluster.py                      # neurons/s: batched path vs a naive per-neuron loop
    python benchmarks/cluster.py --thresholds         # ARI vs threshold on planted features
    python benchmarks/cluster.py --thresholds --run runs/demo   # ... and cluster statistics on a real run
    python benchmarks/cluster.py --cuts               # ARI of the fixed and per-neuron cuts per difficulty level
    python benchmarks/cluster.py --cuts --sensitivity # ... and of the per-neuron cut with other settings
    python benchmarks/cluster.py --stage              # the whole cluster job, reads included, at GPT2-small scale

Throughput uses GPT2-small's shape (d_model 768, 100 examples per neuron) and one torch thread per
process, as a Ray task has; the projection for all 36,864 GPT2-small neurons assumes one such process per
core (`--cores`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne.compute.cluster import cluster_examples, cluster_neuron  # noqa: E402
from ne.compute.embed import cosine_distances, neuron_distances, pad_rows  # noqa: E402
from ne.compute.metrics import analyse_neurons  # noqa: E402
from ne.config import ClusterConfig  # noqa: E402

GPT2_NEURONS = 12 * 3072


def synthetic(n_neurons: int, n_examples: int, d_model: int, seed: int = 0):
    """A pool of h rows shared by neurons (as real example positions are) and one w per neuron."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(20_000, d_model)).astype(np.float32) + rng.normal(size=d_model).astype(np.float32)
    members = [rng.choice(len(pool), n_examples, replace=False) for _ in range(n_neurons)]
    w = rng.normal(size=(n_neurons, d_model)).astype(np.float32)
    return pool, members, w


def naive(pool, members, w, threshold: float) -> float:
    start = time.perf_counter()
    for ix, w_j in zip(members, w):
        e = pool[ix].astype(np.float64) * w_j
        fcluster(linkage(pdist(e, "cosine"), "average"), t=threshold, criterion="distance")
    return time.perf_counter() - start


def batched(pool, members, w, cfg: ClusterConfig, work: str) -> float:
    """`work`: `fixed` (the naive loop's work: distances, linkage, the cut at cfg.threshold, central examples),
    `per-neuron` (the same with each neuron's own cut) or `stage` (the whole stage's work at cfg's cut: both
    spaces at both cuts, central examples, every metric)."""
    start = time.perf_counter()
    for lo in range(0, len(members), cfg.neurons_per_task):
        chunk = members[lo : lo + cfg.neurons_per_task]
        h_bnd, counts = pad_rows(pool, chunk)
        w_bd = torch.from_numpy(w[lo : lo + len(chunk)])
        if work == "stage":
            analyse_neurons(h_bnd, counts, w_bd, cfg, device="cpu")
            continue
        for first, dist in neuron_distances(h_bnd, w_bd, device="cpu"):
            for b, n in enumerate(counts[first : first + len(dist)]):
                if work == "fixed":
                    cluster_examples(dist[b, :n, :n], cfg.threshold, cfg.method)
                else:
                    cluster_neuron(dist[b, :n, :n], cfg)
    return time.perf_counter() - start


def throughput(args) -> None:
    torch.set_num_threads(1)
    cfg = ClusterConfig()
    pool, members, w = synthetic(args.neurons, args.examples, args.d_model)
    n_naive = min(args.neurons, args.naive_neurons)
    t_naive = naive(pool, members[:n_naive], w[:n_naive], cfg.threshold)
    rate_naive = n_naive / t_naive
    rates = {work: args.neurons / batched(pool, members, w, cfg, work) for work in ("fixed", "per-neuron", "stage")}
    print(f"{args.examples} examples per neuron, d_model {args.d_model}, 1 torch thread per process")
    print(f"naive loop (numpy embeddings, pdist, linkage, fcluster): {rate_naive:8.0f} neurons/s ({n_naive} neurons)")
    print(
        f"batched, same work (bmm distances, linkage, fixed cut, centres): {rates['fixed']:8.0f} neurons/s  "
        f"= {rates['fixed'] / rate_naive:.2f}x naive"
    )
    print(
        f"batched, each neuron's own cut instead (silhouette of <= {cfg.max_clusters} cuts): "
        f"{rates['per-neuron']:8.0f} neurons/s  = {rates['per-neuron'] / rates['fixed']:.2f}x the fixed cut's rate"
    )
    print(f"batched, whole stage (both spaces at both cuts, all metrics): {rates['stage']:8.0f} neurons/s")
    for name, rate in (
        ("naive", rate_naive),
        ("batched same work", rates["fixed"]),
        ("batched whole stage", rates["stage"]),
    ):
        print(
            f"projected for {GPT2_NEURONS:,} neurons on {args.cores} cores, {name}: "
            f"{GPT2_NEURONS / rate / args.cores:6.1f} s (target < 60 s)"
        )


def write_scale_run(
    url: str, layers: int, d_mlp: int, d_model: int, k: int, unique_h: int, n_ctx: int = 128, n_contexts: int = 10_000
) -> None:
    """A run directory as the harvest leaves it, at paper scale, each stage recorded done with the default
    config: `n_contexts` contexts of random tokens, `unique_h` h rows per layer in h_id order and k examples per
    neuron drawn from them, in corpus (h_id) order."""
    import pyarrow as pa
    import safetensors.numpy

    from jobs.harvest import H_PART_BYTES, NEURONS_PER_ROW_GROUP
    from ne import schema
    from ne.config import RunConfig
    from ne.rundir.store import RunDir
    from tests.viewer.viewer_run import stage as recorded_stage

    run, cfg = RunDir(url), RunConfig(run_dir=url)
    rng = np.random.default_rng(0)
    run.set_manifest_entry("model", {"name": "synthetic", "n_layers": layers, "d_model": d_model, "d_mlp": d_mlp})
    with recorded_stage(run, "contexts", cfg, n_contexts=n_contexts):
        per_part = cfg.data.contexts_per_part
        for i, lo in enumerate(range(0, n_contexts, per_part)):
            ids = np.arange(lo, min(lo + per_part, n_contexts))
            tokens = pa.FixedSizeListArray.from_arrays(
                pa.array(rng.integers(0, 50_000, len(ids) * n_ctx, dtype=np.int32)), n_ctx
            ).cast(pa.list_(pa.int32()))
            run.write_parquet(
                f"{schema.CONTEXTS_DIR}/{schema.part_name(i)}",
                pa.table({"ctx_id": ids, "doc_id": ids, "tokens": tokens}, schema=schema.CONTEXTS),
            )
    with recorded_stage(run, "sae", cfg):  # no SAE: the model's own neurons are the units
        pass
    with recorded_stage(run, "weights", cfg, layers=list(range(layers))):
        for layer in range(layers):
            w_in = rng.normal(size=(d_model, d_mlp)).astype(np.float32)
            run.write_bytes(
                schema.weights_path(layer), safetensors.numpy.save({"W_in": w_in, "b_in": np.zeros(d_mlp, np.float32)})
            )
    with recorded_stage(run, "maxima", cfg, layers=list(range(layers))):
        run.write_parquet(
            schema.MAXIMA,
            pa.table(
                {
                    "layer": np.repeat(np.arange(layers), d_mlp).astype(np.int16),
                    "neuron": np.tile(np.arange(d_mlp), layers).astype(np.int32),
                    "max_act": np.ones(layers * d_mlp, np.float32),
                },
                schema=schema.MAXIMA_SCHEMA,
            ),
        )
    with recorded_stage(run, "examples", cfg, layers=list(range(layers))):
        for layer in range(layers):
            h_ids = np.unique(rng.integers(1, n_ctx, unique_h * 2) + n_ctx * rng.integers(0, n_contexts, unique_h * 2))
            h_ids = np.sort(rng.choice(h_ids, unique_h, replace=False))
            picks = np.sort(np.stack([rng.choice(unique_h, k, replace=False) for _ in range(d_mlp)]), axis=1)
            ex_h = h_ids[picks.ravel()]
            run.write_parquet(
                f"{schema.layer_dir(schema.EXAMPLES_DIR, layer)}/{schema.part_name(0)}",
                pa.table(
                    {
                        "layer": np.full(len(ex_h), layer, np.int16),
                        "neuron": np.repeat(np.arange(d_mlp), k),
                        "rank": np.tile(np.arange(k), d_mlp).astype(np.int16),
                        "ctx_id": ex_h // n_ctx,
                        "pos": (ex_h % n_ctx).astype(np.int16),
                        "act": np.ones(len(ex_h), np.float32),
                        "window_start": (ex_h % n_ctx).astype(np.int16),
                        "window": pa.array([[1.0]] * len(ex_h), pa.list_(pa.float32())),
                        "h_id": ex_h,
                    },
                    schema=schema.EXAMPLES,
                ),
                row_group_size=NEURONS_PER_ROW_GROUP * k,
            )
            rows_per_part = max(1, H_PART_BYTES // (4 * d_model))  # float32 h, as the harvest sizes its parts
            for i, lo in enumerate(range(0, unique_h, rows_per_part)):
                ids = h_ids[lo : lo + rows_per_part]
                rows = rng.normal(size=(len(ids), d_model)).astype(np.float32) + 1.0
                h = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), d_model)
                run.write_parquet(
                    f"{schema.layer_dir(schema.H_DIR, layer)}/{schema.part_name(i)}",
                    pa.table(
                        {"h_id": ids, "ctx_id": ids // n_ctx, "pos": (ids % n_ctx).astype(np.int16), "h": h},
                        schema=schema.h_schema(d_model),
                    ),
                )


def stage(args) -> None:
    """The cluster job end to end (Parquet reads, Ray tasks, writes, report) on a synthetic GPT2-scale run."""
    import tempfile

    from jobs.cluster import run_cluster
    from ne.config import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_scale_run(tmp, args.layers, 3072, args.d_model, args.examples, args.unique_h)
        print(
            f"synthetic run: {args.layers} layers x 3072 neurons x {args.examples} examples, {args.unique_h:,} "
            f"h rows per layer of d_model {args.d_model} (written in {time.perf_counter() - start:.0f} s)"
        )
        cfg = RunConfig(run_dir=tmp)
        if not args.in_process:  # started once per job, whatever its size: timed on its own
            from jobs.ray_utils import init_ray

            start = time.perf_counter()
            init_ray()
            print(f"Ray started in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        run_cluster(cfg, in_process=args.in_process)
        seconds = time.perf_counter() - start
    neurons = args.layers * 3072
    print(
        f"cluster stage ({'one process' if args.in_process else f'Ray tasks, {args.cores} cores'}): "
        f"{seconds:.1f} s, {neurons / seconds:.0f} neurons/s; projected for {GPT2_NEURONS:,} neurons: "
        f"{GPT2_NEURONS / neurons * seconds:.0f} s (target < 60 s)"
    )


def threshold_sweep(args) -> None:
    from sklearn.metrics import adjusted_rand_score

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.planted import planted_features

    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    print("planted features (4 features of 40/30/20/10 examples; 20 seeds x 3 spreads): mean ARI")
    print("threshold " + " ".join(f"{t:6.2f}" for t in grid))
    for spread in (0.1, 0.2, 0.3):
        ari_ne, ari_raw = np.zeros(len(grid)), np.zeros(len(grid))
        for seed in range(20):
            h, w, truth = planted_features(seed, spread=spread)
            d_ne = cosine_distances(torch.from_numpy(h)[None], torch.from_numpy(w)[None], device="cpu")[0].numpy()
            d_raw = cosine_distances(torch.from_numpy(h)[None], None, device="cpu")[0].numpy()
            for i, t in enumerate(grid):
                ari_ne[i] += adjusted_rand_score(truth, cluster_examples(d_ne, t).labels) / 20
                ari_raw[i] += adjusted_rand_score(truth, cluster_examples(d_raw, t).labels) / 20
        print(f"NE  s={spread} " + " ".join(f"{a:6.3f}" for a in ari_ne))
        print(f"raw s={spread} " + " ".join(f"{a:6.3f}" for a in ari_raw))
    if args.run:
        real_sweep(args.run, grid, args.sample)


SCENARIOS = {  # name: (feature sizes, nuisance)
    "1 feature": ((100,), 0.0),
    "2 features 50/50": ((50, 50), 0.0),
    "4 features 40/30/20/10": ((40, 30, 20, 10), 0.0),
    "8 features of 12-13": ((13, 13, 13, 13, 12, 12, 12, 12), 0.0),
    "6 features 60/25/10/3/1/1": ((60, 25, 10, 3, 1, 1), 0.0),
    "4 features + nuisance 20": ((40, 30, 20, 10), 20.0),
    "4 features + nuisance 40": ((40, 30, 20, 10), 40.0),
}
SPREADS = (0.05, 0.1, 0.2, 0.3, 0.4)
EASY = 0.1
"""Spreads up to this are the easy cases, where the per-neuron cut may lose at most 0.02 ARI."""


def largest_gap_cut(d: np.ndarray, cfg: ClusterConfig, min_share: float) -> np.ndarray:
    """The criterion the per-neuron cut was measured against: cut in the largest gap between consecutive merge
    heights, among cuts into 2..max_clusters clusters; one cluster when that gap is below `min_share` of the
    top merge's height (a gap alone cannot say "one cluster")."""
    from ne.compute.cluster import cut_into, linkage_of

    z = linkage_of(d, cfg.method)
    n = len(z) + 1
    ks = np.arange(2, min(cfg.max_clusters, n - 1) + 1)
    if not len(ks):
        return np.zeros(n, np.int64)
    heights = z[:, 2]
    gaps = heights[n - ks] - heights[n - ks - 1]
    if gaps.max() < min_share * heights[-1]:
        return np.zeros(n, np.int64)
    return cut_into(z, int(ks[np.argmax(gaps)]))


def cut_comparison(args) -> None:
    """ARI of the fixed and per-neuron cuts on planted features, per scenario and spread (noise level)."""
    from dataclasses import replace

    from sklearn.metrics import adjusted_rand_score

    from tests.planted import planted_features

    base = ClusterConfig()
    rules = {"fixed": replace(base, cut="fixed"), "per-neuron": replace(base, cut="silhouette")}
    if args.sensitivity:
        for key, values in (
            ("min_separation", (0.3, 0.4)),
            ("silhouette_tolerance", (0.0, 0.1)),
            ("min_silhouette", (0.15, 0.35)),
        ):
            for v in values:
                rules[f"{key}={v}"] = replace(base, cut="silhouette", **{key: v})
        for share in (0.1, 0.2):
            rules[f"largest gap >= {share} x top"] = share
    print(
        f"planted features, {args.seeds} seeds per cell: mean adjusted Rand index of the clusters of h ⊙ w against "
        f"the true features\nfixed: every neuron at {base.threshold}; per-neuron: cluster.cut 'silhouette' "
        f"(min_separation {base.min_separation}, min_silhouette {base.min_silhouette}, silhouette_tolerance "
        f"{base.silhouette_tolerance}, max_clusters {base.max_clusters})\n"
    )
    ari = {name: np.zeros((len(SCENARIOS), len(SPREADS))) for name in rules}
    for i, (sizes, nuisance) in enumerate(SCENARIOS.values()):
        for j, spread in enumerate(SPREADS):
            for seed in range(args.seeds):
                h, w, truth = planted_features(seed, sizes=sizes, spread=spread, nuisance=nuisance)
                d = cosine_distances(torch.from_numpy(h)[None], torch.from_numpy(w)[None], device="cpu")[0].numpy()
                for name, rule in rules.items():
                    gap = isinstance(rule, float)
                    labels = largest_gap_cut(d, base, rule) if gap else cluster_neuron(d, rule).labels
                    ari[name][i, j] += adjusted_rand_score(truth, labels) / args.seeds
    width = max(len(s) for s in SCENARIOS)
    print("ARI fixed / per-neuron, by the features' spread (the noise level):")
    print(f"{'scenario':<{width}}" + "".join(f"{s:>16}" for s in SPREADS))
    for i, name in enumerate(SCENARIOS):
        print(
            f"{name:<{width}}"
            + "".join(f"   {ari['fixed'][i, j]:.3f} / {ari['per-neuron'][i, j]:.3f}" for j in range(len(SPREADS)))
        )
    print(f"\nper difficulty level (spread), mean over the {len(SCENARIOS)} scenarios:")
    print(f"{'cut':<28}" + "".join(f"{s:>8}" for s in SPREADS) + f"{'all':>8}{'easy':>8}{'worst easy':>12}")
    easy = np.array(SPREADS) <= EASY
    for name, a in ari.items():
        worst = (a[:, easy] - ari["fixed"][:, easy]).min()
        print(
            f"{name:<28}" + "".join(f"{x:8.3f}" for x in a.mean(axis=0)) + f"{a.mean():8.3f}{a[:, easy].mean():8.3f}"
            f"{worst:+12.3f}"
        )
    print(
        f"\n'easy': spreads <= {EASY}; 'worst easy': the lowest ARI difference against the fixed cut in any easy "
        "cell (the per-neuron cut may be the default only if it is >= -0.02 and 'all' is higher)"
    )


def real_sweep(url: str, grid: list[float], sample: int) -> None:
    """Cluster statistics of a real run's neurons at each threshold (no labels: shape, not accuracy)."""
    from ne import schema
    from ne.compute.metrics import neuron_metrics
    from ne.rundir.h import read_h
    from ne.rundir.store import RunDir
    from ne.rundir.weights import read_w_in

    run = RunDir(url)
    rng = np.random.default_rng(0)
    dists = []
    for layer in run.layers(schema.EXAMPLES_DIR):
        ex = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "rank", "h_id"])
        ex = ex.to_pandas().sort_values(["neuron", "rank"])
        groups = {n: g.h_id.to_numpy() for n, g in ex.groupby("neuron") if len(g) >= 10}
        picked = rng.choice(sorted(groups), min(sample, len(groups)), replace=False)
        w_in = read_w_in(run, layer)
        for neuron in picked:
            h = read_h(run, layer, groups[neuron])
            d_ne = cosine_distances(torch.from_numpy(h)[None], torch.from_numpy(w_in[:, neuron])[None], device="cpu")
            d_raw = cosine_distances(torch.from_numpy(h)[None], None, device="cpu")
            dists.append((d_ne[0].numpy(), d_raw[0].numpy()))
    print(f"\n{url}: {len(dists)} neurons with >= 10 examples, sampled over layers; medians over neurons")
    print(
        f"median pairwise distance: neuron embedding {np.median([np.median(a) for a, _ in dists]):.3f}, "
        f"pre-MLP {np.median([np.median(b) for _, b in dists]):.3f}"
    )
    print("threshold  clusters(NE)  singleton-share(NE)  largest-share(NE)  silhouette(NE)  silhouette(raw)  NE>raw")
    for t in grid:
        rows = []
        for d_ne, d_raw in dists:
            c_ne, c_raw = cluster_examples(d_ne, t), cluster_examples(d_raw, t)
            sizes = np.bincount(c_ne.labels)
            m_ne, m_raw = neuron_metrics(d_ne, c_ne), neuron_metrics(d_raw, c_raw)
            rows.append(
                (
                    c_ne.n_clusters,
                    np.mean(sizes == 1) if len(sizes) > 1 else 0.0,
                    sizes[0] / sizes.sum(),
                    m_ne["silhouette"],
                    m_raw["silhouette"],
                )
            )
        r = np.array(rows, dtype=float)
        both = ~np.isnan(r[:, 3]) & ~np.isnan(r[:, 4])
        better = np.mean(r[both, 3] > r[both, 4]) if both.any() else float("nan")
        print(
            f"{t:9.2f}  {np.median(r[:, 0]):12.0f}  {np.mean(r[:, 1]):19.3f}  {np.median(r[:, 2]):17.3f}  "
            f"{np.nanmedian(r[:, 3]):14.3f}  {np.nanmedian(r[:, 4]):15.3f}  {better:6.3f} (n={both.sum()})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neurons", type=int, default=1024)
    p.add_argument("--naive-neurons", type=int, default=512)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--thresholds", action="store_true", help="measure cluster quality across thresholds instead")
    p.add_argument("--cuts", action="store_true", help="ARI of the fixed and per-neuron cuts per difficulty level")
    p.add_argument("--sensitivity", action="store_true", help="with --cuts: the per-neuron cut's other settings")
    p.add_argument("--seeds", type=int, default=20, help="with --cuts: planted neurons per cell")
    p.add_argument("--stage", action="store_true", help="time the whole cluster job on a synthetic run instead")
    p.add_argument("--layers", type=int, default=2, help="with --stage: layers of 3072 neurons")
    p.add_argument("--unique-h", type=int, default=200_000, help="with --stage: distinct h rows per layer")
    p.add_argument("--in-process", action="store_true", help="with --stage: one process, no Ray")
    p.add_argument("--run", help="with --thresholds: a run directory with a finished harvest")
    p.add_argument("--sample", type=int, default=150, help="with --run: neurons sampled per layer")
    args = p.parse_args()
    if args.stage:
        stage(args)
    elif args.cuts:
        cut_comparison(args)
    else:
        threshold_sweep(args) if args.thresholds else throughput(args)


if __name__ == "__main__":
    main()
