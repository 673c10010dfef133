"""Two runs compared exactly: every file their stages recorded, Parquet files by their rows."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from ne.rundir.store import RunDir


def table_digest(table: pa.Table) -> str:
    """A hash of a table's schema and rows in order, exact to the bit (so NaN equals NaN, unlike Table.equals)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()


def run_outputs(url: str) -> dict[str, str]:
    """{run-relative path: digest} of every file the run's manifest records: Parquet read through the run
    directory (page checksums verified) and hashed by its rows, other files by their bytes."""
    run = RunDir(url)
    files = sorted(rel for entry in run.manifest()["stages"].values() for rel in entry.get("files", {}))
    return {
        rel: table_digest(run.read_parquet(rel))
        if rel.endswith(".parquet")
        else hashlib.sha256(run.read_bytes(rel)).hexdigest()
        for rel in files
    }
