"""Corpus sources and contexts, checked against naive references written here."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ne import schema
from ne.compute.harvest import pad_batch
from ne.config import DataConfig, RunConfig
from ne.data import iter_contexts, iter_documents
from ne.errors import ConfigError, DataError
from ne.rundir.contexts import iter_context_parts, read_contexts, write_contexts
from ne.rundir.store import RunDir

DOCS = ["", "a b c d e f g h i j k", "x", "one two three four", "", "p q r s t u v w"]


def encode_words(text: str) -> list[int]:
    """A toy tokenizer: one id per word (its length times 100 plus its first letter)."""
    return [100 * len(w) + ord(w[0]) - 96 for w in text.split()]


def fake_model(bos=0, n_ctx_max=64, encode=encode_words):
    return SimpleNamespace(name="fake", encode=encode, bos_token_id=bos, n_ctx_max=n_ctx_max)


def naive_contexts(docs, bos, n_ctx, first_only=False, max_contexts=None):
    """Reference: walk each document's tokens, closing a context whenever it is full."""
    out = []
    for doc_id, text in enumerate(docs):
        current, taken = [], 0
        for tok in encode_words(text):
            current.append(tok)
            if len(current) + (bos is not None) == n_ctx:
                out.append((doc_id, current))
                current, taken = [], taken + 1
                if first_only:
                    break
        if current and not (first_only and taken):
            out.append((doc_id, current))
    out = [(i, d, ([bos] if bos is not None else []) + t) for i, (d, t) in enumerate(out)]
    return out[:max_contexts] if max_contexts is not None else out


@pytest.mark.parametrize("bos", [None, 7])
@pytest.mark.parametrize("n_ctx", [2, 3, 5, 64])
@pytest.mark.parametrize("first_only", [False, True])
def test_chunking_matches_naive_reference(bos, n_ctx, first_only):
    got = list(iter_contexts(DOCS, encode_words, bos, n_ctx, first_only))
    assert got == naive_contexts(DOCS, bos, n_ctx, first_only)
    assert all(len(t) <= n_ctx for _, _, t in got)
    assert [c for c, _, _ in got] == list(range(len(got)))
    if not first_only:  # chunks of a document, BOS removed, give back the whole document
        for doc_id, text in enumerate(DOCS):
            tokens = [t for _, d, toks in got if d == doc_id for t in toks[(bos is not None) :]]
            assert tokens == encode_words(text)


def test_ids_are_stable_under_max_contexts():
    full = list(iter_contexts(DOCS, encode_words, 0, 4))
    for m in range(1, len(full) + 2):
        assert list(iter_contexts(DOCS, encode_words, 0, 4, max_contexts=m)) == full[:m]


def test_bos_prepended_only_when_the_model_has_one():
    assert list(iter_contexts(["a b c"], encode_words, None, 8)) == [(0, 0, encode_words("a b c"))]
    assert list(iter_contexts(["a b c"], encode_words, 5, 8)) == [(0, 0, [5] + encode_words("a b c"))]


def test_pad_batch():
    tokens, mask = pad_batch([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- sources -------------------------------------------------------------------------------------------


def files_cfg(*paths, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(p) for p in paths], **kw)


def test_txt_files_one_document_each_in_sorted_glob_order(tmp_path):
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("c.md", "ignored")]:
        (tmp_path / name).write_text(text)
    assert list(iter_documents(files_cfg(tmp_path / "*.txt"))) == ["first", "second"]
    # Paths keep the order given; each glob is sorted.
    assert list(iter_documents(files_cfg(tmp_path / "b.txt", tmp_path / "a.txt"))) == ["second", "first"]


def test_jsonl_one_document_per_line(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, {"text": None}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    assert list(iter_documents(files_cfg(tmp_path / "d.jsonl"))) == ["alpha", "beta", ""]


def test_parquet_streamed_in_batches(tmp_path):
    texts = [f"doc {i}" for i in range(2500)]  # more rows than one read batch, over several row groups
    pq.write_table(pa.table({"body": texts, "n": list(range(2500))}), tmp_path / "d.parquet", row_group_size=700)
    assert list(iter_documents(files_cfg(tmp_path / "d.parquet", text_field="body"))) == texts


def test_files_through_fsspec_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/corpus/1.jsonl": b'{"text": "in memory"}\n', "/corpus/2.txt": b"plain"})
    cfg = files_cfg("memory://corpus/*.jsonl", "memory://corpus/2.txt")
    assert list(iter_documents(cfg)) == ["in memory", "plain"]


def test_pydoc_in_sorted_key_order():
    from pydoc_data.topics import topics

    docs = list(iter_documents(DataConfig(source="pydoc")))
    assert docs == [topics[k] for k in sorted(topics)] and len(docs) > 50


def test_hf_dataset_streamed_from_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"content": f"row {i}"}) + "\n" for i in range(5)))
    cfg = DataConfig(source="hf", name=str(tmp_path), split="train", text_field="content")
    assert list(iter_documents(cfg)) == [f"row {i}" for i in range(5)]
    with pytest.raises(DataError, match=f"dataset '{tmp_path}' has no field 'text'"):
        list(iter_documents(dataclasses.replace(cfg, text_field="text")))
    with pytest.raises(DataError, match=f"could not open Hugging Face dataset '{tmp_path}' split 'test': Bad split"):
        list(iter_documents(dataclasses.replace(cfg, split="test")))


def test_source_errors_name_the_value(tmp_path):
    with pytest.raises(DataError, match=r"data.paths entry '.*nothing/\*.jsonl' matches no file"):
        list(iter_documents(files_cfg(tmp_path / "nothing/*.jsonl")))
    with pytest.raises(DataError, match=r"data.paths entry '.*missing.txt' matches no file"):
        list(iter_documents(files_cfg(tmp_path / "missing.txt")))
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"d.csv: unsupported file type '.csv'"):
        list(iter_documents(files_cfg(tmp_path / "d.csv")))
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 1 has no field 'text' \(it has body\)"):
        list(iter_documents(files_cfg(tmp_path / "d.jsonl")))
    (tmp_path / "e.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"e.jsonl line 1 is not valid JSON"):
        list(iter_documents(files_cfg(tmp_path / "e.jsonl")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet has no column 'text' \(it has body\)"):
        list(iter_documents(files_cfg(tmp_path / "d.parquet")))


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a.jsonl",
            '{"text": "ok"}\n[1, 2]\n',
            r"a.jsonl line 2 is a JSON list, not an object; each row must be an "
            r"object",
        ),
        (
            "b.jsonl",
            '{"text": 42}\n',
            r"b.jsonl line 1: field 'text' holds a int \('42'\), not text; point "
            r"data.text_field at a string field",
        ),
        ("c.jsonl", b'{"text": "caf\xe9"}\n', r"c.jsonl line 1 is not UTF-8 \(byte 0xe9\); save the file as UTF-8"),
        ("d.txt", b"text\x00\x01\x02binary", r"d.txt holds NUL bytes, so it is binary, not text"),
    ],
)
def test_bad_corpus_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(files_cfg(path)))


def test_a_non_text_parquet_column_and_a_directory_entry(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet: column 'text' holds int64, not text"):
        list(iter_documents(files_cfg(tmp_path / "n.parquet")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(
        DataError,
        match=r"data.paths entry '.*folder' is a directory; give files or a glob such "
        r"as '.*folder/\*.txt'",
    ):
        list(iter_documents(files_cfg(tmp_path / "folder")))


def test_mis_encoded_text_is_decoded_with_a_warning_that_counts(tmp_path, caplog):
    (tmp_path / "latin.txt").write_bytes("café crème \ufffd".encode() + b" na\xefve \xff!")
    with caplog.at_level("WARNING"):
        docs = list(iter_documents(files_cfg(tmp_path / "latin.txt")))
    assert docs == ["café crème \ufffd na\ufffdve \ufffd!"]
    assert (
        "latin.txt is not valid UTF-8: 2 invalid byte sequences replaced by U+FFFD (the first at byte 19)"
        in caplog.text
    )


# --- write / read ----------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 3))
    return files_cfg(tmp_path / "c.jsonl", n_ctx=3, contexts_per_part=4)


def as_run(run: RunDir, data: DataConfig) -> RunConfig:
    return RunConfig(run_dir=run.url, data=data)


def written(run: RunDir) -> list[tuple[int, int, list[int]]]:
    rows = []
    for name in run.ls(schema.CONTEXTS_DIR, suffix=".parquet"):
        rows += run.read_parquet(f"{schema.CONTEXTS_DIR}/{name}").to_pylist()
    return [(r["ctx_id"], r["doc_id"], r["tokens"]) for r in rows]


def test_write_and_read_contexts(tmp_path, corpus):
    run = RunDir(str(tmp_path / "run"))
    expected = list(iter_contexts(DOCS * 3, encode_words, 0, 3))
    assert write_contexts(run, as_run(run, corpus), fake_model()) == len(expected) == 39
    assert written(run) == expected
    assert run.ls(schema.CONTEXTS_DIR) == [schema.part_name(i) for i in range(10)]  # 4 per part, last 3
    assert run.read_parquet(f"{schema.CONTEXTS_DIR}/{schema.part_name(0)}").schema == schema.CONTEXTS
    parts = list(iter_context_parts(run))
    assert [p for p, _ in parts] == list(range(10))
    assert [(c, t.tolist()) for _, ctxs in parts for c, t in ctxs] == [(c, t) for c, _, t in expected]
    assert [c for c, _ in read_contexts(run, 9)] == [36, 37, 38]
    assert run.manifest()["stages"]["contexts"]["status"] == "done"


def test_rerun_skips_and_resume_neither_loses_nor_duplicates(tmp_path, corpus, monkeypatch):
    reference = RunDir(str(tmp_path / "ref"))
    write_contexts(reference, as_run(reference, corpus), fake_model())

    run = RunDir(str(tmp_path / "run"))
    calls = []

    def dies_midway(text):
        calls.append(text)
        if len(calls) == 10:
            raise KeyboardInterrupt  # an interruption after some parts were written
        return encode_words(text)

    with pytest.raises(KeyboardInterrupt):
        write_contexts(run, as_run(run, corpus), fake_model(encode=dies_midway))
    partial = run.ls(schema.CONTEXTS_DIR)
    assert 0 < len(partial) < 10 and run.manifest()["stages"]["contexts"]["status"] == "running"
    mtimes = {n: os.path.getmtime(run.path(schema.CONTEXTS_DIR, n)) for n in partial}

    assert write_contexts(run, as_run(run, corpus), fake_model()) == 39
    assert written(run) == written(reference)
    assert {n: os.path.getmtime(run.path(schema.CONTEXTS_DIR, n)) for n in partial} == mtimes  # kept

    def never(cfg):
        raise AssertionError("a finished stage must not re-read the corpus")

    monkeypatch.setattr("ne.rundir.contexts.iter_documents", never)
    assert write_contexts(run, as_run(run, corpus), fake_model()) == 39


def test_changed_settings_are_refused_unless_forced(tmp_path, corpus):
    run = RunDir(str(tmp_path / "run"))
    write_contexts(run, as_run(run, corpus), fake_model())
    longer = dataclasses.replace(corpus, n_ctx=5)
    with pytest.raises(
        ConfigError, match="data.n_ctx is 5 in this config but was 3 when stage 'contexts'.*--force contexts"
    ):
        write_contexts(run, as_run(run, longer), fake_model())
    expected = list(iter_contexts(DOCS * 3, encode_words, 0, 5))
    assert write_contexts(run, as_run(run, longer), fake_model(), force={"contexts"}) == len(expected)
    assert written(run) == expected  # no stale part left over


def test_empty_corpus_and_too_long_contexts(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"corpus data.paths \['.*empty.jsonl'\] produced no contexts"):
        write_contexts(run, as_run(run, files_cfg(tmp_path / "empty.jsonl", n_ctx=8)), fake_model())
    with pytest.raises(ConfigError, match="data.n_ctx is 128 but fake takes at most 64 tokens"):
        write_contexts(run, as_run(run, files_cfg(tmp_path / "empty.jsonl")), fake_model())


def test_pydoc_with_the_gpt2_tokenizer(tmp_path):
    """The demo corpus through a real tokenizer: every context full except each document's last."""
    from ne.models.tokenizers import encode_plain, gpt2_tokenizer

    tok = gpt2_tokenizer()
    model = fake_model(bos=50256, n_ctx_max=1024, encode=lambda t: encode_plain(tok, t))
    cfg = DataConfig(source="pydoc", n_ctx=128, max_contexts=300, contexts_per_part=128)
    run = RunDir(str(tmp_path / "run"))
    assert write_contexts(run, as_run(run, cfg), model) == 300
    rows = written(run)
    assert [r[0] for r in rows] == list(range(300)) and all(r[2][0] == 50256 for r in rows)
    for (_, doc, toks), nxt in zip(rows, rows[1:] + [(None, None, None)]):
        assert len(toks) == 128 or nxt[1] != doc
    assert tok.decode(rows[0][2][1:20]) in iter_documents(cfg).__next__()
