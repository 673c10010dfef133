"""Planted features: examples whose true behaviours are known, for tests and the threshold benchmark.

Each example's h lies near one of a few feature directions in the first `d_signal` dimensions. The other
dimensions carry large noise shared by every feature (a common offset plus per-example noise), and the
neuron's weights w select the signal dimensions (w is small elsewhere). So h ⊙ w sees the features while
raw h is dominated by the noise: the mechanism behind the paper's Figure 4. `nuisance` adds structured
variation that w ignores: a few discrete states in the noise dimensions (such as a context's topic or
position), drawn independently of the features, strong enough to leak into h ⊙ w through w's small weights.
"""

from __future__ import annotations

import numpy as np


def planted_features(
    seed: int = 0,
    sizes: tuple[int, ...] = (40, 30, 20, 10),
    d_model: int = 64,
    d_signal: int = 12,
    spread: float = 0.15,
    offset: float = 3.0,
    noise: float = 3.0,
    nuisance: float = 0.0,
    nuisance_states: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns h [n, d_model] float32, w [d_model] float32 and the true feature of each example [n].

    `nuisance`: the norm of each of `nuisance_states` directions in the noise dimensions; every example gets
    one at random (0: none, and the same draws as without it)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(sizes), d_signal))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(truth)
    n, d_noise = len(truth), d_model - d_signal
    h = np.empty((n, d_model))
    h[:, :d_signal] = directions[truth] + spread * rng.normal(size=(n, d_signal))
    common = rng.normal(size=d_noise)
    h[:, d_signal:] = offset * common / np.linalg.norm(common) + noise * rng.normal(size=(n, d_noise)) / np.sqrt(
        d_noise
    )
    w = np.full(d_model, 0.02)
    w[:d_signal] = rng.uniform(0.5, 1.5, size=d_signal)
    if nuisance:
        states = rng.normal(size=(nuisance_states, d_noise))
        states *= nuisance / np.linalg.norm(states, axis=1, keepdims=True)
        h[:, d_signal:] += states[rng.integers(0, nuisance_states, n)]
    return h.astype(np.float32), w.astype(np.float32), truth


def write_synthetic_run(
    url: str,
    layers: tuple[int, ...] = (0, 2),
    d_mlp: int = 7,
    d_model: int = 32,
    n_ctx: int = 16,
    vocab: int = 50,
    seed: int = 0,
) -> dict:
    """A run directory as the harvest writes it (examples/, h/, weights/, contexts/, manifest), built from
    planted features: neuron j of a layer has examples from a few known features, its W_in column is the
    planted w. Neuron counts cycle through 0, 1, 2 and larger example sets; neighbouring neurons share
    some h rows, as real neurons share example positions. Returns, per (layer, neuron), the true feature
    of each example and its h, in rank order.
    """
    import pyarrow as pa
    import torch

    from ne import schema
    from ne.config import RunConfig, to_dict
    from ne.rundir.store import RunDir
    from ne.rundir.weights import weights_file
    from tests.viewer.viewer_run import stage

    run = RunDir(url)
    cfg = RunConfig(run_dir=url)
    rng = np.random.default_rng(seed)
    files = {}
    splits = [(), (1,), (1, 1), (12, 8, 5), (20, 15, 10, 5), (30, 10)]
    truth, next_ctx, contexts = {}, 0, []
    for layer in layers:
        w_in = np.zeros((d_model, d_mlp), np.float32)
        examples, h_rows = [], {}
        prev: list[tuple[int, int, int]] = []
        for neuron in range(d_mlp):
            sizes = splits[neuron % len(splits)]
            h, w, feats = (
                planted_features(seed * 1000 + layer * 100 + neuron, sizes=sizes or (1,), d_model=d_model, d_signal=8)
                if sizes
                else (np.zeros((0, d_model)), np.ones(d_model), [])
            )
            w_in[:, neuron] = w
            keys = []
            for i in range(len(h)):
                if i < 3 and i < len(prev):  # share the previous neuron's first positions
                    ctx, pos, hid = prev[i]
                    h[i] = h_rows[hid]
                else:
                    ctx, pos = next_ctx, int(rng.integers(1, n_ctx))
                    next_ctx += 1
                    hid = schema.h_id(ctx, pos, n_ctx)
                    contexts.append(ctx)
                h_rows[hid] = h[i]
                keys.append((ctx, pos, hid))
            assert keys == sorted(keys), "ranks must follow corpus order"
            truth[(layer, neuron)] = (np.asarray(feats), h.astype(np.float32))
            for rank, (ctx, pos, hid) in enumerate(keys):
                examples.append((layer, neuron, rank, ctx, pos, 1.0, max(0, pos - 3), [0.5, 1.0], hid))
            prev = keys
        cols = list(zip(*examples))
        hids = sorted(h_rows)
        files[layer] = (
            pa.Table.from_arrays(
                [pa.array(c, type=f.type) for c, f in zip(cols, schema.EXAMPLES)], schema=schema.EXAMPLES
            ),
            pa.table(
                {
                    "h_id": hids,
                    "ctx_id": [i // n_ctx for i in hids],
                    "pos": [i % n_ctx for i in hids],
                    "h": [h_rows[i].tolist() for i in hids],
                },
                schema=schema.h_schema(d_model),
            ),
            weights_file({"W_in": torch.from_numpy(w_in), "b_in": torch.zeros(d_mlp)}),
        )
    tokens = [rng.integers(0, vocab, size=n_ctx).astype(np.int32).tolist() for _ in range(next_ctx)]
    run.set_manifest_entry("config", to_dict(cfg))  # as the harvest records the config it ran with
    run.set_manifest_entry(
        "model", {"name": "synthetic", "n_layers": max(layers) + 1, "d_model": d_model, "d_mlp": d_mlp}
    )
    layers = list(layers)
    with stage(run, "contexts", cfg, n_contexts=next_ctx):
        run.write_parquet(
            f"{schema.CONTEXTS_DIR}/{schema.part_name(0)}",
            pa.table(
                {"ctx_id": list(range(next_ctx)), "doc_id": list(range(next_ctx)), "tokens": tokens},
                schema=schema.CONTEXTS,
            ),
        )
    with stage(run, "sae", cfg):  # no SAE: the model's own neurons are the units
        pass
    with stage(run, "weights", cfg, layers=layers):
        for layer in layers:
            run.write_bytes(schema.weights_path(layer), files[layer][2])
    with stage(run, "maxima", cfg, layers=layers):
        run.write_parquet(
            schema.MAXIMA,
            pa.table(
                {
                    "layer": np.repeat(layers, d_mlp),
                    "neuron": np.tile(np.arange(d_mlp), len(layers)),
                    "max_act": np.ones(len(layers) * d_mlp),
                },
                schema=schema.MAXIMA_SCHEMA,
            ),
        )
    with stage(run, "examples", cfg, layers=layers, rows=sum(len(v[1]) for v in truth.values())):
        for layer in layers:
            run.write_parquet(f"{schema.layer_dir(schema.EXAMPLES_DIR, layer)}/{schema.part_name(0)}", files[layer][0])
            run.write_parquet(f"{schema.layer_dir(schema.H_DIR, layer)}/{schema.part_name(0)}", files[layer][1])
    return truth


PLACEMENTS = ("gate", "up", "both")


def planted_gated_features(
    seed: int = 0,
    where: str = "both",
    sizes: tuple[int, ...] = (40, 30, 20, 10),
    d_model: int = 64,
    d_signal: int = 12,
    spread: float = 0.15,
    offset: float = 3.0,
    noise: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Planted features for a gated neuron act_fn(h·g)·(h·u). Returns h [n, d_model], g, u [d_model], truth [n].

    Dimensions 0..d_signal-1 are read by the gate (g large, u small), the next d_signal by the up projection
    (u large, g small); the rest carry the shared offset and noise of `planted_features`, with both weights
    small. `where` puts the features' directions in the gate's block, the up block or across both; a block
    without features holds one direction common to every example (the neuron still needs it to fire), plus
    the same spread. So `gate` (h ⊙ g) is blind to features in the up projection, and `concat` sees both.
    """
    if where not in PLACEMENTS:
        raise ValueError(f"where is {where!r}; one of {PLACEMENTS}")
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(truth)
    n, k = len(truth), len(sizes)
    gate_dims, up_dims = slice(0, d_signal), slice(d_signal, 2 * d_signal)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    h = np.empty((n, d_model))
    if where == "both":
        directions = unit(rng.normal(size=(k, 2 * d_signal))) * np.sqrt(2)
        h[:, : 2 * d_signal] = directions[truth]
    else:
        featured, common = (gate_dims, up_dims) if where == "gate" else (up_dims, gate_dims)
        h[:, featured] = unit(rng.normal(size=(k, d_signal)))[truth]
        h[:, common] = unit(rng.normal(size=d_signal))
    h[:, : 2 * d_signal] += spread * rng.normal(size=(n, 2 * d_signal))
    d_noise = d_model - 2 * d_signal
    shared = rng.normal(size=d_noise)
    h[:, 2 * d_signal :] = offset * shared / np.linalg.norm(shared) + noise * rng.normal(size=(n, d_noise)) / np.sqrt(
        d_noise
    )
    g, u = np.full(d_model, 0.02), np.full(d_model, 0.02)
    g[gate_dims], u[up_dims] = rng.uniform(0.5, 1.5, size=d_signal), rng.uniform(0.5, 1.5, size=d_signal)
    g[up_dims], u[gate_dims] = 0.1 * rng.normal(size=d_signal), 0.1 * rng.normal(size=d_signal)
    return h.astype(np.float32), g.astype(np.float32), u.astype(np.float32), truth
