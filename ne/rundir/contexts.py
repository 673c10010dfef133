"""The run's contexts, `contexts/part-NNNNN.parquet`: the corpus tokenised once (stage `contexts`), then read
by part in corpus order by every pass over it."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from ne import schema
from ne.compute.harvest import Context
from ne.config import RunConfig
from ne.data import describe_source, iter_contexts, iter_documents
from ne.errors import ConfigError, DataError
from ne.models.base import UnitModel
from ne.rundir.stages import Stage
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)


def tokenizer_probe(model: UnitModel) -> dict:
    """What the contexts depend on beyond the config: a changed tokenizer is noticed."""
    return {"bos_token_id": model.bos_token_id, "probe": model.encode("Neuron embeddings: 0123 ÄÖü, tokens!")}


def write_contexts(run: RunDir, run_cfg: RunConfig, model: UnitModel, force: Collection[str] = ()) -> int:
    """Tokenise the corpus into `contexts/`; returns the number of contexts. Skipped when already done.

    An interrupted run resumes: the corpus is re-read (deterministically) and the parts already written
    are kept, so no context is lost or written twice.
    """
    cfg = run_cfg.data
    if cfg.n_ctx > model.n_ctx_max:
        raise ConfigError(f"data.n_ctx is {cfg.n_ctx} but {model.name} takes at most {model.n_ctx_max} tokens")
    stage = Stage(run, "contexts", run_cfg, force, measured=tokenizer_probe(model))
    if not stage.needed():
        return stage.info["n_contexts"]
    stage.begin()
    done = set(run.ls(schema.CONTEXTS_DIR, suffix=".parquet"))
    rows: list[tuple[int, int, list[int]]] = []
    n = n_parts = 0

    def flush() -> None:
        nonlocal n_parts
        name = schema.part_name(n_parts)
        if name not in done:
            ctx, doc, toks = zip(*rows)
            table = pa.table([pa.array(ctx), pa.array(doc), pa.array(toks)], schema=schema.CONTEXTS)
            run.write_parquet(f"{schema.CONTEXTS_DIR}/{name}", table)
        n_parts += 1
        rows.clear()

    contexts = iter_contexts(
        iter_documents(cfg),
        model.encode,
        model.bos_token_id,
        cfg.n_ctx,
        cfg.one_context_per_document,
        cfg.max_contexts,
    )
    for row in tqdm(contexts, desc="contexts", unit="ctx", total=cfg.max_contexts, mininterval=2):
        rows.append(row)
        n += 1
        if len(rows) == cfg.contexts_per_part:
            flush()
    if rows:
        flush()
    if n == 0:
        raise DataError(
            f"corpus {describe_source(cfg)} produced no contexts; check that it holds non-empty text in "
            f"data.text_field {cfg.text_field!r}"
        )
    stage.done(n_contexts=n, n_parts=n_parts, n_ctx=cfg.n_ctx)
    log.info("wrote %d contexts in %d parts to %s", n, n_parts, run.path(schema.CONTEXTS_DIR))
    return n


# --- reading -----------------------------------------------------------------------------------------


def context_parts(run: RunDir) -> list[int]:
    """Indices of the context parts written, in corpus order."""
    return [int(name[len("part-") : -len(".parquet")]) for name in run.ls(schema.CONTEXTS_DIR, suffix=".parquet")]


def read_contexts(run: RunDir, part: int, folder: str = schema.CONTEXTS_DIR) -> list[Context]:
    """The contexts of one part, in corpus order (of `contexts/`, or of another folder in its schema)."""
    table = run.read_parquet(schema.part_path(folder, part), columns=["ctx_id", "tokens"])
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.flatten().to_numpy().astype(np.int64)  # a writable copy, in torch's index dtype
    offsets = tokens.offsets.to_numpy() - tokens.offsets[0].as_py()
    ctx_ids = table.column("ctx_id").to_numpy()
    return [(int(c), flat[offsets[i] : offsets[i + 1]]) for i, c in enumerate(ctx_ids)]


def iter_context_parts(run: RunDir) -> Iterator[tuple[int, list[Context]]]:
    """(part index, its contexts) for every part, in corpus order."""
    for part in context_parts(run):
        yield part, read_contexts(run, part)


def tokens_at(run: RunDir, ctx_ids: np.ndarray, pos: np.ndarray, offsets: Sequence[int] = (-1, 0, 1)) -> np.ndarray:
    """[n, len(offsets)]: the token at pos + offset of each example's context, from contexts/ (-1 outside it)."""
    out = np.full((len(ctx_ids), len(offsets)), -1, np.int64)
    if not len(ctx_ids):
        return out
    wanted = np.unique(ctx_ids)
    keep = (pc.field("ctx_id") >= int(wanted[0])) & (pc.field("ctx_id") <= int(wanted[-1]))  # skips whole parts
    table = run.read_parquet(
        schema.CONTEXTS_DIR, columns=["ctx_id", "tokens"], filters=keep & pc.field("ctx_id").isin(wanted)
    )
    found = table.column("ctx_id").to_numpy()
    order = np.argsort(found)
    row = order[np.searchsorted(found, ctx_ids, sorter=order).clip(0, len(found) - 1)] if len(found) else None
    if row is None or not np.array_equal(found[row], ctx_ids):
        missing = np.setdiff1d(wanted, found)[:5].tolist()
        raise DataError(
            f"{run.url}: contexts {missing} of the examples are missing from contexts/; the harvest "
            "is incomplete, rerun `ne harvest` with --force contexts"
        )
    tokens = table.column("tokens").combine_chunks()
    flat, starts = tokens.flatten().to_numpy(), tokens.offsets.to_numpy()[:-1]
    lengths = np.diff(tokens.offsets.to_numpy())
    if np.any(pos >= lengths[row]):
        raise DataError(
            f"{run.url}: an example's key token lies beyond its context in contexts/; the harvest "
            "is inconsistent, rerun it with --force contexts"
        )
    for j, offset in enumerate(offsets):
        at = pos + offset
        inside = (at >= 0) & (at < lengths[row])
        out[inside, j] = flat[starts[row[inside]] + at[inside]]
    return out
