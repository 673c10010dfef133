"""Every feature cluster scored on held-out text, summed up from a run's `scores/` and `embedding_scores/`.

    python benchmarks/scores.py runs/demo
    python benchmarks/scores.py runs/demo --check 2000     # and what the embedding score is worth (about 2 min)

Prints, per layer and over all clusters that are not outliers: how many clusters occur on the held-out text, and the
mean and median precision and recall of their labels (precision over clusters whose rule matches some token, recall
over clusters that occur), then the micro-averaged figures (all matched occurrences over all matched tokens, over all
occurrences) and the stage's time from the manifest.

Then the embedding scores (the `embedding_scores` stage), per layer and over clusters that some scored held-out
occurrence names: the share of a cluster's occurrences closer to its own examples than to its unit's other clusters'
(mean and median over clusters, and over all occurrences), and the mean margin.

--check N measures two things on the first held-out part: the same share with each occurrence given a random other
cluster of its unit instead (what the share is without the clusters' signal), and, for N sampled occurrences, how
the stage's window embeddings (the window read in its context) agree with embedding each window's text alone, as
delphi does: the cosine between the two, and whether the margins agree in sign.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import schema  # noqa: E402
from ne.rundir.stages import require_done  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402


def summary(frame: pd.DataFrame) -> dict:
    return {
        "clusters": len(frame),
        "occur": int((frame.occurrences > 0).sum()),
        "precision mean": frame.precision.mean(),
        "precision median": frame.precision.median(),
        "recall mean": frame.recall.mean(),
        "recall median": frame.recall.median(),
        "micro precision": frame.matched_occurrences.sum() / max(frame.matched_tokens.sum(), 1),
        "micro recall": frame.matched_occurrences.sum() / max(frame.occurrences.sum(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--check", type=int, default=0, help="sampled occurrences for the window check (0: no check)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    info = require_done(run, "scores")["info"]
    frames = {}
    for layer in info["layers"]:
        scores = run.read_parquet(schema.layer_dir(schema.SCORES_DIR, layer)).to_pandas()
        labels = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer), columns=["neuron", "cluster", "outlier"])
        kept = scores.merge(labels.to_pandas(), on=["neuron", "cluster"])
        frames[layer] = kept[~kept.outlier]
    print_by_layer(frames, summary, ["clusters", "occur"])
    print(f"scores stage: {info['tokens']} held-out tokens, {info['seconds']:.1f} s\n")
    embedding = require_done(run, "embedding_scores")["info"]
    frames = {}
    for layer in embedding["layers"]:
        scored = run.read_parquet(schema.layer_dir(schema.EMBEDDING_SCORES_DIR, layer)).to_pandas()
        frames[layer] = scored[scored.heldout > 0]
    print_by_layer(frames, embedding_summary, ["clusters", "occurrences"])
    print(
        f"embedding_scores stage: windows of {embedding['window'][0]} tokens before and {embedding['window'][1]} "
        f"after, {embedding['seconds']:.1f} s"
    )
    if args.check:
        check_embedding(run, embedding["layers"], args.check, args.seed)


def print_by_layer(frames: dict[int, pd.DataFrame], summarise, counts: list[str]) -> None:
    """One row of `summarise` per layer's frame, then one over all of them."""
    rows = {f"layer {layer}": summarise(frame) for layer, frame in frames.items()}
    rows["all"] = summarise(pd.concat(frames.values()))
    table = pd.DataFrame(rows).T
    table[counts] = table[counts].astype(int)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


def embedding_summary(frame: pd.DataFrame) -> dict:
    return {
        "clusters": len(frame),
        "occurrences": int(frame.heldout.sum()),
        "closer mean": frame.closer.mean(),
        "closer median": frame.closer.median(),
        "closer micro": (frame.closer * frame.heldout).sum() / max(frame.heldout.sum(), 1),
        "margin mean": frame.margin.mean(),
    }


def check_embedding(run: RunDir, layers: list[int], n: int, seed: int) -> None:
    from ne.compute.scores import CLUSTER_KEY, TOKEN_KEY
    from ne.embedding_scores import Windows, cluster_sums
    from ne.occurrence import heldout_parts, occurrence_file, read_heldout
    from ne.rundir.reader import RunData

    cfg = RunData(run.url).config()
    windows = Windows(run, cfg)
    sums = cluster_sums(run, layers, windows)
    part = heldout_parts(run)[0]
    contexts = read_heldout(run, part)
    keys_t, rows_td = windows.of(contexts)
    tokens = dict(contexts)
    rng = np.random.default_rng(seed)
    real, null, picked = [], [], []
    for layer in layers:
        occ = run.read_parquet(occurrence_file(layer, part), columns=["ctx_id", "pos", "unit", "cluster"]).to_pandas()
        key = occ.unit.to_numpy(np.int64) * CLUSTER_KEY + occ.cluster.to_numpy(np.int64)
        row = np.searchsorted(keys_t, occ.ctx_id.to_numpy(np.int64) * TOKEN_KEY + occ.pos.to_numpy(np.int64))
        _, margin = sums[layer].margins(key, row, rows_td)
        real.append(margin)
        null.append(sums[layer].margins(other_cluster(sums[layer].keys, key, rng), row, rows_td)[1])
        ok = np.flatnonzero(np.isfinite(margin))
        for i in rng.choice(ok, min(len(ok), n // len(layers)), replace=False):
            picked.append((layer, key[i], row[i], int(occ.ctx_id[i]), int(occ.pos[i]), margin[i]))
    real_m, null_m = np.concatenate(real), np.concatenate(null)
    both = np.isfinite(real_m) & np.isfinite(null_m)
    print(
        f"\nheld-out part {part}, {int(both.sum())} occurrences: closer share {np.mean(real_m[both] > 0):.3f} with "
        f"the assigned cluster, {np.mean(null_m[both] > 0):.3f} with a random other cluster of the unit (mean margin "
        f"{real_m[both].mean():.4f} against {null_m[both].mean():.4f})"
    )
    before, after = cfg.scores.window_before, cfg.scores.window_after
    texts = []
    for _, _, _, ctx, pos, _ in picked:
        ids = [int(t) for t in tokens[ctx][max(0, pos - before) : pos + after + 1]]
        texts.append("".join(windows.pieces(ids)))
    alone = windows.encoder.encode(texts)
    in_context = rows_td[[p[2] for p in picked]]
    agree = []
    for (layer, key, _, _, _, margin), q in zip(picked, alone):
        agree.append((margin, sums[layer].margins(np.array([key]), np.array([0]), q[None])[1][0]))
    m = np.array(agree)
    print(
        f"{len(picked)} sampled occurrences, their window's text embedded alone (as delphi) against in its context "
        f"(as the stage): mean cosine {np.mean(np.sum(alone * in_context, 1)):.3f}; margins agree in sign on "
        f"{np.mean((m[:, 0] > 0) == (m[:, 1] > 0)):.3f}, Pearson r {np.corrcoef(m[:, 0], m[:, 1])[0, 1]:.3f}; "
        f"closer share {np.mean(m[:, 0] > 0):.3f} in context, {np.mean(m[:, 1] > 0):.3f} alone"
    )


def other_cluster(keys: np.ndarray, key: np.ndarray, rng) -> np.ndarray:
    """Each occurrence's cluster key swapped for a uniformly random other cluster of its unit (itself when the unit
    has one cluster, or the key is not in `keys`)."""
    from ne.compute.scores import CLUSTER_KEY

    units, start, count = np.unique(keys // CLUSTER_KEY, return_index=True, return_counts=True)
    u = np.searchsorted(units, key // CLUSTER_KEY).clip(0, len(units) - 1)
    found = (units[u] == key // CLUSTER_KEY) & (np.searchsorted(keys, key).clip(0, len(keys) - 1) < len(keys))
    own = np.searchsorted(keys, key) - start[u]
    j = (rng.random(len(key)) * np.maximum(count[u] - 1, 1)).astype(np.int64)
    j = np.where(j >= own, j + 1, j)
    swap = found & (count[u] > 1)
    return np.where(swap, keys[(start[u] + j).clip(0, len(keys) - 1)], key)


if __name__ == "__main__":
    main()
