"""The run directory: atomic Parquet/JSON writes under any fsspec path, and the manifest.

Every file is written to a temporary name and renamed, so a reader never sees a partial file and an
interrupted job leaves nothing that looks finished. Only the driver process writes the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
import uuid
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ne.errors import DataError

MANIFEST = "manifest.json"


class RunDir:
    """A run directory given as a local path or an fsspec URL (s3://, gs://, memory://)."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def ls(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files in a subfolder, sorted; empty when it does not exist."""
        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write atomically; small row groups let readers skip to one neuron's rows via statistics."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        path = self.path(rel)
        if not self.fs.exists(path):
            raise DataError(f"{self.url}: {rel} is missing; run the stage that writes it first")
        if self.fs.isdir(path):
            return pq.read_table(path, columns=columns, filters=filters, filesystem=self.fs)
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns, filters=filters)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # --- manifest -------------------------------------------------------------------------------------

    def manifest(self) -> dict:
        if not self.exists(MANIFEST):
            return {"stages": {}}
        try:
            return self.read_json(MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path(MANIFEST)} is corrupt ({exc}); remove it to start the run afresh") from None

    def stage(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def is_done(self, name: str, fingerprint: str) -> bool:
        """True when stage `name` finished with the same settings; an error when its settings changed."""
        entry = self.stage(name)
        if not entry or entry.get("status") != "done":
            return False
        if entry.get("fingerprint") != fingerprint:
            raise DataError(
                f"{self.url}: stage '{name}' finished with other settings than this config's; "
                f"use a new run_dir, or pass --force {name} to redo it"
            )
        return True

    def mark(self, name: str, status: str, fingerprint: str, **info: Any) -> None:
        m = self.manifest()
        m["stages"][name] = {"status": status, "fingerprint": fingerprint, "time": time.time(), **info}
        m["versions"] = package_versions()
        self.write_json(MANIFEST, m)

    def record(self, key: str, value: Any) -> None:
        """Store a top-level manifest entry, such as the config as run."""
        m = self.manifest()
        m[key] = value
        self.write_json(MANIFEST, m)


def fingerprint(*parts: Any) -> str:
    """A stable hash of the settings a stage depends on; a change means its outputs are stale."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("neuron-embeddings", "torch", "transformer_lens", "transformers", "ray", "faiss-cpu",
                 "numpy", "scipy", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
