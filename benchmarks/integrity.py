"""What the integrity checks cost on a real run directory: file records, their checks, range reads, inputs.

    python benchmarks/integrity.py runs/demo [--layer-mb 448]

Prints, for the run's files: the time to record them (chunked hashes of every byte: what a stage pays when it
finishes), to verify every byte against the manifest (`ne status`, and a stage's rerun before it skips), the
quick check a stage makes of its inputs before reading them (sizes and Parquet footers), and a plain sha256
of every file (the floor for reading every byte). Then the choice for Parquet files: a full hash against
reading every page with its CRC checked. Then range reads: the weights file read in batches of neurons
(a cluster task's read), verified chunk by chunk against unverified, on the run's weights and on a synthetic
layer file of `--layer-mb` MiB (Llama-3-8B's gated layer: 448). Then the inputs: fingerprinting the model's
files (hashing them, as a stage does when it starts) against checking them (a stat, as readers do). Last, CRC
page checksums on writing and reading the h/ parts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ne import schema, store  # noqa: E402
from ne.rundir.store import RunDir, file_records  # noqa: E402
from ne.rundir.weights import read_layer_weights  # noqa: E402

NEURONS_PER_TASK = 128  # cluster.neurons_per_task's default


def best(fn, repeats: int = 3, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forget() -> None:
    """Drop what this process verified, so that each repeat hashes again."""
    store._verified.clear()
    store._verified_chunks.clear()
    store._input_hashes.clear()


def sha256_files(paths: list[str]) -> None:
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(store.CHUNK):
                h.update(block)


def batched_reads(run: RunDir, layer: int, d_mlp: int, verified: bool) -> None:
    """Every batch of neurons of a layer read as a cluster task reads it (the record hidden: unverified)."""
    real = run.record_of
    if not verified:
        run.record_of = lambda rel: None
    try:
        for lo in range(0, d_mlp, NEURONS_PER_TASK):
            read_layer_weights(run, layer, lo, lo + NEURONS_PER_TASK)
    finally:
        run.record_of = real


def synthetic_layer(folder: str, mib: int) -> tuple[RunDir, int]:
    """A run holding one gated layer file of about `mib` MiB (d_model 4096), recorded as stage weights writes."""
    import safetensors.numpy

    d_model = 4096
    d_mlp = mib * 2**20 // (2 * 4 * d_model)
    rng = np.random.default_rng(0)
    data = safetensors.numpy.save(
        {
            "W_gate_T": rng.standard_normal((d_mlp, d_model), np.float32),
            "W_up_T": rng.standard_normal((d_mlp, d_model), np.float32),
        }
    )
    run = RunDir(folder)
    rel = schema.weights_path(0)
    run.write_bytes(rel, data)
    run.write_json(
        store.MANIFEST,
        {
            "stages": {
                "weights": {
                    "status": "done",
                    "fingerprint": "synthetic",
                    "info": {},
                    "files": {rel: run.file_record(rel)},
                }
            }
        },
    )
    return run, d_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--layer-mb", type=int, default=448, help="size of the synthetic weights file")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    m = run.require_manifest()
    records = file_records(m)
    paths = [run.path(rel) for rel in records]
    size = sum(r["size"] for r in records.values())
    print(
        f"{args.run_dir}: {len(records)} recorded files, {size / 2**20:,.0f} MiB (chunks of "
        f"{store.CHUNK // 2**20} MiB; the machine may be shared: compare the ratios)"
    )

    t_record = best(lambda: [run.file_record(rel) for rel in records], setup=forget)
    t_deep = best(lambda: [run.verify(rel, rec) for rel, rec in records.items()], setup=forget)
    t_again = best(lambda: [run.verify(rel, rec) for rel, rec in records.items()])
    t_quick = best(lambda: [run.verify(rel, rec, deep=False) for rel, rec in records.items()])
    t_sha = best(lambda: sha256_files(paths))
    print(f"record every file (chunked sha256 of every byte):  {t_record:.3f} s ({size / 2**20 / t_record:,.0f} MiB/s)")
    print(
        f"verify every byte (`ne status`, a rerun's skip):   {t_deep:.3f} s; again in the same process {t_again:.4f} s"
    )
    print(f"plain sha256 of every file (the floor):            {t_sha:.3f} s (verification = {t_deep / t_sha:.2f}x)")
    print(f"quick check (sizes, Parquet footers: a stage's inputs): {t_quick:.3f} s")

    parquet = [rel for rel in records if rel.endswith(".parquet")]
    mib = sum(records[rel]["size"] for rel in parquet) / 2**20

    def pages() -> None:
        for rel in parquet:
            f = pq.ParquetFile(run.path(rel), page_checksum_verification=True)
            for i in range(f.num_row_groups):
                f.read_row_group(i)

    t_pages, t_hash = best(pages), best(lambda: sha256_files([run.path(rel) for rel in parquet]))
    print(
        f"Parquet files ({len(parquet)}, {mib:,.0f} MiB): read every page with its CRC {t_pages:.3f} s, hash "
        f"every byte {t_hash:.3f} s ({t_pages / t_hash:.1f}x)"
    )

    layers = run.layers("weights") or [
        int(p[len("weights/layer=") :].split(".")[0]) for p in records if p.startswith("weights/")
    ]
    if layers:
        d_mlp = read_layer_weights(run, layers[0], 0, 0).d_mlp
        layer_mib = records[schema.weights_path(layers[0])]["size"] / 2**20
        on = best(lambda: batched_reads(run, layers[0], d_mlp, True), setup=forget)
        off = best(lambda: batched_reads(run, layers[0], d_mlp, False))
        print(
            f"weights of layer {layers[0]} ({layer_mib:.1f} MiB, under one chunk: read whole per range) in batches "
            f"of {NEURONS_PER_TASK} neurons: verified {on:.3f} s, unverified {off:.3f} s ({on / off:.2f}x)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        big, d_mlp = synthetic_layer(tmp, args.layer_mb)
        on = best(lambda: batched_reads(big, 0, d_mlp, True), setup=forget)
        off = best(lambda: batched_reads(big, 0, d_mlp, False))
        whole = best(lambda: big.verify(schema.weights_path(0), big.record_of(schema.weights_path(0))), setup=forget)
        print(
            f"synthetic gated layer ({args.layer_mb} MiB, d_mlp {d_mlp:,}) in batches of {NEURONS_PER_TASK} neurons: "
            f"verified {on:.3f} s, unverified {off:.3f} s ({on / off:.2f}x); verifying the whole file once "
            f"instead: {whole:.3f} s"
        )

    inputs = {rec["path"]: rec for entry in m["stages"].values() for rec in (entry.get("inputs") or {}).values()}
    if inputs:
        in_mib = sum(r["size"] for r in inputs.values()) / 2**20
        t_hash = best(lambda: [store.input_record(url) for url in inputs], setup=forget)
        t_stat = best(lambda: [store.input_change(url, rec) for url, rec in inputs.items()], setup=forget)
        print(
            f"inputs ({len(inputs)} files, {in_mib:,.0f} MiB): fingerprint (hash) {t_hash:.3f} s, check (stat) "
            f"{t_stat * 1e3:.2f} ms"
        )

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
    print(
        f"read the h/ parts ({h_mib:,.0f} MiB): {r_on:.3f} s with page checksums, {r_off:.3f} s without "
        f"({r_on / r_off:.2f}x)"
    )
    print(
        f"write the h/ parts:              {w_on:.3f} s with page checksums, {w_off:.3f} s without "
        f"({w_on / w_off:.2f}x)"
    )


if __name__ == "__main__":
    main()
