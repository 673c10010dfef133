"""Similar features judged by held-out behaviour: which answer's hits fire where the query fires.

    python benchmarks/similar.py runs/demo                 # the tables of docs/measurements.md
    python benchmarks/similar.py runs/demo --queries 300 --fracs 0.5 0.6 0.75 0.9

The run's held-out contexts (its occurrence stage) are split in two by ctx_id: even ones learn co-activation,
odd ones judge. A query is a feature cluster (of at least cluster.min_cluster_size examples) that occurs in the
judging half; its held-out occurrences are the judging tokens where it occurs at `--judge` × its unit's maximum.
Each answer gives 10 feature clusters of other neurons; a hit scores the share of the query's held-out
occurrences on which the hit's neuron reaches `--judge` × its maximum (the measure of ENVIRONMENT.md's first
look), and, stricter, on which the hit's own feature cluster occurs. precision@10 is the mean over the 10 hits
(a missing hit scores 0) and over queries.

Answers: exact search over vectors of every cluster (neuron: the central example's h ⊙ w_j, the index's default
before this measurement; pre_mlp: the central example's h; mean_pre_mlp: the mean of the members' unit h;
centroid: the mean of the members' unit neuron embeddings, what `ne explain` assigns to), co-activation learned on
the even half (every score, a few min_count cuts, at every frac), the 10 features that occur most often in the
learning half whatever the query (a baseline that rewards dense features), and 10 random clusters.
The behavioural rows use the same functions as the co-activation stage (`ne.coactivation.scores`, its ranking).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import coactivation as co  # noqa: E402
from ne import schema  # noqa: E402
from ne.compute.coactivation import SCORES, FeatureIds, strongest  # noqa: E402
from ne.compute.embed import unit_rows  # noqa: E402
from ne.compute.harvest import SIGNS  # noqa: E402
from ne.config import IndexConfig, RunConfig  # noqa: E402
from ne.occurrence import read_occurrences  # noqa: E402
from ne.rundir.maxima import signed_extremes  # noqa: E402
from ne.rundir.reader import RunData  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402
from ne.rundir.weights import read_layer_weights  # noqa: E402

K = 10
VECTORS = ("neuron", "pre_mlp", "mean_pre_mlp")


def load_occurrences(run: RunDir, layers, direction: str, ids: FeatureIds) -> pd.DataFrame:
    """Every occurrence with its unit's of_max (act / its maximum, signed as the harvest's) and feature id."""
    extremes = signed_extremes(run, layers, direction)
    sign = SIGNS[direction]
    frames = []
    for layer in layers:
        t = read_occurrences(run, layer).to_pandas()
        t = t[t.cluster >= 0]
        t["of_max"] = sign * t.act.to_numpy() / extremes[layer][t.unit.to_numpy()]
        t["fid"] = ids.ids(layer, t.unit.to_numpy().astype(np.int64), t.cluster.to_numpy())
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def vectors(run: RunDir, layers, ids: FeatureIds, gated_embedding: str) -> dict[str, np.ndarray]:
    """Unit vectors of every feature cluster, in FeatureIds order, for each vector answer: the index's own
    (`index.build.central_vectors`) and the centroids `ne explain` assigns to."""
    from index.build import central_vectors

    out: dict[str, list[np.ndarray]] = {name: [] for name in (*VECTORS, "centroid")}
    for layer in sorted(layers):
        start = ids.starts[layer]
        for name in VECTORS:
            table, v = central_vectors(run, layer, name, gated_embedding)
            arr = np.zeros((start[-1] - start[0], v.shape[1]), np.float32)
            arr[start[table.column("neuron").to_numpy()] + table.column("cluster").to_numpy() - start[0]] = v
            out[name].append(arr)
        cent = run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer)).to_pandas()
        arr = np.zeros((start[-1] - start[0], len(cent.vector.iloc[0])), np.float32)
        arr[start[cent.neuron.to_numpy()] + cent.cluster.to_numpy() - start[0]] = np.stack(cent.vector.to_numpy())
        out["centroid"].append(unit_rows(arr))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def vector_answers(x: np.ndarray, queries: np.ndarray, ids: FeatureIds) -> np.ndarray:
    """[q, K] nearest other-neuron features by cosine (exact)."""
    sims = x[queries] @ x.T
    same = (ids.layer[queries][:, None] == ids.layer[None, :]) & (ids.neuron[queries][:, None] == ids.neuron[None, :])
    sims[same] = -np.inf
    top = np.argpartition(-sims, K, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def query_pairs(fid: np.ndarray, token: np.ndarray, queries: np.ndarray) -> pd.DataFrame:
    """(a, b, count): for every query a, every other feature b on one of its tokens, and on how many."""
    is_q = np.isin(fid, queries)
    q_tok = pd.DataFrame({"a": fid[is_q], "token": token[is_q]})
    all_tok = pd.DataFrame({"b": fid, "token": token})
    both = q_tok.merge(all_tok, on="token")
    both = both[both.a != both.b]
    return both.groupby(["a", "b"]).size().rename("count").reset_index()


def behaviour_answers(
    pairs: pd.DataFrame,
    n_a: np.ndarray,
    n_tokens: int,
    queries: np.ndarray,
    ids: FeatureIds,
    score: str,
    min_count: int,
) -> np.ndarray:
    """[q, K]: the stage's own table (`coactivation_tables`: its cut, score and ranking) for the queries' pairs;
    -1 where a query fires with fewer features."""
    p = pairs[pairs["count"] >= min_count]
    keys = p.a.to_numpy().astype(np.int64) * ids.n + p.b.to_numpy()
    order = np.argsort(keys)
    tables = co.coactivation_tables(keys[order], p["count"].to_numpy()[order], ids, n_a, n_tokens, score, K)
    out = np.full((len(queries), K), -1, np.int64)
    row = {q: i for i, q in enumerate(queries.tolist())}
    for layer, t in tables.items():
        d = t.to_pandas()
        a = ids.starts[layer][d.neuron.to_numpy()] + d.cluster.to_numpy()
        b = np.array([ids.starts[lb][nb] + cb for lb, nb, cb in zip(d.layer_b, d.neuron_b, d.cluster_b)], np.int64)
        rank = d.groupby(["neuron", "cluster"]).cumcount().to_numpy()
        out[[row[int(x)] for x in a], rank] = b
    return out


def fill(answers: np.ndarray, backup: np.ndarray) -> np.ndarray:
    """`SimilarFeatures.query`'s default: the behavioural hits, then the vector hits not among them."""
    out = answers.copy()
    for i, (hits, more) in enumerate(zip(answers, backup)):
        have = [h for h in hits if h >= 0]
        out[i] = (have + [m for m in more if m not in have])[:K]
    return out


class Judge:
    """The judging half: a query's occurrences there, and whether a feature (or its neuron) fires on a token."""

    def __init__(self, occ: pd.DataFrame, ids: FeatureIds, d_mlp_max: int, n_ctx: int, judge: float):
        j = occ[occ.of_max >= judge]
        self.token = j.ctx_id.to_numpy() * n_ctx + j.pos.to_numpy()
        self.fid = j.fid.to_numpy()
        self.n = ids.n
        self.width = (int(ids.layer.max()) + 1) * d_mlp_max
        self.d_mlp = d_mlp_max
        self.ids = ids
        self.unit_keys = np.unique(self.token * self.width + j.layer.to_numpy() * d_mlp_max + j.unit.to_numpy())
        self.feature_keys = np.unique(self.token * self.n + self.fid)
        order = np.argsort(self.fid, kind="stable")
        self.by_fid_tokens, self.by_fid = self.token[order], self.fid[order]

    def tokens_of(self, f: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.by_fid, [f, f + 1])
        return self.by_fid_tokens[lo:hi]

    def precision(self, queries: np.ndarray, answers: np.ndarray) -> tuple[float, float]:
        """(neuron fires, feature occurs): mean over queries of the mean over K hits of the share of the query's
        judging tokens where the hit fires."""
        loose, strict = [], []
        for q, hits in zip(queries, answers):
            tokens = self.tokens_of(int(q))
            hits = hits[hits >= 0]
            unit = (self.ids.layer[hits].astype(np.int64) * self.d_mlp + self.ids.neuron[hits])[:, None]
            loose.append(_member(tokens[None, :] * self.width + unit, self.unit_keys).mean(axis=1).sum() / K)
            strict.append(_member(tokens[None, :] * self.n + hits[:, None], self.feature_keys).mean(axis=1).sum() / K)
        return float(np.mean(loose)), float(np.mean(strict))


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    at = np.searchsorted(sorted_keys, keys).clip(0, len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    return buf.tell()


def central_judge(
    run: RunDir, cfg: RunConfig, ids: FeatureIds, queries: np.ndarray, judge: float, layers
) -> tuple[np.ndarray, np.ndarray]:
    """(fires [q, layers × d_mlp] at each query's central example, harvest-corpus contexts the co-activation never
    saw): ENVIRONMENT.md's first measure. Recomputed with the run's model."""
    import torch

    from ne.models import load_units
    from ne.rundir.contexts import read_contexts
    from ne.rundir.reader import central_examples

    central = {}
    for layer in layers:
        t = central_examples(run, layer).to_pandas()
        t["fid"] = ids.starts[layer][t.neuron.to_numpy()] + t.cluster.to_numpy()
        central.update({int(f): (int(c), int(p)) for f, c, p in zip(t.fid, t.ctx_id, t.pos)})
    wanted = {central[int(q)][0] for q in queries}
    tokens = {
        c: t
        for part in range(len(run.ls(schema.CONTEXTS_DIR, suffix=".parquet")))
        for c, t in read_contexts(run, part)
        if c in wanted
    }
    model = load_units(cfg)
    extremes = signed_extremes(run, layers, cfg.harvest.direction)
    sign = SIGNS[cfg.harvest.direction]
    d_mlp = len(extremes[layers[0]])
    fires = np.zeros((len(queries), len(layers) * d_mlp), bool)
    with torch.inference_mode():
        for i, q in enumerate(queries):
            ctx, pos = central[int(q)]
            t = torch.as_tensor(np.asarray(tokens[ctx])[None])
            out = model.run(t, torch.ones_like(t), list(layers))
            for j, layer in enumerate(layers):
                act = sign * out[layer].act[0, pos].float().numpy()
                fires[i, j * d_mlp : (j + 1) * d_mlp] = (act >= judge * extremes[layer]) & (extremes[layer] > 0)
    return fires, d_mlp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--fracs", type=float, nargs="+", default=[0.5, 0.6, 0.75])
    p.add_argument("--judge", type=float, default=0.5, help="a neuron fires at this × its maximum, when judging")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vectors",
        default=IndexConfig().vectors,
        choices=VECTORS,
        help="the vector answer that fills the default answer (default: index.vectors' default)",
    )
    args = p.parse_args()
    start = time.perf_counter()
    run = RunDir(args.run_dir)
    m = run.require_manifest()
    cfg = RunData(args.run_dir).config(m)  # each setting as the stage that made what is read ran with it
    info = m["stages"]["occurrence"]["info"]
    layers, base = sorted(info["layers"]), float(info["frac"])
    if base > min(min(args.fracs), args.judge):
        sys.exit(
            f"the run's occurrences were found at frac {base}; rerun its occurrence stage at or below "
            f"{min(min(args.fracs), args.judge)} (--set occurrence.frac=...)"
        )
    ids = co.feature_ids(run, layers)
    occ = load_occurrences(run, layers, cfg.harvest.direction, ids)
    learn, judge_half = occ[occ.ctx_id % 2 == 0], occ[occ.ctx_id % 2 == 1]
    heldout = run.read_parquet(schema.HELDOUT_DIR).to_pandas()
    first = int(m.get("model", {}).get("bos_token_id") is not None)
    tokens_of_ctx = heldout.tokens.map(len).to_numpy() - first
    n_learn = int(tokens_of_ctx[heldout.ctx_id.to_numpy() % 2 == 0].sum())
    n_judge = int(tokens_of_ctx[heldout.ctx_id.to_numpy() % 2 == 1].sum())
    d_mlp = max(read_layer_weights(run, layer, 0, 0).d_mlp for layer in layers)
    judge = Judge(judge_half, ids, d_mlp, cfg.data.n_ctx, args.judge)

    sizes = np.zeros(ids.n, np.int64)
    for layer in layers:
        c = run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer), columns=["neuron", "cluster", "size"])
        sizes[ids.starts[layer][c.column("neuron").to_numpy()] + c.column("cluster").to_numpy()] = c.column(
            "size"
        ).to_numpy()
    eligible = np.intersect1d(np.flatnonzero(sizes >= cfg.cluster.min_cluster_size), np.unique(judge.fid))
    rng = np.random.default_rng(args.seed)
    queries = np.sort(rng.choice(eligible, min(args.queries, len(eligible)), replace=False))
    print(
        f"{args.run_dir}: held-out contexts split by ctx_id: {len(learn):,} occurrences learn ({n_learn:,} tokens), "
        f"{len(judge_half):,} judge ({n_judge:,} tokens), found at frac {base}; {ids.n:,} feature clusters, "
        f"{len(eligible):,} of them (>= {cfg.cluster.min_cluster_size} examples) occur in the judging half at "
        f"{args.judge} × max; {len(queries)} queries (seed {args.seed})"
    )
    fires_central, d_central = central_judge(run, cfg, ids, queries, args.judge, layers)

    def central_precision(answers: np.ndarray) -> float:
        col = ids.layer[np.maximum(answers, 0)].astype(np.int64) * d_central + ids.neuron[np.maximum(answers, 0)]
        hit = np.take_along_axis(fires_central, col, axis=1) & (answers >= 0)
        return float(hit.sum(axis=1).mean() / K)

    def judged(name: str, answers: np.ndarray, note: str = "") -> tuple:
        loose, strict = judge.precision(queries, answers)
        return (name, loose, strict, central_precision(answers), float((answers >= 0).mean()), note)

    rows = []
    x = vectors(run, layers, ids, cfg.model.gated_embedding)
    vector_top = {name: vector_answers(v, queries, ids) for name, v in x.items()}
    for name in (*VECTORS, "centroid"):
        rows.append(judged(f"vector: {name}", vector_top[name], "the index's default" if name == args.vectors else ""))
    c = cfg.coactivation
    frac = cfg.occurrence.frac
    at = learn[learn.of_max >= frac]
    n_a = np.bincount(at.fid.to_numpy(), minlength=ids.n)
    paired = at.iloc[
        strongest(at.ctx_id.to_numpy() * cfg.data.n_ctx + at.pos.to_numpy(), at.of_max.to_numpy(), c.max_per_token)
    ]
    pairs = query_pairs(
        paired.fid.to_numpy(), paired.ctx_id.to_numpy() * cfg.data.n_ctx + paired.pos.to_numpy(), queries
    )
    pure = behaviour_answers(pairs, n_a, n_learn, queries, ids, c.score, c.min_count)
    rows.append(
        judged(
            f"behaviour: {c.score}, min_count {c.min_count}, max_per_token {c.max_per_token}", pure, "its hits alone"
        )
    )
    default = fill(pure, vector_top[args.vectors])
    rows.append(judged("the default answer", default, f"behaviour, then {args.vectors} vectors"))
    n_learn_occ = np.bincount(at.fid.to_numpy(), minlength=ids.n)
    popular = np.argsort(-n_learn_occ, kind="stable")
    pop = np.array(
        [
            [f for f in popular[: 4 * K] if ids.neuron[f] != ids.neuron[q] or ids.layer[f] != ids.layer[q]][:K]
            for q in queries
        ]
    )
    rows.append(judged("baseline: the 10 densest features", pop, "whatever the query"))
    rows.append(judged("baseline: random", rng.choice(ids.n, (len(queries), K))))
    j_at = judge_half[judge_half.of_max >= frac]
    oracle_pairs = query_pairs(
        j_at.fid.to_numpy(), j_at.ctx_id.to_numpy() * cfg.data.n_ctx + j_at.pos.to_numpy(), queries
    )
    oracle = behaviour_answers(
        oracle_pairs, np.bincount(j_at.fid.to_numpy(), minlength=ids.n), n_judge, queries, ids, "count", 1
    )
    rows.append(judged("ceiling: count learned on the judging half", oracle, "not held out: an upper bound"))

    caps = []
    for cap in (None, 128, 64, 32):
        rows_cap = at.iloc[
            strongest(at.ctx_id.to_numpy() * cfg.data.n_ctx + at.pos.to_numpy(), at.of_max.to_numpy(), cap)
        ]
        token = rows_cap.ctx_id.to_numpy() * cfg.data.n_ctx + rows_cap.pos.to_numpy()
        answers = behaviour_answers(
            query_pairs(rows_cap.fid.to_numpy(), token, queries), n_a, n_learn, queries, ids, c.score, c.min_count
        )
        g = np.bincount(np.unique(token, return_inverse=True)[1])
        caps.append(
            (
                cap,
                *judge.precision(queries, answers),
                judge.precision(queries, fill(answers, vector_top[args.vectors]))[0],
                float((g * (g - 1)).sum() / n_learn),
            )
        )

    grid = []
    for f in sorted(args.fracs):
        part = learn[learn.of_max >= f]
        n_f = np.bincount(part.fid.to_numpy(), minlength=ids.n)
        pairs_f = query_pairs(
            part.fid.to_numpy(), part.ctx_id.to_numpy() * cfg.data.n_ctx + part.pos.to_numpy(), queries
        )
        table = pa.Table.from_pandas(part[list(schema.OCCURRENCES.names)], preserve_index=False).cast(
            schema.OCCURRENCES
        )
        per_mtok = parquet_bytes(table) / n_learn * 1e6
        for score in SCORES:
            for min_count in (1, 2, 3):
                answers = behaviour_answers(pairs_f, n_f, n_learn, queries, ids, score, min_count)
                loose, strict = judge.precision(queries, answers)
                loose_filled, _ = judge.precision(queries, fill(answers, vector_top[args.vectors]))
                grid.append(
                    (
                        f,
                        score,
                        min_count,
                        loose,
                        strict,
                        loose_filled,
                        central_precision(answers),
                        float((answers >= 0).mean()),
                        len(part) / n_learn,
                        per_mtok / 2**20,
                    )
                )
    pd.set_option("display.width", 250)
    table = pd.DataFrame(rows, columns=["answer", "p@10 held-out", "p@10 strict", "p@10 central", "hits", "note"])
    print(
        f"\nprecision@10 (held-out: the hit's neuron reaches {args.judge} × max on the query's held-out occurrences; "
        "strict: the hit's feature itself occurs there; central: the hit's neuron reaches it on the query's "
        "central example):"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    grid = pd.DataFrame(
        grid,
        columns=[
            "frac",
            "score",
            "min_count",
            "p@10 held-out",
            "p@10 strict",
            "p@10 filled",
            "p@10 central",
            "hits",
            "occurrences/token",
            "MiB/Mtok",
        ],
    )
    print(
        "\nCo-activation learned on the even half, all pairs, by threshold, score and min_count (filled: the "
        f"behavioural hits, then {args.vectors} vectors, as the default answer):"
    )
    print(grid.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"\nCapping the occurrences that pair up per token (coactivation.max_per_token; the strongest kept), at frac "
        f"{frac}, {c.score}, min_count {c.min_count}:"
    )
    print(
        pd.DataFrame(
            caps, columns=["max_per_token", "p@10 held-out", "p@10 strict", "p@10 filled", "pairs/token"]
        ).to_string(index=False, float_format=lambda v: f"{v:.3f}")
    )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
