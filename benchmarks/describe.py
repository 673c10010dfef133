"""Say what each feature is, head to head: offline labels and example embeddings scored on held-out text.

    python benchmarks/describe.py runs/demo --neurons 300
    python benchmarks/describe.py runs/demo --show 12          # labels beside their clusters' examples, to read

For a sample of the run's neurons (those with at least --min-examples examples), hold out 20% of each neuron's
examples. Four ways of saying what the neuron does are built from the other 80% only, each with the offline labels
of `ne.compute.label` (the rule that best tells a cluster's examples from the neuron's others):
- one label per neuron (all its examples as one cluster);
- one label per cluster, for clusters of neuron embeddings (the run's clustering settings), of pre-MLP embeddings
  (the same settings on h), and PRISM-style clusters (arXiv 2506.15538: k-means, k = 5, over a sentence encoder's
  embedding of each example's context; here the demo's all-MiniLM-L6-v2, mean-pooled, on 20 tokens before the key
  token to 5 after).
Held-out examples join the nearest cluster (mean embedding, as `ne explain` assigns; the nearest k-means centre for
PRISM). Scores (`ne.compute.scores`), on held-out text only:
- unit: whether the neuron fires, said by the neuron's label or by any of its clusters' labels; positives are the
  held-out key tokens, negatives the tokens of their stored windows where the neuron stays below its threshold;
- cluster: each cluster's label as a detector of its own held-out examples among the other clusters' held-out
  examples and those quiet tokens (micro-averaged over clusters of at least cluster.min_cluster_size);
- embedding: the share of held-out examples whose text (MiniLM) is closer on average to their own cluster's examples
  than to the neuron's other clusters' (delphi's example-embedding measure), and the mean margin. This favours
  PRISM's clusters, which are built in that very space.
When the run has a finished `occurrence` stage, the cluster score is also taken on the held-out occurrences
(`ne.compute.scores.occurrence_detection`): the run's own labels against every held-out token. When the run has LLM
detection scores (`ne describe --score`), their mean balanced accuracy over the sampled neurons' clusters.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist, squareform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import schema  # noqa: E402
from ne.compute.cluster import cluster_neuron  # noqa: E402
from ne.compute.harvest import SIGNS  # noqa: E402
from ne.compute.label import Rule, best_rule  # noqa: E402
from ne.compute.scores import (  # noqa: E402
    Counts,
    around,
    below_threshold,
    embedding_deltas,
    embedding_score,
    label_detection,
    occurrence_detection,
    unit_detection,
)
from ne.config import RunConfig, from_dict  # noqa: E402
from ne.explain import assign, cluster_vectors  # noqa: E402
from ne.export import occurrences_ready  # noqa: E402
from ne.models import load_model_tokenizer  # noqa: E402
from ne.models.sentence import SentenceEncoder  # noqa: E402
from ne.rundir.h import load_h  # noqa: E402
from ne.rundir.stages import state_of  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402
from ne.rundir.weights import read_layer_weights  # noqa: E402

HOLD_OUT = 0.2
METHODS = (
    "one label per neuron",
    "neuron-embedding clusters",
    "pre-MLP clusters",
    "PRISM-style clusters",
    "neuron-embedding clusters, commonest key token",
)
"""The last row keeps the neuron-embedding clusters but labels each with its commonest key token alone: what the
contrast with the neuron's other clusters adds to a label."""
BEFORE, AFTER = 20, 5


def clusters_by_cosine(x: np.ndarray, cfg) -> np.ndarray:
    dist = squareform(pdist(x.astype(np.float64), "cosine")) if len(x) > 1 else np.zeros((1, 1))
    return cluster_neuron(np.nan_to_num(dist, nan=1.0), cfg).labels


def split_and_assign(method: str, e, h, s, train, held, cfg, k: int, seed: int):
    """(train labels, held-out labels, kept clusters) of one neuron under one method."""
    if method == METHODS[0]:
        return np.zeros(len(train), int), np.zeros(len(held), int), np.array([0])
    if method == METHODS[3]:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=min(k, len(train)), n_init=10, random_state=seed).fit(s[train])
        lab = km.labels_
        kept = np.flatnonzero(np.bincount(lab, minlength=km.n_clusters) >= cfg.min_cluster_size)
        d = ((s[held][:, None, :] - km.cluster_centers_[None, kept, :]) ** 2).sum(-1)
        return lab, kept[d.argmin(1)], kept
    x = e if method == METHODS[1] else h
    lab = clusters_by_cosine(x[train], cfg)
    kept = np.flatnonzero(np.bincount(lab) >= cfg.min_cluster_size)
    if not len(kept):
        kept = np.unique(lab)
    vectors = cluster_vectors(x[train], lab, np.zeros(lab.max() + 1, np.int64))[kept]
    return lab, kept[assign(x[held], vectors)[0]], kept


def text_window(tokenizer, tokens, pos: int) -> str:
    return tokenizer.decode([int(t) for t in tokens[max(0, pos - BEFORE) : pos + AFTER + 1]], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--neurons", type=int, default=300, help="neurons sampled")
    parser.add_argument("--min-examples", type=int, default=20, help="only neurons with at least this many examples")
    parser.add_argument("--k", type=int, default=5, help="k-means clusters per neuron for the PRISM-style method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many labelled clusters with examples, and stop")
    args = parser.parse_args()
    start = time.perf_counter()
    run = RunDir(args.run_dir)
    manifest = run.require_manifest()
    run_cfg = from_dict(RunConfig, manifest["config"])
    tokenizer = load_model_tokenizer(run_cfg.model)
    if args.show:
        show_labels(run, tokenizer, args.show, args.seed)
        return
    cfg = run_cfg.cluster
    sign = SIGNS[run_cfg.harvest.direction]
    model = manifest["model"]
    special = [t for t in (model.get("bos_token_id"), model.get("pad_token_id")) if t is not None]
    metrics = run.read_parquet(schema.METRICS).to_pandas()
    pool = metrics[metrics.n_examples >= args.min_examples]
    rng = np.random.default_rng(args.seed)
    sample = pool.iloc[np.sort(rng.choice(len(pool), min(args.neurons, len(pool)), replace=False))]
    maxima = run.read_parquet(schema.MAXIMA).to_pandas().set_index(["layer", "neuron"]).iloc[:, 0]
    encoder = SentenceEncoder()
    unit_counts = {m: Counts() for m in METHODS}
    cluster_counts = {m: Counts() for m in METHODS[1:]}
    within_counts = {m: Counts() for m in METHODS[1:]}
    deltas = defaultdict(list)
    n_clusters = defaultdict(list)
    held_total = quiet_total = 0
    for layer, group in sample.groupby("layer"):
        ex = (
            run.read_parquet(
                schema.layer_dir(schema.EXAMPLES_DIR, int(layer)), filters=[("neuron", "in", group.neuron.tolist())]
            )
            .to_pandas()
            .sort_values(["neuron", "rank"])
        )
        layer_h = load_h(run, int(layer), ex.h_id.to_numpy())
        weights = read_layer_weights(run, int(layer))
        ctx = run.read_parquet(
            schema.CONTEXTS_DIR, columns=["ctx_id", "tokens"], filters=[("ctx_id", "in", ex.ctx_id.unique().tolist())]
        ).to_pandas()
        tokens = {int(c): np.asarray(t, np.int64) for c, t in zip(ctx.ctx_id, ctx.tokens)}
        texts = [text_window(tokenizer, tokens[int(c)], int(p)) for c, p in zip(ex.ctx_id, ex.pos)]
        sentence = encoder.encode(texts)
        for neuron in group.neuron:
            mine = (ex.neuron == neuron).to_numpy()
            rows = ex[mine]
            h = layer_h.take(rows.h_id.to_numpy()).astype(np.float64)
            e = weights.embed(h, np.full(len(rows), neuron), run_cfg.model.gated_embedding)
            s = sentence[mine]
            toks = np.concatenate([around(tokens[int(c)], np.array([int(p)])) for c, p in zip(rows.ctx_id, rows.pos)])
            n = len(rows)
            held = np.sort(rng.choice(n, max(1, round(HOLD_OUT * n)), replace=False))
            train = np.setdiff1d(np.arange(n), held)
            threshold = run_cfg.harvest.frac * sign * float(maxima[(int(layer), int(neuron))])
            h_rows = rows.iloc[held]
            quiet = below_threshold(
                [tokens[int(c)] for c in h_rows.ctx_id],
                h_rows.window_start.tolist(),
                h_rows.window.tolist(),
                threshold,
                sign,
                special,
            )
            held_total += len(held)
            quiet_total += len(quiet)
            made = {}
            for method in METHODS:
                made[method] = (
                    made[METHODS[1]]
                    if method == METHODS[4]
                    else split_and_assign(method, e, h, s, train, held, cfg, args.k, args.seed)
                )
                lab, held_lab, kept = made[method]
                if method == METHODS[4]:
                    rules = {int(c): commonest_key(toks[train][lab == c]) for c in kept}
                else:
                    rules = {int(c): best_rule(toks[train][lab == c], toks[train][lab != c], special) for c in kept}
                unit_counts[method] += unit_detection(list(rules.values()), toks[held], quiet)
                n_clusters[method].append(len(kept))
                if method == METHODS[0]:
                    continue
                firing = {c: toks[held][held_lab == c] for c in rules}
                for counts in label_detection(rules, firing, quiet).values():
                    cluster_counts[method] += counts
                for counts in label_detection(rules, firing, np.zeros((0, 3), np.int64)).values():
                    within_counts[method] += counts
                if method != METHODS[4]:  # the same clusters as neuron-embedding clusters
                    keep = np.isin(lab, kept)
                    deltas[method].append(embedding_deltas(s[held], held_lab, s[train][keep], lab[keep]))
    print(
        f"{args.run_dir}: {len(sample)} neurons with >= {args.min_examples} examples (of {len(pool)}), "
        f"{HOLD_OUT:.0%} of each neuron's examples held out ({held_total} examples; {quiet_total} tokens of their "
        f"windows below the threshold); seed {args.seed}"
    )
    print(
        "| method | clusters per neuron | unit: precision / recall / F1 | cluster: precision / recall / F1 | "
        "cluster among the neuron's examples: precision / recall | embedding: closer to own cluster / mean margin |"
    )
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        u = unit_counts[method]
        c, w = cluster_counts.get(method), within_counts.get(method)
        emb = embedding_score(deltas[method]) if method in deltas else None
        print(
            f"| {method} | {np.mean(n_clusters[method]):.2f} | {u.precision:.3f} / {u.recall:.3f} / {u.f1:.3f} | "
            + (
                f"{c.precision:.3f} / {c.recall:.3f} / {c.f1:.3f} | {w.precision:.3f} / {w.recall:.3f} | "
                if c
                else "– | – | "
            )
            + (f"{emb.closer:.3f} / {emb.delta:.4f} (n {emb.n}) |" if emb else "– |")
        )
    if occurrences_ready(manifest):
        occurrence_scores(run, sample, special)
    if state_of(manifest, "detection")[0] == "done":
        detection_scores(run, sample)
    print(f"({time.perf_counter() - start:.0f} s)")


def commonest_key(toks_c: np.ndarray) -> Rule:
    ids, counts = np.unique(toks_c[:, 1], return_counts=True)
    return Rule((int(ids[np.lexsort((ids, -counts))[0]]),))


def run_rules(run: RunDir, layer: int, neuron: int) -> dict[int, Rule]:
    table = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer), filters=[("neuron", "=", int(neuron))])
    return {
        int(r["cluster"]): Rule(tuple(r["key_tokens"]), int(r["context_offset"]), int(r["context_token"]))
        for r in table.to_pylist()
        if not r["outlier"]
    }


def occurrence_scores(run: RunDir, sample, special) -> None:
    """The run's own labels against every held-out token (the occurrence stage's contexts)."""
    from ne.occurrence import heldout_parts, read_heldout

    # Every held-out context (heldout/; its ctx_ids follow the harvest's, so contexts/ never holds them): tokens where
    # nothing fires are negatives too.
    contexts = {int(c): t for part in heldout_parts(run) for c, t in read_heldout(run, part)}
    total = Counts()
    for layer, group in sample.groupby("layer"):
        for neuron in group.neuron:
            occ = run.read_parquet(
                schema.layer_dir(schema.OCCURRENCES_DIR, int(layer)),
                columns=["ctx_id", "pos", "cluster"],
                filters=[("unit", "=", int(neuron))],
            )
            for counts in occurrence_detection(
                *(occ.column(c).to_numpy() for c in ("ctx_id", "pos", "cluster")),
                run_rules(run, int(layer), neuron),
                contexts,
                special,
            ).values():
                total += counts
    print(
        f"held-out occurrences, the run's labels over every held-out token: precision {total.precision:.3f}, "
        f"recall {total.recall:.3f}, F1 {total.f1:.3f}"
    )


def detection_scores(run: RunDir, sample) -> None:
    """The run's LLM detection scores (`ne describe --score`) of the sampled neurons' clusters."""
    from ne.detection import read_detection

    chosen = set(zip(sample.layer, sample.neuron))
    scores = [
        r["balanced_accuracy"] for (layer, neuron, _), r in read_detection(run).items() if (layer, neuron) in chosen
    ]
    scores = [x for x in scores if x == x]
    print(
        f"LLM detection scores of {len(scores)} descriptions of these neurons' clusters on held-out text: mean "
        f"balanced accuracy {np.mean(scores) if scores else float('nan'):.3f}"
    )


def show_labels(run: RunDir, tokenizer, n: int, seed: int) -> None:
    """n random labelled clusters (not outliers) with their size and first examples, to judge by reading."""
    from ne.models.tokenizers import decode_each
    from ne.rundir.reader import RunData, key_token_snippet

    data = RunData(run.url)
    rng = np.random.default_rng(seed)
    layers = run.layers(schema.LABELS_DIR)
    for _ in range(n):
        layer = int(rng.choice(layers))
        labels = run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer)).to_pandas()
        row = labels[~labels.outlier].sample(1, random_state=int(rng.integers(1 << 31))).iloc[0]
        nd = data.neuron(layer, int(row.neuron))
        members = nd.clusters()[int(row.cluster)]
        print(
            f"L{layer} N{row.neuron} C{row.cluster} ({row['size']} examples; {len(nd.clusters())} clusters): "
            f"{row.label}   coverage {row.coverage:.2f}, others {row.others:.2f}, corpus {row.corpus:.4f}"
        )
        for e in members[:4]:
            print("    " + key_token_snippet(e.tokens, e.pos, lambda ids: decode_each(tokenizer, ids), 10, 4))


if __name__ == "__main__":
    main()
