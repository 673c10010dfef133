"""Corpus sources to fixed-length contexts (`ne.rundir.contexts` streams them into `contexts/part-NNNNN.parquet`).

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
import pyarrow as pa
import pyarrow.parquet as pq

from ne.config import DataConfig
from ne.errors import DataError

log = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 1024


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
        raise DataError(
            f"{where} is a JSON {type(row).__name__}, not an object; each row must be an object with a {field!r} field"
        )
    if field not in row:
        raise DataError(f"{where} has no field {field!r} (it has {', '.join(row)}); set data.text_field")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"{where}: field {field!r} holds a {type(text).__name__} ({str(text)[:40]!r}), not text; "
            "point data.text_field at a string field"
        )
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
                raise DataError(
                    f"data.paths entry {url!r} is a directory; give files or a glob such as '{url.rstrip('/')}/*.txt'"
                )
        if not matches:
            raise DataError(f"data.paths entry {url!r} matches no file; check the path or glob")
        yield from ((fs, m) for m in matches if not fs.isdir(m))


def input_files(paths: Sequence[str]) -> list[str]:
    """The files of data.paths as URLs, in reading order: the contexts stage's inputs."""
    return [fs.unstrip_protocol(path) for fs, path in _expand_paths(paths)]


def _file_documents(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[str]:
    ext = posixpath.splitext(path)[1].lower()
    if ext == ".txt":
        with fs.open(path, "rb") as f:
            yield _decode_text(f.read(), path)
    elif ext == ".jsonl":
        yield from _jsonl_documents(fs, path, text_field)
    elif ext == ".parquet":
        yield from _parquet_documents(fs, path, text_field)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r}; data.paths takes .txt, .jsonl or .parquet files")


def _jsonl_documents(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[str]:
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path} line {n} is not UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8 JSON lines"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n} is not valid JSON ({exc}); each line must be an object") from None
            yield _field(row, text_field, f"{path} line {n}")


def _parquet_documents(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[str]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path} has no column {text_field!r} (it has {', '.join(names)}); set data.text_field")
        kind = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"{path}: column {text_field!r} holds {kind}, not text; point data.text_field at a string column"
            )
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            yield from (text or "" for text in batch.column(0).to_pylist())


def _decode_text(data: bytes, path: str) -> str:
    """UTF-8 text; invalid bytes become U+FFFD with a warning that counts them. Binary files are refused."""
    if b"\x00" in data:
        raise DataError(f"{path} holds NUL bytes, so it is binary, not text; data.paths takes text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - data.count("\ufffd".encode())
        log.warning(
            "%s is not valid UTF-8: %d invalid byte sequences replaced by U+FFFD (the first at byte %d)",
            path,
            replaced,
            exc.start,
        )
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


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "files":
        return f"data.paths {cfg.paths}"
    return f"{cfg.name!r} ({cfg.split})" if cfg.source == "hf" else "pydoc"
