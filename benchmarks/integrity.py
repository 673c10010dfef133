"""What the integrity checks cost on a real run directory: page checksums, file records and their checks.

    python benchmarks/integrity.py runs/demo

Prints, for the run's files: the time to record them (what a stage pays when it finishes), to verify them
against the manifest (what every later stage pays before reading its inputs), and to hash them whole (the
alternative the records avoid); then the cost of CRC page checksums on writing and reading the h/ parts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne.rundir.store import RunDir  # noqa: E402


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    m = run.require_manifest()
    records = {rel: rec for entry in m["stages"].values() for rel, rec in entry.get("files", {}).items()}
    size = sum(r["size"] for r in records.values())
    print(f"{args.run_dir}: {len(records)} recorded files, {size / 2**20:,.0f} MiB")

    t_record = best(lambda: [run.file_record(rel) for rel in records])
    t_verify = best(lambda: [run.verify(rel, rec) for rel, rec in records.items()])

    def full() -> None:
        for rel in records:
            with open(run.path(rel), "rb") as f:
                hashlib.sha256(f.read()).hexdigest()

    t_full = best(full)
    print(f"record every file (size + footer / whole-file hash): {t_record:.3f} s")
    print(f"verify every file against the manifest:              {t_verify:.3f} s")
    print(f"sha256 of every whole file (the alternative):         {t_full:.3f} s "
          f"({t_full / max(t_verify, 1e-9):.1f}x the verification)")

    h_parts = [rel for rel in records if rel.startswith("h/")]
    tables = [run.read_parquet(rel) for rel in h_parts]
    h_mib = sum(records[rel]["size"] for rel in h_parts) / 2**20

    def read(verify: bool) -> None:
        for rel in h_parts:
            pq.read_table(run.path(rel), page_checksum_verification=verify)

    def write(checksum: bool) -> None:
        for t in tables:
            pq.write_table(t, io.BytesIO(), compression="zstd", write_page_checksum=checksum)

    r_on, r_off = best(lambda: read(True)), best(lambda: read(False))
    w_on, w_off = best(lambda: write(True)), best(lambda: write(False))
    print(f"read the h/ parts ({h_mib:,.0f} MiB): {r_on:.3f} s with page checksums, {r_off:.3f} s without "
          f"({r_on / r_off:.2f}x)")
    print(f"write the h/ parts:              {w_on:.3f} s with page checksums, {w_off:.3f} s without "
          f"({w_on / w_off:.2f}x)")


if __name__ == "__main__":
    main()
