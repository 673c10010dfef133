"""Which neuron embedding for gated MLPs: `gate` (h ⊙ g_j) or `concat` ([h ⊙ g_j ; h ⊙ u_j]).

    python benchmarks/gated_embedding.py [--seeds 20]

Planted features for a gated neuron act_fn(h·g)·(h·u) (`tests/planted.py: planted_gated_features`): 4 features
of 40/30/20/10 examples whose directions live in the dimensions the gate reads, in those the up projection
reads, or across both; a block without features holds a direction common to all examples. For each
placement and feature spread it prints the mean adjusted Rand index of the clusters at the default cut and
the mean AUC with which same-feature pairs are closer than different-feature pairs (threshold-free), for
both embeddings and for raw h.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne.compute.cluster import cluster_examples  # noqa: E402
from ne.compute.embed import LayerWeights, cosine_distances  # noqa: E402
from ne.config import ClusterConfig  # noqa: E402
from tests.planted import PLACEMENTS, planted_gated_features  # noqa: E402

MODES = ("gate", "concat", "raw")


def measure(where: str, mode: str, spread: float, seeds: int, threshold: float) -> tuple[float, float]:
    ari, auc = [], []
    for seed in range(seeds):
        h, g, u, truth = planted_gated_features(seed, where, spread=spread)
        w = None if mode == "raw" else torch.from_numpy(LayerWeights(g[None], u[None]).unit_weights([0], mode))
        d = cosine_distances(torch.from_numpy(h)[None], w, device="cpu")[0].numpy()
        ari.append(adjusted_rand_score(truth, cluster_examples(d, threshold).labels))
        upper = np.triu_indices(len(truth), 1)
        auc.append(roc_auc_score((truth[:, None] == truth[None])[upper], -d[upper]))
    return float(np.mean(ari)), float(np.mean(auc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    threshold = ClusterConfig().threshold
    print(f"mean ARI at the cut {threshold} / mean AUC (same-feature pairs closer), {args.seeds} seeds")
    print(f"{'spread':>6} {'features in':>11}  " + "  ".join(f"{m:>13}" for m in MODES))
    totals = {m: [] for m in MODES}
    for spread in (0.1, 0.2, 0.3):
        for where in PLACEMENTS:
            row = {m: measure(where, m, spread, args.seeds, threshold) for m in MODES}
            for m in MODES:
                totals[m].append(row[m])
            print(f"{spread:>6} {where:>11}  " + "  ".join(f"{a:6.3f}/{u:.3f}" for a, u in row.values()))
    print(
        f"{'mean':>6} {'':>11}  "
        + "  ".join(
            f"{np.mean([a for a, _ in totals[m]]):6.3f}/{np.mean([u for _, u in totals[m]]):.3f}" for m in MODES
        )
    )


if __name__ == "__main__":
    main()
