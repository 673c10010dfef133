"""The run directory: atomic, checksummed writes under any fsspec path; the manifest; the writer's lock.

Every file is written to a temporary name and renamed, so a reader never sees a partial file and an
interrupted job leaves nothing that looks finished. Parquet pages carry CRC checksums, verified on every
read, and the manifest keeps a record (size and hash) of every output file, so a flipped bit, a truncated
part or a missing file is an error that names the file and the stage to redo, never a silently wrong
result. Only the driver process that holds the run's lock writes the manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import uuid
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
from torch import Tensor, nn

from ne.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
MANIFEST_FORMAT = 2
STATUSES = ("running", "done", "stale")
FULL_HASH_MAX = 64 * 2**20
"""Files up to this size are hashed whole; larger ones by their first and last MiB (Parquet: by the footer,
whose page checksums cover the rest). `benchmarks/integrity.py` measures both."""
ENDS = 2**20

_held: dict[str, int] = {}
"""Run directories whose lock this process holds, with the depth of nested `lock()` calls."""


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

    def files(self, rel: str) -> list[str]:
        """Run-relative paths of every file at or under `rel`, sorted (temporary files left out)."""
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        if not self.fs.isdir(path):
            return [rel]
        found = self.fs.find(path)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in found if ".tmp-" not in posixpath.basename(p))

    def layers(self, kind: str) -> list[int]:
        """Layers L with a `kind/layer=L` folder, sorted."""
        names = self.ls(kind)
        return sorted(int(n[6:]) for n in names if n.startswith("layer=") and n[6:].isdigit())

    def check_is_directory(self) -> None:
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise ConfigError(f"run_dir {self.url!r} is a file; give the path of a directory (new or a run's)")

    # --- writing and reading ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write to a hidden temporary name, then rename: the final name never holds a partial file, and a
        temporary one left by a killed writer is skipped by every reader (Parquet folder reads skip names
        starting with '.'). A write that fails is abandoned, not committed, and its temporary name removed."""
        final = self.path(rel)
        folder, name = posixpath.split(final)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
        f = self.fs.open(tmp, "wb")
        try:
            f.write(data)
            f.close()
        except BaseException:
            _abandon(f)
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise
        self.fs.mv(tmp, final)

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write atomically with page checksums; small row groups let readers skip to one neuron's rows."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size, write_page_checksum=True)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """A file or a folder of Parquet parts, page checksums verified; damage is a DataError naming the file."""
        path = self.path(rel)
        if not self.fs.exists(path):
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}")
        try:
            if self.fs.isdir(path):
                return pq.read_table(path, columns=columns, filters=filters, filesystem=self.fs,
                                     page_checksum_verification=True)
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns, filters=filters, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise self._damaged(rel, exc) from None

    def read_footer(self, rel: str) -> pq.FileMetaData:
        """The footer of one Parquet part; damage is a DataError naming the file and the stage to redo."""
        path = self.path(rel)
        try:
            with self.fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)
        except FileNotFoundError:
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}") from None
        except (OSError, pa.ArrowException) as exc:
            raise self._damaged(rel, exc) from None
        return meta

    def read_row_group(self, rel: str, meta: pq.FileMetaData, i: int, columns: list[str] | None = None) -> pa.Table:
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return pq.ParquetFile(f, metadata=meta, page_checksum_verification=True).read_row_group(
                    i, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise self._damaged(rel, exc) from None

    def read_bytes(self, rel: str) -> bytes:
        """A whole file, checked against the manifest's record of it when there is one (no extra read)."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}") from None
        record = self.record_of(rel)
        if record is not None and record != bytes_record(data, rel, record.get("hashed")):
            raise DataError(f"{self.path(rel)} is corrupt (it differs from the manifest's record of it); "
                            f"{redo_hint(rel)}")
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes start..end-1 of a file (a batch of neurons of a weights file). Not checked against the
        manifest's record, which covers the whole file: stages verify their inputs before reading them."""
        if end <= start:  # an empty range: S3 answers an invalid Range header with the whole object
            return b""
        try:
            return self.fs.cat_file(self.path(rel), start=start, end=end)
        except FileNotFoundError:
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}") from None

    def _damaged(self, rel: str, exc: Exception) -> DataError:
        """Name the damaged file itself, not just its folder (a folder read stops at the first bad part)."""
        for part in self.files(rel) if self.fs.isdir(self.path(rel)) else []:
            try:
                with self.fs.open(self.path(part), "rb") as f:
                    pq.read_table(f, page_checksum_verification=True)
            except (OSError, pa.ArrowException) as part_exc:
                rel, exc = part, part_exc
                break
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DataError(f"{self.path(rel)} is corrupt or truncated ({reason}); {redo_hint(rel)}")

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # --- file records -----------------------------------------------------------------------------------

    def file_record(self, rel: str) -> dict:
        """Size and hash of a file as it is now: what the manifest keeps and `verify` compares."""
        path = self.path(rel)
        size = int(self.fs.size(path))
        kind = _hash_kind(rel, size)
        with self.fs.open(path, "rb") as f:
            if kind == "full":
                return bytes_record(f.read(), rel, kind)
            if kind == "footer":
                f.seek(max(0, size - 8))
                f.seek(max(0, size - _footer_bytes(f.read(8))))
                return {"size": size, "hashed": kind, "sha256": _sha(f.read())}
            head = f.read(ENDS)
            f.seek(max(0, size - ENDS))
            return {"size": size, "hashed": kind, "sha256": _sha(head + f.read())}

    def verify(self, rel: str, record: dict) -> None:
        """An error naming `rel` and the stage to redo when the file is missing or differs from `record`."""
        if not self.exists(rel):
            raise DataError(f"{self.path(rel)} is missing; {redo_hint(rel)}")
        now = self.file_record(rel) if record.get("hashed") else {"size": int(self.fs.size(self.path(rel)))}
        if now["size"] != record["size"]:
            raise DataError(f"{self.path(rel)} has {now['size']} bytes where {record['size']} were written: it is "
                            f"truncated or replaced; {redo_hint(rel)}")
        if now != record:
            raise DataError(f"{self.path(rel)} is corrupt (its hash differs from the one written); {redo_hint(rel)}")

    def record_of(self, rel: str) -> dict | None:
        return file_records(self.manifest()).get(rel)

    # --- manifest ---------------------------------------------------------------------------------------

    def manifest(self) -> dict:
        """The manifest, checked for shape; an empty one when the run has none yet."""
        self.check_is_directory()
        if not self.exists(MANIFEST):
            return {"format": MANIFEST_FORMAT, "stages": {}}
        try:
            m = self.read_json(MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path(MANIFEST)} is corrupt ({exc}); remove it to start the run afresh") from None
        check_manifest(m, self.path(MANIFEST))
        return m

    def require_manifest(self) -> dict:
        """The manifest of an existing run; an error saying what to run when there is none."""
        self.check_is_directory()
        if not self.fs.exists(self.root):
            raise DataError(f"run directory {self.url} does not exist; give the run_dir of a run, e.g. runs/demo "
                            "after `ne run --config configs/demo.yaml`")
        if not self.exists(MANIFEST):
            raise DataError(f"{self.url} has no manifest.json, so it is not a run directory or its harvest never "
                            "started; run `ne harvest` with run_dir set to it")
        return self.manifest()

    def write_manifest(self, m: dict) -> None:
        m["format"] = MANIFEST_FORMAT
        m["versions"] = package_versions()
        self.write_json(MANIFEST, m)

    def record(self, key: str, value: Any) -> None:
        """Store a top-level manifest entry, such as the config as run."""
        m = self.manifest()
        m[key] = value
        self.write_manifest(m)

    # --- the writer's lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run's lock while writing: a second writer gets an error naming the first one's PID.

        Nested calls in one process share the lock. A lock left by a process that died on this host is
        taken over; one held on another host must be removed by hand once that job is known to be gone.
        """
        self.check_is_directory()
        key = self.url
        if _held.get(key):
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        self._acquire(command)
        _held[key] = 1
        try:
            yield
        finally:
            _held.pop(key, None)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(LOCK))

    def _acquire(self, command: str) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(2):
            if self._create_lock(json.dumps(me).encode()):
                return
            holder = self._lock_holder()
            if holder is None or _dead_here(holder):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path(LOCK))  # a lock of a process that died: take it over
                continue
            raise DataError(
                f"run {self.url} is in use by PID {holder.get('pid')} on {holder.get('host')} "
                f"({holder.get('command')}, since {holder.get('since')}); wait for it to finish, or remove "
                f"{self.path(LOCK)} if that process is gone"
            )
        raise DataError(f"could not take the lock {self.path(LOCK)}; another writer keeps taking it")

    def _create_lock(self, data: bytes) -> bool:
        """Create the lock only where there is none, in one step: O_EXCL on a disk, a conditional put
        (`If-None-Match: *`, s3fs's mode "xb") on S3. A filesystem without exclusive create (gcsfs) falls
        back to check-then-write, where two writers starting in the same instant could both win."""
        try:
            with self.fs.open(self.path(LOCK), "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # this filesystem has no mode "xb"
            log.warning("%s: this filesystem cannot create a file exclusively; the run's lock is checked, then "
                        "written", self.url)
        if self.exists(LOCK):
            return False
        self.write_bytes(LOCK, data)
        return True

    def _lock_holder(self) -> dict | None:
        try:
            holder = self.read_json(LOCK)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) else None


def check_manifest(m: Any, where: str) -> None:
    """A one-line error when a manifest does not have the shape ne writes."""

    def bad(what: str) -> DataError:
        return DataError(f"{where} is not a manifest of ne ({what}); restore it, or start a new run_dir")

    if not isinstance(m, dict):
        raise bad(f"it holds a {type(m).__name__}, not an object")
    stages = m.get("stages", {})
    if not isinstance(stages, dict):
        raise bad(f"'stages' is a {type(stages).__name__}, not an object")
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            raise bad(f"stages.{name} is a {type(entry).__name__}, not an object")
        if entry.get("status") not in STATUSES:
            raise bad(f"stages.{name}.status is {entry.get('status')!r}, not one of {', '.join(STATUSES)}")
        for key in ("settings", "files", "upstream"):
            if not isinstance(entry.get(key, {}), dict):
                raise bad(f"stages.{name}.{key} is a {type(entry[key]).__name__}, not an object")
        for rel, record in entry.get("files", {}).items():
            if not isinstance(record, dict) or not isinstance(record.get("size"), int):
                raise bad(f"stages.{name}.files[{rel!r}] has no size")
    m.setdefault("stages", stages)


def file_records(manifest: dict) -> dict[str, dict]:
    """{run-relative path: record} of every file the manifest's stages recorded."""
    return {rel: record for entry in manifest["stages"].values() for rel, record in entry.get("files", {}).items()}


def redo_hint(rel: str) -> str:
    """What to run when `rel` is missing or damaged: redo the stage that writes it."""
    from ne.rundir.stages import owner_of, redo_command

    stage = owner_of(rel)
    return f"redo stage '{stage}': {redo_command(stage)}" if stage else "rerun the stage that writes it"


def bytes_record(data: bytes, rel: str, kind: str | None = None) -> dict:
    """The record of a file from its bytes; `kind` forces how it is hashed (as when it was recorded)."""
    size = len(data)
    kind = kind or _hash_kind(rel, size)
    if kind == "footer":
        return {"size": size, "hashed": kind, "sha256": _sha(data[max(0, size - _footer_bytes(data[-8:])):])}
    if kind == "ends":
        return {"size": size, "hashed": kind, "sha256": _sha(data[:ENDS] + data[max(0, size - ENDS):])}
    return {"size": size, "hashed": "full", "sha256": _sha(data)}


def _footer_bytes(last_8: bytes) -> int:
    """Length of a Parquet file's footer with its 8-byte trailer (the whole trailer when it is not Parquet's)."""
    return int.from_bytes(last_8[:4], "little") + 8 if last_8[4:] == b"PAR1" else 8


def _hash_kind(rel: str, size: int) -> str:
    if rel.endswith(".parquet"):
        return "footer"
    return "full" if size <= FULL_HASH_MAX else "ends"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _abandon(f) -> None:
    """Close a file whose write failed without committing it: fsspec's close uploads whatever was buffered, so
    an object store would keep a partial object."""
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
        with contextlib.suppress(Exception):
            f.discard()  # s3fs: aborts the multipart upload and drops the buffer
        f.closed = True
    else:
        with contextlib.suppress(Exception):
            f.close()


def _dead_here(holder: dict) -> bool:
    """True when the lock's process ran on this host and is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def fingerprint(*parts: Any) -> str:
    """A stable hash of the settings a result depends on."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_tensors(path: str, shapes: dict[str, tuple[int | None, ...]]) -> dict[str, Tensor]:
    """Load a safetensors file and check it holds exactly `shapes`' names, each of rank and size given
    (None: any size). Returns float32 tensors."""
    try:
        with fsspec.open(path, "rb") as f:
            tensors = safetensors.torch.load(f.read())
    except FileNotFoundError:
        raise DataError(f"weights file {path!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DataError(f"{path!r} is not a readable safetensors file ({exc})") from None
    if set(tensors) != set(shapes):
        raise DataError(
            f"{path!r} holds tensors {sorted(tensors)}; expected exactly {sorted(shapes)} (the authors' names)"
        )
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise DataError(f"{path!r}: tensor {name} has shape {list(got)}, expected {list(want)}")
    return {k: v.float() for k, v in tensors.items()}


def tensors_bytes(module: nn.Module) -> bytes:
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("neuron-embeddings", "torch", "transformer_lens", "transformers", "ray", "faiss-cpu",
                 "numpy", "scipy", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
