"""Row hashes of a run's tables: one SHA-256 per table over its rows in a canonical order, so two runs made by
different versions of the code can be compared table by table (the architecture change kept every one).

    python benchmarks/row_hashes.py RUN_A RUN_B
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ne import schema

TABLES = [
    schema.CONTEXTS_DIR,
    schema.MAXIMA,
    schema.EXAMPLES_DIR,
    schema.H_DIR,
    schema.CLUSTERS_DIR,
    schema.DENDROGRAMS_DIR,
    schema.CENTROIDS_DIR,
    schema.METRICS,
]


def read(path: Path) -> pa.Table:
    """Every part of a table (a `layer=L` folder's layer added as a column where its files lack one)."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*.parquet")) if not p.name.startswith("."))
    parts = []
    for f in files:
        t = pq.read_table(f)
        if "layer=" in str(f) and "layer" not in t.column_names:
            layer = int(str(f).split("layer=")[1].split("/")[0])
            t = t.append_column("layer", pa.array([layer] * t.num_rows, pa.int16()))
        parts.append(t)
    return pa.concat_tables(parts, promote_options="default")


def table_hash(path: Path) -> tuple[int, str]:
    """(rows, hash) of a table, its rows sorted by every scalar column."""
    t = read(path)
    cols = sorted(t.column_names)
    df = t.select(cols).to_pandas()
    df = df.sort_values([c for c in cols if df[c].dtype != object], kind="stable").reset_index(drop=True)
    h = hashlib.sha256()
    for c in cols:
        h.update(c.encode())
        if df[c].dtype == object:
            for v in df[c]:
                h.update(np.asarray(v).tobytes() if v is not None else b"\0")
        else:
            h.update(np.ascontiguousarray(df[c].to_numpy()).tobytes())
    return len(df), h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="local run directories")
    runs = [Path(r) for r in p.parse_args().runs]
    for name in TABLES:
        got = [table_hash(r / name) if (r / name).exists() else None for r in runs]
        verdict = "" if len(runs) == 1 else "same" if len(set(got)) == 1 and got[0] else "DIFFERENT"
        print(f"{name:18}", "  ".join(f"{g[0]:>9} rows {g[1]}" if g else f"{'missing':>24}" for g in got), verdict)


if __name__ == "__main__":
    main()
