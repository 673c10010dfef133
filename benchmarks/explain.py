"""How well a new embedding is assigned to a feature cluster: held-out agreement on a real run.

    python benchmarks/explain.py runs/demo --neurons 600

For neurons with two or more clusters: hold out 20% of each neuron's examples, cluster the other 80% with
the run's cluster settings, assign each held-out example to the nearest cluster (by the cluster's mean
embedding, or by its central example), and compare with the cluster it joins when all examples are
clustered together (each 80%-cluster stands for the full cluster holding most of its members). Counts only
held-out examples whose full cluster is not an outlier (smaller than cluster.min_cluster_size). Also prints
the ceiling that reclustering sets (the share of held-out examples whose full cluster has a counterpart among
the 80% clusters at all) and the agreement against the full clustering kept fixed, as `ne explain` uses it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist, squareform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import schema  # noqa: E402
from ne.compute.cluster import cluster_neuron  # noqa: E402
from ne.config import ClusterConfig  # noqa: E402
from ne.explain import assign, cluster_vectors  # noqa: E402
from ne.rundir.h import load_h  # noqa: E402
from ne.rundir.reader import RunData  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402
from ne.rundir.weights import read_layer_weights  # noqa: E402

HOLD_OUT = 0.2
RULES = ("mean", "central")


def clusters_of(e: np.ndarray, cfg: ClusterConfig):
    dist = squareform(pdist(e.astype(np.float64), "cosine")) if len(e) > 1 else np.zeros((1, 1))
    return cluster_neuron(np.nan_to_num(dist, nan=1.0), cfg)


def neuron_agreement(e: np.ndarray, cfg: ClusterConfig, rng: np.random.Generator) -> dict[str, tuple[int, int]]:
    """(agreeing, counted) held-out examples of one neuron, per measure."""
    full = clusters_of(e, cfg)
    n = len(e)
    held = np.sort(rng.choice(n, max(1, round(HOLD_OUT * n)), replace=False))
    kept = np.setdiff1d(np.arange(n), held)
    part = clusters_of(e[kept], cfg)
    real = np.flatnonzero(np.bincount(part.labels) >= cfg.min_cluster_size)
    counted = held[~full.outlier[held]]
    if not len(real) or not len(counted):
        return {}
    # Each 80%-cluster stands for the full cluster that holds most of its members.
    stands_for = np.array([np.bincount(full.labels[kept[part.labels == c]]).argmax() for c in real])
    out = {}
    for rule in RULES:
        vectors = cluster_vectors(e[kept], part.labels, part.central, rule)[real]
        chosen = assign(e[counted], vectors)[0]
        out[rule] = (int((stands_for[chosen] == full.labels[counted]).sum()), len(counted))
    out["ceiling"] = (int(np.isin(full.labels[counted], stands_for).sum()), len(counted))
    # Against the full clustering itself (fixed, as at explain time): vectors from each full cluster's kept members.
    labels = full.labels[kept]
    present = np.unique(labels[~full.outlier[kept]])  # clusters with kept members, outliers left out
    vectors = cluster_vectors(e[kept], labels, np.zeros(full.labels.max() + 1, np.int64), "mean")[present]
    chosen = present[assign(e[counted], vectors)[0]]
    out["fixed"] = (int((chosen == full.labels[counted]).sum()), len(counted))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--neurons", type=int, default=600, help="neurons sampled (with >= 2 clusters)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    run = RunDir(args.run_dir)
    run_cfg = RunData(args.run_dir).config()  # each setting as the stage that made the clusters ran with it
    cfg = run_cfg.cluster
    metrics = run.read_parquet(schema.METRICS).to_pandas()
    poly = metrics[metrics.n_clusters >= 2]
    rng = np.random.default_rng(args.seed)
    sample = poly.iloc[np.sort(rng.choice(len(poly), min(args.neurons, len(poly)), replace=False))]
    totals = {k: [0, 0] for k in (*RULES, "ceiling", "fixed")}
    for layer, group in sample.groupby("layer"):
        examples = run.read_parquet(
            schema.layer_dir(schema.EXAMPLES_DIR, int(layer)), columns=["neuron", "rank", "h_id"]
        ).to_pandas()
        layer_h, weights = load_h(run, int(layer)), read_layer_weights(run, int(layer))
        for neuron in group.neuron:
            rows = examples[examples.neuron == neuron].sort_values("rank")
            e = weights.embed(
                layer_h.take(rows.h_id.to_numpy()), np.full(len(rows), neuron), run_cfg.model.gated_embedding
            )
            for measure, (agree, counted) in neuron_agreement(e, cfg, rng).items():
                totals[measure][0] += agree
                totals[measure][1] += counted
    cut = f"per-neuron cut ({cfg.cut})" if cfg.cut != "fixed" else f"cut {cfg.threshold}"
    print(
        f"{args.run_dir}: {len(sample)} neurons with >= 2 clusters (of {len(poly)}), {HOLD_OUT:.0%} of each "
        f"neuron's examples held out, {cut}, {cfg.method} linkage"
    )
    share = {k: a / max(c, 1) for k, (a, c) in totals.items()}
    print(f"  held-out examples counted: {totals['mean'][1]}")
    print(f"  assigned by the cluster's mean embedding: agreement {share['mean']:.3f}")
    print(f"  assigned by the cluster's central example: agreement {share['central']:.3f}")
    print(
        f"  ceiling: the held-out example's full cluster is among the 80% clusters for {share['ceiling']:.3f}; "
        f"mean-embedding agreement where it is: {share['mean'] / share['ceiling']:.3f}"
    )
    print(f"  against the full clustering itself (no reclustering, as `ne explain` assigns): {share['fixed']:.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
