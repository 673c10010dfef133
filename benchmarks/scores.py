"""Every feature cluster's label scored on held-out text, summed up from a run's `scores/` (the `scores` stage).

    python benchmarks/scores.py runs/demo

Prints, per layer and over all clusters that are not outliers: how many clusters occur on the held-out text, and the
mean and median precision and recall of their labels (precision over clusters whose rule matches some token, recall
over clusters that occur), then the micro-averaged figures (all matched occurrences over all matched tokens, over all
occurrences) and the stage's time from the manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    info = require_done(run, "scores")["info"]
    rows = {}
    frames = []
    for layer in info["layers"]:
        scores = run.read_parquet(schema.layer_dir(schema.SCORES_DIR, layer)).to_pandas()
        labels = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer), columns=["neuron", "cluster", "outlier"])
        kept = scores.merge(labels.to_pandas(), on=["neuron", "cluster"])
        kept = kept[~kept.outlier]
        rows[f"layer {layer}"] = summary(kept)
        frames.append(kept)
    rows["all"] = summary(pd.concat(frames))
    table = pd.DataFrame(rows).T
    table[["clusters", "occur"]] = table[["clusters", "occur"]].astype(int)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"scores stage: {info['tokens']} held-out tokens, {info['seconds']:.1f} s")


if __name__ == "__main__":
    main()
