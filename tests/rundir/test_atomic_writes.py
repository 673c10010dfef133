"""A write that fails half-way, or a writer killed mid-write, leaves nothing a reader can mistake for output."""

from __future__ import annotations

import fsspec.implementations.local
import pyarrow as pa
import pytest

from ne.rundir.store import RunDir


def half_then_fail(real):
    def write(self, data):
        real(self, memoryview(data)[: len(data) // 2])
        raise ConnectionResetError("injected half-way")

    return write


def test_a_failed_write_leaves_nothing_and_a_killed_writers_file_is_ignored(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "run"))
    table = pa.table({"neuron": list(range(100)), "act": [0.5] * 100})
    run.write_parquet("clusters/layer=0/part-00000.parquet", table)
    opener = fsspec.implementations.local.LocalFileOpener
    monkeypatch.setattr(opener, "write", half_then_fail(opener.write))
    with pytest.raises(ConnectionResetError):
        run.write_parquet("clusters/layer=0/part-00001.parquet", table)
    assert sorted(p.name for p in (tmp_path / "run" / "clusters" / "layer=0").iterdir()) == ["part-00000.parquet"]

    # A writer killed half-way cannot clean up: its temporary file stays, under a hidden name that folder
    # reads, listings and the manifest's file records all skip.
    monkeypatch.setattr(type(run.fs), "rm", lambda self, *args, **kwargs: None)
    with pytest.raises(ConnectionResetError):
        run.write_parquet("clusters/layer=0/part-00001.parquet", table)
    monkeypatch.undo()
    left = [p.name for p in (tmp_path / "run" / "clusters" / "layer=0").iterdir() if p.name != "part-00000.parquet"]
    assert len(left) == 1 and left[0].startswith(".part-00001.parquet.tmp-")
    assert run.read_parquet("clusters/layer=0").equals(table)
    assert run.read_parquet("clusters").num_rows == 100
    assert run.ls("clusters/layer=0") == ["part-00000.parquet"]
    assert run.files("clusters") == ["clusters/layer=0/part-00000.parquet"]
