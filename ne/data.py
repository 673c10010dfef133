"""Corpus sources to fixed-length contexts, streamed into `contexts/part-NNNNN.parquet`.

A context is BOS (where the model uses one) followed by up to n_ctx - 1 consecutive tokens of one
document. Its id is its place in the corpus, so "the first k contexts" means the same however the
harvest is sharded. No padding is stored: `pad_batch` pads at batch time.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from ne import schema
from ne.config import DataConfig, RunConfig
from ne.errors import ConfigError, DataError
from ne.models.base import MLPModel
from ne.stages import Stage
from ne.store import RunDir

log = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 1024
Context = tuple[int, np.ndarray]
"""(ctx_id, token ids as int64): BOS first where the model uses one, no padding."""


# --- documents ---------------------------------------------------------------------------------------


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The corpus's documents, in a fixed order."""
    if cfg.source == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[key] for key in sorted(topics))
    elif cfg.source == "hf":
        yield from _hf_documents(cfg)
    else:
        for fs, path in _expand_paths(cfg.paths):
            yield from _file_documents(fs, path, cfg.text_field)


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        rows = datasets.load_dataset(cfg.name, split=cfg.split, streaming=True)
    except Exception as exc:  # datasets raises many types (hub, network, missing split)
        raise DataError(f"could not open Hugging Face dataset {cfg.name!r} split {cfg.split!r}: {exc}") from None
    for row in rows:
        yield _field(row, cfg.text_field, f"dataset {cfg.name!r}")


def _field(row: object, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object; each row must be an object with a "
                        f"{field!r} field")
    if field not in row:
        raise DataError(f"{where} has no field {field!r} (it has {', '.join(row)}); set data.text_field")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds a {type(text).__name__} ({str(text)[:40]!r}), not text; "
                        "point data.text_field at a string field")
    return text or ""


def _expand_paths(paths: Sequence[str]) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """(filesystem, path) per file: paths in the order given, each glob's matches sorted."""
    for url in paths:
        fs, path = fsspec.core.url_to_fs(url)
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
        else:
            matches = [path] if fs.exists(path) else []
            if matches and fs.isdir(path):
                raise DataError(f"data.paths entry {url!r} is a directory; give files or a glob such as "
                                f"'{url.rstrip('/')}/*.txt'")
        if not matches:
            raise DataError(f"data.paths entry {url!r} matches no file; check the path or glob")
        yield from ((fs, m) for m in matches if not fs.isdir(m))


def _file_documents(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[str]:
    ext = posixpath.splitext(path)[1].lower()
    if ext == ".txt":
        with fs.open(path, "rb") as f:
            yield _decode_text(f.read(), path)
    elif ext == ".jsonl":
        with fs.open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path} line {n} is not UTF-8 (byte {raw[exc.start]:#04x}); save the file as "
                                    "UTF-8 JSON lines") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n} is not valid JSON ({exc}); each line must be an object") from None
                yield _field(row, text_field, f"{path} line {n}")
    elif ext == ".parquet":
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if text_field not in names:
                raise DataError(f"{path} has no column {text_field!r} (it has {', '.join(names)}); set data.text_field")
            kind = pf.schema_arrow.field(text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"{path}: column {text_field!r} holds {kind}, not text; point data.text_field at a "
                                "string column")
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                yield from (text or "" for text in batch.column(0).to_pylist())
    else:
        raise DataError(f"{path}: unsupported file type {ext!r}; data.paths takes .txt, .jsonl or .parquet files")


def _decode_text(data: bytes, path: str) -> str:
    """UTF-8 text; invalid bytes become U+FFFD with a warning that counts them. Binary files are refused."""
    if b"\x00" in data:
        raise DataError(f"{path} holds NUL bytes, so it is binary, not text; data.paths takes text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - data.count("\ufffd".encode())
        log.warning("%s is not valid UTF-8: %d invalid byte sequences replaced by U+FFFD (the first at byte %d)",
                    path, replaced, exc.start)
        return text


# --- contexts ----------------------------------------------------------------------------------------


def iter_contexts(
    documents: Iterable[str],
    encode: Callable[[str], list[int]],
    bos_token_id: int | None,
    n_ctx: int,
    one_context_per_document: bool = False,
    max_contexts: int | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """(ctx_id, doc_id, tokens): each document cut into consecutive chunks of n_ctx tokens, BOS included.

    doc_id is the document's place in `documents`; empty documents give no context.
    """
    prefix = [] if bos_token_id is None else [bos_token_id]
    step = n_ctx - len(prefix)
    ctx_id = 0
    for doc_id, text in enumerate(documents):
        ids = encode(text) if text else []
        starts = range(0, min(len(ids), step) if one_context_per_document else len(ids), step)
        for start in starts:
            if max_contexts is not None and ctx_id >= max_contexts:
                return
            yield ctx_id, doc_id, prefix + ids[start : start + step]
            ctx_id += 1


def tokenizer_probe(model: MLPModel) -> dict:
    """What the contexts depend on beyond the config: a changed tokenizer is noticed."""
    return {"bos_token_id": model.bos_token_id, "probe": model.encode("Neuron embeddings: 0123 ÄÖü, tokens!")}


def write_contexts(run: RunDir, run_cfg: RunConfig, model: MLPModel, force: set[str] | tuple = ()) -> int:
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
        iter_documents(cfg), model.encode, model.bos_token_id, cfg.n_ctx, cfg.one_context_per_document,
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
            f"corpus {_describe(cfg)} produced no contexts; check that it holds non-empty text in "
            f"data.text_field {cfg.text_field!r}"
        )
    stage.done(n_contexts=n, n_parts=n_parts, n_ctx=cfg.n_ctx)
    log.info("wrote %d contexts in %d parts to %s", n, n_parts, run.path(schema.CONTEXTS_DIR))
    return n


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "files":
        return f"data.paths {cfg.paths}"
    return f"{cfg.name!r} ({cfg.split})" if cfg.source == "hf" else "pydoc"


# --- reading -----------------------------------------------------------------------------------------


def context_parts(run: RunDir) -> list[int]:
    """Indices of the context parts written, in corpus order."""
    return [int(name[len("part-") : -len(".parquet")]) for name in run.ls(schema.CONTEXTS_DIR, suffix=".parquet")]


def read_contexts(run: RunDir, part: int, folder: str = schema.CONTEXTS_DIR) -> list[Context]:
    """The contexts of one part, in corpus order (of `contexts/`, or of another folder in its schema)."""
    table = run.read_parquet(f"{folder}/{schema.part_name(part)}", columns=["ctx_id", "tokens"])
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.flatten().to_numpy().astype(np.int64)  # a writable copy, in torch's index dtype
    offsets = tokens.offsets.to_numpy() - tokens.offsets[0].as_py()
    ctx_ids = table.column("ctx_id").to_numpy()
    return [(int(c), flat[offsets[i] : offsets[i + 1]]) for i, c in enumerate(ctx_ids)]


def iter_context_parts(run: RunDir) -> Iterator[tuple[int, list[Context]]]:
    """(part index, its contexts) for every part, in corpus order."""
    for part in context_parts(run):
        yield part, read_contexts(run, part)


def pad_batch(
    token_lists: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-pad to the longest list: (tokens, attention mask with 1 on real tokens)."""
    width = max(len(t) for t in token_lists)
    tokens = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, toks in enumerate(token_lists):
        tokens[row, : len(toks)] = torch.as_tensor(np.asarray(toks, dtype=np.int64))
        mask[row, : len(toks)] = 1
    return tokens, mask
