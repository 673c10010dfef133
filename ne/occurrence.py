"""Where every feature cluster fires in held-out text: the occurrence stage's library half (no Ray).

Held-out contexts are text the harvest never saw: by default the `occurrence.contexts` contexts of the run's own
corpus that follow the harvest's (the corpus cut exactly as `contexts/` was, so their ctx_ids continue the
harvest's), or the first contexts of a corpus named in `occurrence.corpus` (ctx_ids from the harvest's count on).
They go to `heldout/` in the CONTEXTS schema. A held-out context identical to one of the harvest's is not held
out: a named corpus holding one is an error, and the run's own corpus (a repeated document) drops it.

Every held-out token and every unit whose activation reaches `occurrence.frac` × its maximum gives one row of
`occurrences/layer=L/part-N.parquet`: the feature cluster the unit's neuron embedding joins there, by
`Explainer.firings`, the very function `ne explain` calls, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ne import schema
from ne.compute.harvest import Context, batches
from ne.config import RunConfig
from ne.data import iter_contexts, iter_documents
from ne.errors import DataError
from ne.explain import Explainer
from ne.models.base import UnitModel
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)


# --- held-out contexts -----------------------------------------------------------------------------------


def _digest(tokens) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


def harvest_digests(run: RunDir) -> set[bytes]:
    """A digest of every harvest context's tokens (16 bytes each), read one part at a time."""
    from ne.rundir.contexts import context_parts, read_contexts

    return {_digest(tokens) for part in context_parts(run) for _, tokens in read_contexts(run, part)}


def heldout_rows(cfg: RunConfig, model: UnitModel, n_harvest: int) -> Iterator[tuple[int, int, list[int]]]:
    """(ctx_id, doc_id, tokens) of the held-out contexts, before any check of overlap."""
    occ, data = cfg.occurrence, cfg.data
    if occ.corpus is None:
        rows = iter_contexts(
            iter_documents(data),
            model.encode,
            model.bos_token_id,
            data.n_ctx,
            data.one_context_per_document,
            n_harvest + occ.contexts,
        )
        for ctx_id, doc_id, tokens in rows:
            if ctx_id >= n_harvest:
                yield ctx_id, doc_id, tokens
        return
    named = dataclasses.replace(data, **dataclasses.asdict(occ.corpus), max_contexts=None)
    rows = iter_contexts(
        iter_documents(named), model.encode, model.bos_token_id, data.n_ctx, data.one_context_per_document, occ.contexts
    )
    for i, doc_id, tokens in rows:
        yield n_harvest + i, doc_id, tokens


def write_heldout(run: RunDir, cfg: RunConfig, model: UnitModel, n_harvest: int) -> dict:
    """Tokenise the held-out contexts into `heldout/` (parts already written are kept: a resumed stage re-reads
    the corpus and writes only the rest). Returns what the manifest records: contexts, tokens, dropped."""
    occ = cfg.occurrence
    seen = harvest_digests(run)
    done = set(run.ls(schema.HELDOUT_DIR, suffix=".parquet"))
    rows: list[tuple[int, int, list[int]]] = []
    n = n_tokens = n_parts = dropped = 0
    first = int(model.bos_token_id is not None)

    def flush() -> None:
        nonlocal n_parts
        name = schema.part_name(n_parts)
        if name not in done:
            ctx, doc, toks = zip(*rows)
            run.write_parquet(
                schema.part_path(schema.HELDOUT_DIR, n_parts),
                pa.table(
                    [pa.array(ctx, pa.int64()), pa.array(doc, pa.int64()), pa.array(toks, pa.list_(pa.int32()))],
                    schema=schema.CONTEXTS,
                ),
            )
        n_parts += 1
        rows.clear()

    for ctx_id, doc_id, tokens in heldout_rows(cfg, model, n_harvest):
        if _digest(tokens) in seen:
            if occ.corpus is not None:
                raise DataError(
                    f"occurrence.corpus overlaps the harvest: its context {ctx_id - n_harvest} (document {doc_id}) "
                    "is identical to a context the harvest used, so it is not held-out text; name a corpus the "
                    "harvest never read, or set occurrence.corpus: null for the contexts after the harvest's"
                )
            dropped += 1
            continue
        rows.append((ctx_id, doc_id, tokens))
        n += 1
        n_tokens += len(tokens) - first
        if len(rows) == occ.contexts_per_part:
            flush()
    if rows:
        flush()
    if n == 0:
        raise DataError(empty_split_message(cfg, n_harvest, dropped))
    if dropped:
        log.warning("%d held-out contexts repeat a harvest context (a repeated document) and were dropped", dropped)
    return {"contexts": n, "tokens": n_tokens, "parts": n_parts, "dropped": dropped}


def empty_split_message(cfg: RunConfig, n_harvest: int, dropped: int = 0) -> str:
    skip = "or set occurrence.contexts: 0 to skip occurrences"
    if cfg.occurrence.corpus is not None:
        return f"the held-out split is empty: occurrence.corpus gives no contexts; check its text, {skip}"
    if dropped:
        return (
            f"the held-out split is empty: all {dropped} contexts after the harvest's repeat harvest contexts; "
            f"name another corpus in occurrence.corpus, {skip}"
        )
    limit = cfg.data.max_contexts
    why = (
        "data.max_contexts is null, so the harvest read the whole corpus"
        if limit is None
        else f"the corpus ends at the harvest's {n_harvest} contexts (data.max_contexts {limit})"
    )
    return (
        f"the held-out split is empty: {why}; set data.max_contexts below {n_harvest} to leave contexts for "
        f"held-out text, name a held-out corpus in occurrence.corpus, {skip}"
    )


def heldout_parts(run: RunDir) -> list[int]:
    return [int(name[len("part-") : -len(".parquet")]) for name in run.ls(schema.HELDOUT_DIR, suffix=".parquet")]


def read_heldout(run: RunDir, part: int) -> list[Context]:
    """The contexts of one held-out part, in order."""
    from ne.rundir.contexts import read_contexts

    return read_contexts(run, part, schema.HELDOUT_DIR)


# --- occurrences -----------------------------------------------------------------------------------------


def layer_groups(run: RunDir, layers: Sequence[int], memory_mb: int) -> list[list[int]]:
    """Consecutive layers whose `LayerClusters` (float32: one d_model row per candidate cluster, one per unit) and
    input weights fit in `memory_mb` together; a layer alone over it is its own group. One forward pass over the
    held-out text per group."""
    from ne.rundir.weights import read_layer_weights

    groups: list[list[int]] = []
    used = budget = memory_mb * 2**20
    for layer in layers:
        w = read_layer_weights(run, layer, 0, 0)
        folder = schema.layer_dir(schema.CENTROIDS_DIR, layer)
        n_vectors = sum(run.read_footer(f"{folder}/{name}").num_rows for name in run.ls(folder, suffix=".parquet"))
        cost = 4 * w.gate.shape[1] * (n_vectors + w.d_mlp * (2 + w.gated))
        if not groups or used + cost > budget:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += cost
    return groups


PENDING_BYTES = 256 * 2**20
"""Pre-MLP embeddings of firing tokens held before their firings are assigned, all layers together: assigning many
tokens at once makes one product per firing unit serve more tokens."""


@torch.inference_mode()
def part_occurrences(
    explainer: Explainer, contexts: Sequence[Context], batch_size: int, pending_bytes: int = PENDING_BYTES
) -> dict[int, pa.Table]:
    """Per layer of the explainer, the OCCURRENCES rows of these contexts, sorted by unit, ctx_id, pos.

    The model runs on batches of contexts; `Explainer.fire` finds each batch's firings (never at BOS or padding),
    and `Explainer.assign` gives them their clusters once `pending_bytes` of their tokens' h are held."""
    model = explainer.model
    first = int(model.bos_token_id is not None)
    budget = max(1, pending_bytes // max(len(explainer.layers), 1))
    pending = {layer: _Pending() for layer in explainer.layers}
    tables: dict[int, list[tuple]] = {layer: [] for layer in explainer.layers}
    for ctx_ids, tokens, mask in batches(contexts, batch_size, model.pad_token_id):
        out = model.run(tokens.to(model.device), mask.to(model.device), explainer.layers)
        lengths = mask.sum(dim=1).tolist()
        for layer in explainer.layers:
            row, pos, unit, act = explainer.fire(layer, out[layer].act, lengths, first)
            token, index = np.unique(row * tokens.shape[1] + pos, return_inverse=True)
            h = _rows(out[layer].h.reshape(-1, model.d_model), token)
            pending[layer].add(ctx_ids.numpy()[row], pos, unit, act, h, index)
            if pending[layer].nbytes >= budget:
                tables[layer].append(pending[layer].assign(explainer, layer))
    for layer in explainer.layers:
        tables[layer].append(pending[layer].assign(explainer, layer))
    return {layer: _table(layer, rows) for layer, rows in tables.items()}


def _rows(x: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """x[rows] as a float32 array: gathered in numpy on a CPU (one thread), where x is on a GPU."""
    if x.device.type == "cpu":
        return np.asarray(x.float().numpy()[rows], np.float32)
    return x[torch.from_numpy(rows).to(x.device)].float().cpu().numpy()


class _Pending:
    """Firings of one layer waiting for their clusters, with the h rows of their tokens."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.rows: list[tuple] = []
        self.h: list[np.ndarray] = []
        self.n_tokens = self.nbytes = 0

    def add(self, ctx, pos, unit, act, h, index) -> None:
        self.rows.append((ctx, pos, unit, act, index + self.n_tokens))
        self.h.append(h)
        self.n_tokens += len(h)
        self.nbytes += h.nbytes

    def assign(self, explainer: Explainer, layer: int) -> tuple:
        if not self.rows:
            return tuple(np.zeros(0, t) for t in (np.int64, np.int64, np.int64, np.int32, np.float32, np.float32))
        ctx, pos, unit, act, token = (np.concatenate(c) for c in zip(*self.rows))
        cluster, sim = explainer.assign(layer, unit, np.concatenate(self.h), token)
        self.clear()
        return ctx, pos, unit, cluster, act, sim


def _table(layer: int, rows: list[tuple]) -> pa.Table:
    ctx, pos, unit, cluster, act, sim = (np.concatenate(c) for c in zip(*rows))
    order = np.lexsort((pos, ctx, unit))
    return pa.Table.from_arrays(
        [
            pa.array(ctx[order].astype(np.int64)),
            pa.array(pos[order].astype(np.int16)),
            pa.array(np.full(len(ctx), layer, np.int16)),
            pa.array(unit[order].astype(np.int32)),
            pa.array(cluster[order].astype(np.int32)),
            pa.array(act[order].astype(np.float32)),
            pa.array(sim[order].astype(np.float32)),
        ],
        schema=schema.OCCURRENCES,
    )


OCCURRENCE_ROW_GROUP = 65_536
"""Rows per row group of an occurrences part: a reader of a few units decodes a few groups of each part."""


def occurrence_file(layer: int, part: int) -> str:
    return schema.part_path(schema.OCCURRENCES_DIR, part, layer)


# --- reading ---------------------------------------------------------------------------------------------


def token_rows(run: RunDir, layer: int, occ: pa.Table, key_t: np.ndarray) -> np.ndarray:
    """For each row of an occurrences table of `layer`, its index in `key_t` (held-out token keys, ctx_id *
    TOKEN_KEY + pos, sorted); an error when some occurrence names a token that `heldout/` does not hold."""
    from ne.compute.scores import TOKEN_KEY

    token = occ.column("ctx_id").to_numpy().astype(np.int64) * TOKEN_KEY + occ.column("pos").to_numpy()
    row = np.searchsorted(key_t, token).clip(0, max(len(key_t) - 1, 0))
    if len(token) and not np.array_equal(key_t[row], token):
        raise DataError(
            f"{run.url}: occurrences of layer {layer} name tokens that {schema.HELDOUT_DIR}/ does not hold; "
            "redo them with `ne occurrence --config CONFIG --force occurrence`"
        )
    return row


def read_occurrences(
    run_dir: str | RunDir, layer: int, units: Sequence[int] | None = None, ctx_ids: Sequence[int] | None = None
) -> pa.Table:
    """OCCURRENCES rows of one layer of a finished occurrence stage: all of them, or those of `units` and/or of
    the held-out contexts `ctx_ids`. Each part's rows are sorted by unit, so a few units read a few row groups."""
    from ne.rundir.stages import require_done

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    entry = require_done(run, "occurrence")
    if layer not in entry["info"]["layers"]:
        raise DataError(f"layer {layer} has no occurrences in {run.url}; it has layers {entry['info']['layers']}")
    keep = None
    if units is not None:
        wanted = np.unique(np.asarray(units, np.int64))
        keep = pc.field("unit").isin(wanted)
        if len(wanted):
            keep = (pc.field("unit") >= int(wanted[0])) & (pc.field("unit") <= int(wanted[-1])) & keep
    if ctx_ids is not None:
        by_ctx = pc.field("ctx_id").isin(np.unique(np.asarray(ctx_ids, np.int64)))
        keep = by_ctx if keep is None else keep & by_ctx
    return run.read_parquet(schema.layer_dir(schema.OCCURRENCES_DIR, layer), filters=keep)


def heldout_tokens(run_dir: str | RunDir, ctx_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """{ctx_id: token ids (BOS first where the model uses one)} of held-out contexts; ids that are not held out
    are an error naming them."""
    from ne.rundir.reader import RunData

    data = run_dir if isinstance(run_dir, RunData) else RunData(run_dir.url if isinstance(run_dir, RunDir) else run_dir)
    return data.heldout_tokens(ctx_ids)
