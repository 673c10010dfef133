"""Time to open a neuron in the viewer, p50 over random neurons of a run (target: under 300 ms).

"Opening a neuron" is what the neuron page computes before Streamlit draws it: the neuron's rows
(examples, contexts, clusters, dendrogram, metrics, maximum), the HTML of its first cluster's examples and
the dendrogram image. Cold: a fresh reader per neuron (nothing cached but the OS's file cache), as on a
freshly started viewer; warm: one shared reader, whose row-group cache then serves nearby neurons.

    .venv/bin/python benchmarks/viewer.py runs/demo [--neurons 40]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne.errors import NeError  # noqa: E402
from ne.rundir.reader import RunData  # noqa: E402
from ne.viewer import render  # noqa: E402


def open_neuron(data: RunData, layer: int, neuron: int, decode) -> dict[str, float]:
    t0 = time.perf_counter()
    nd = data.neuron(layer, neuron)
    t1 = time.perf_counter()
    clusters = nd.clusters()
    members = next(iter(clusters.values()))
    html = "".join(render.example_html(e, decode, nd.scale) for e in members)
    t2 = time.perf_counter()
    if nd.linkage is not None and len(nd.linkage):
        render.dendrogram_png(
            nd.linkage, [e.cluster if e.cluster is not None else -1 for e in nd.examples], nd.threshold
        )
    t3 = time.perf_counter()
    assert html
    return {"read": t1 - t0, "html": t2 - t1, "dendrogram": t3 - t2, "total": t3 - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--neurons", type=int, default=40, help="random neurons opened per mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t = time.perf_counter()
    data = RunData(args.run_dir)
    status = data.status()
    startup = time.perf_counter() - t
    if "lm" not in status.kind:
        print(f"cannot benchmark {args.run_dir}: {' '.join(status.errors) or 'no language-model examples'}")
        return 2
    try:
        from ne.models import load_token_decoder

        decode = load_token_decoder(data.config().model)  # as the viewer: the tokenizer, never the weights
        decoder = "the run's tokenizer"
    except Exception as exc:  # benchmark the rest even without the model, as the viewer does
        decode, decoder = (lambda ids: [f"[{i}]" for i in ids]), f"token ids (model not loaded: {exc})"

    rng = random.Random(args.seed)
    pool = [(layer, int(n)) for layer in data.layers() for n in data.neurons(layer)]
    picks = rng.sample(pool, min(args.neurons, len(pool)))
    examples = sum(len(data.neuron(*p).examples) for p in picks[:5]) / min(5, len(picks))
    print(
        f"run {args.run_dir}: layers {data.layers()}, {len(pool)} neurons with examples, "
        f"~{examples:.0f} examples each; decoding with {decoder}"
    )
    print(f"start-up (reader + run status): {startup * 1e3:.1f} ms")

    results = {}
    for mode in ("cold", "warm"):
        shared = RunData(args.run_dir)
        shared.neuron(*picks[0])  # warm: parts' footers known, as after the first page
        rows = []
        for layer, neuron in picks:
            reader = RunData(args.run_dir) if mode == "cold" else shared
            rows.append(open_neuron(reader, layer, neuron, decode))
        results[mode] = rows
        parts = {k: np.median([r[k] for r in rows]) * 1e3 for k in rows[0]}
        p90 = np.percentile([r["total"] for r in rows], 90) * 1e3
        print(
            f"{mode:>4}: p50 {parts['total']:.1f} ms (read {parts['read']:.1f}, html {parts['html']:.1f}, "
            f"dendrogram {parts['dendrogram']:.1f}), p90 {p90:.1f} ms over {len(rows)} neurons; "
            f"p50 / 300 ms target = {parts['total'] / 300:.2f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NeError as exc:
        print(f"error: {exc}")
        sys.exit(2)
