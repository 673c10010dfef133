"""The run directory: atomic, checksummed writes under any fsspec path; the manifest; the writer's lock.

Every file is written to a temporary name and renamed, so a reader never sees a partial file and an
interrupted job leaves nothing that looks finished. The manifest keeps a record of every output file: its
size and a hash of all its bytes, taken in chunks (`CHUNK`) and streamed. Parquet pages carry CRC
checksums, verified on every read; other files are checked against their record when read, whole or by
byte range (only the chunks a range touches). So a flipped bit, a truncated part or a missing file is an
error that names the file and the stage to redo, never a silently wrong result. Only the driver process
that holds the run's lock writes the manifest; the lock refuses a folder that is neither empty nor a run.

Inputs from outside the run (corpus files, model weights, an SAE) get a record too (`input_record`): size,
modification time and a content hash, so a file changed in place is noticed.
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
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
from torch import Tensor, nn

from ne.errors import ConfigError, DataError
from ne.rundir.graph import owner_of, redo_command

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
MANIFEST_FORMAT = 2
STATUSES = ("running", "done", "stale")
CHUNK = 4 * 2**20
"""Files are hashed in chunks of this many bytes, streamed. A file's hash is the hash of its chunks' hashes;
the record of a non-Parquet file of more than one chunk keeps every chunk's hash, so that a byte range is
verified by reading only the chunks it touches. `benchmarks/integrity.py` measures the costs."""
CHUNK_HEX = 16
"""Hex digits kept per chunk hash (64 bits: enough to tell damage, which is all a record is for)."""
ENDS = 2**20
"""Records written before chunked hashes (`hashed`: `full`, `footer`, `ends`) are still checked as written."""

_held: dict[str, int] = {}
"""Run directories whose lock this process holds, with the depth of nested `lock()` calls."""
_verified: set[tuple] = set()
"""(path, hash, size, modification time) of every file this process hashed whole and found intact: each
file is hashed once per process, however many stages check it."""
_verified_chunks: set[tuple] = set()
"""(path, file hash, chunk) of every chunk this process read by range and found intact: read again, a range
of verified chunks is read alone."""
_input_hashes: dict[tuple, str] = {}
"""(url, size, modification time): content hash of the inputs this process hashed."""


class RunDir:
    """A run directory given as a local path or an fsspec URL (s3://, gs://, memory://)."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def url_of(self, rel: str) -> str:
        """A file of the run as a URL fsspec opens anywhere, in another process too (`path` drops the protocol)."""
        return f"{self.url.rstrip('/')}/{rel}"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _fresh(self, path: str) -> str:
        """`path`, with what this process's filesystem remembers of its listing forgotten: other processes (Ray
        workers) write into the run, and a cached object-store listing would miss their files."""
        self.fs.invalidate_cache(path)
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._fresh(self.path(*parts)))

    def ls(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files in a subfolder, sorted; empty when it does not exist."""
        folder = self._fresh(self.path(*parts))
        if not self.fs.exists(folder):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)

    def files(self, rel: str) -> list[str]:
        """Run-relative paths of every file at or under `rel`, sorted (temporary files left out)."""
        path = self._fresh(self.path(rel))
        if not self.fs.exists(path):
            return []
        if not self.fs.isdir(path):
            return [rel]
        found = self.fs.find(path)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if ".tmp-" not in posixpath.basename(p))

    def layers(self, kind: str) -> list[int]:
        """Layers L with a `kind/layer=L` folder, sorted."""
        names = self.ls(kind)
        return sorted(int(n[6:]) for n in names if n.startswith("layer=") and n[6:].isdigit())

    def check_is_directory(self) -> None:
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise ConfigError(f"run_dir {self.url!r} is a file; give the path of a directory (new or a run's)")

    def check_is_run_or_empty(self) -> None:
        """A folder that holds files but no manifest is not a run: ne writes into it never, as a stage's
        outputs there could be someone's folders of the same name."""
        if not self.fs.exists(self.root) or self.exists(MANIFEST):
            return
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        if any(n != LOCK and ".tmp-" not in n for n in names):
            raise ConfigError(
                f"run_dir {self.url!r} is not empty and holds no manifest.json, so it is not a run of "
                "ne; pick an empty or new folder for the run"
            )

    # --- writing and reading ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes | memoryview) -> None:
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
        """A file or a folder of Parquet parts, page checksums verified; damage is a DataError naming the file.
        A folder of a finished stage must hold exactly the parts the manifest records (`parts`)."""
        path = self.path(rel)
        if not self.fs.exists(path):
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}")
        try:
            if self.fs.isdir(path):
                self.parts(rel)
                return pq.read_table(
                    path, columns=columns, filters=filters, filesystem=self.fs, page_checksum_verification=True
                )
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
                    i, columns=columns
                )
        except (OSError, pa.ArrowException) as exc:
            raise self._damaged(rel, exc) from None

    def parts(self, rel: str) -> list[str]:
        """Run-relative paths of the Parquet parts in folder `rel`. When the manifest records files under it
        (its stage finished), a recorded part that is missing, or a part it does not record, is an error
        naming the file: a folder read never silently skips or adds rows."""
        found = [f"{rel}/{name}" for name in self.ls(rel, suffix=".parquet")]
        entry = self.manifest()["stages"].get(owner_of(rel) or "", {})
        if entry.get("status") != "done":  # half-done work (or none of a stage's): what is there
            return found
        recorded = sorted(
            r for r in entry.get("files", {}) if r.startswith(rel.rstrip("/") + "/") and r.endswith(".parquet")
        )
        if not recorded:
            return found
        for part in recorded:
            if part not in found:
                raise DataError(f"{self.path(part)} is missing; {redo_hint(part)}")
        extra = sorted(set(found) - set(recorded))
        if extra:
            raise DataError(
                f"{self.path(extra[0])} is not a file of this run (the manifest does not record it); "
                f"move it out of {self.url}, or {redo_hint(extra[0])}"
            )
        return recorded

    def read_bytes(self, rel: str) -> bytes:
        """A whole file, checked against the manifest's record of it when there is one (hashed from memory)."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}") from None
        record = self.record_of(rel)
        if record is not None:
            self._check_size(rel, record, len(data))
            if record.get("hashed") == "chunks":
                self._check_chunks(rel, record, 0, _chunk_hashes(_slices(data, record["chunk"])))
            elif record.get("hashed") and _legacy_sha(_reader(data), len(data), record["hashed"]) != record["sha256"]:
                raise self._corrupt(rel)
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes start..end-1 of a file (a batch of neurons of a weights file), checked against the manifest's
        record when there is one: the chunks the range touches are read and each compared with its hash, once
        per process."""
        if end <= start:  # an empty range: S3 answers an invalid Range header with the whole object
            return b""
        record = self.record_of(rel)
        try:
            if record is None or record.get("hashed") != "chunks":
                if record is not None:
                    self.verify(rel, record)  # an older record covers the whole file only: check it whole, once
                return self.fs.cat_file(self.path(rel), start=start, end=end)
            size, chunk = record["size"], record["chunk"]
            end = min(end, size)
            if start >= end:
                return b""
            first = start // chunk if "chunks" in record else 0  # one chunk, or a Parquet file: read whole
            stop = min(size, -(-end // chunk) * chunk) if "chunks" in record else size
            keys = [(self.path(rel), record["sha256"], i) for i in range(first, -(-stop // chunk))]
            if all(key in _verified_chunks for key in keys):
                return self.fs.cat_file(self.path(rel), start=start, end=end)
            data = self.fs.cat_file(self.path(rel), start=first * chunk, end=stop)
        except FileNotFoundError:
            raise DataError(f"{self.url}: {rel} is missing; {redo_hint(rel)}") from None
        if len(data) != stop - first * chunk:
            self._check_size(rel, record, int(self.fs.size(self.path(rel))))
        for key, block in zip(keys, _slices(data, chunk)):
            if key not in _verified_chunks:
                self._check_chunks(rel, record, key[2], _chunk_hashes([block]))
                _verified_chunks.add(key)
        return data[start - first * chunk : end - first * chunk]

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
        """Size and hash of a file as it is now, read in chunks: what the manifest keeps and `verify` compares.
        A Parquet file's record also hashes its footer, for the quick check."""
        path = self.path(rel)
        with self.fs.open(path, "rb") as f:
            hashes = _chunk_hashes(iter(lambda: f.read(CHUNK), b""))
            size = f.tell()
            record = _record(rel, size, hashes, CHUNK)
            if rel.endswith(".parquet"):
                record["footer"] = _legacy_sha(_reader(f), size, "footer")
        _verified.add((path, record["sha256"], size, _mtime(self.fs.info(path))))
        return record

    def verify(self, rel: str, record: dict, deep: bool = True) -> None:
        """An error naming `rel` and the stage to redo when the file is missing or differs from `record`.

        `deep`: hash every byte (once per process and file); what `ne status` and a stage's rerun check do.
        Otherwise only the size and a Parquet file's footer: what a stage checks of its inputs before reading
        them, as the reads themselves verify what they use (page checksums; chunk hashes)."""
        path = self.path(rel)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise DataError(f"{path} is missing; {redo_hint(rel)}") from None
        self._check_size(rel, record, int(info["size"]))
        kind = record.get("hashed")
        if kind is None:
            return
        if kind != "chunks":
            self._verify_legacy(rel, record, deep)
            return
        if not deep:
            if "footer" in record:
                with self.fs.open(path, "rb") as f:
                    if _legacy_sha(_reader(f), record["size"], "footer") != record["footer"]:
                        raise self._corrupt(rel)
            return
        key = (path, record["sha256"], record["size"], _mtime(info))
        if key in _verified:
            return
        with self.fs.open(path, "rb") as f:
            hashes = _chunk_hashes(iter(lambda: f.read(record["chunk"]), b""))
        self._check_chunks(rel, record, 0, hashes)
        _verified.add(key)

    def _verify_legacy(self, rel: str, record: dict, deep: bool) -> None:
        """A record of an older run: the whole file (up to 64 MiB), a Parquet footer, or a large file's ends.
        Deep, a Parquet file's pages are read to check their checksums."""
        path = self.path(rel)
        with self.fs.open(path, "rb") as f:
            if _legacy_sha(_reader(f), record["size"], record["hashed"]) != record["sha256"]:
                raise self._corrupt(rel)
            if deep and record["hashed"] == "footer":
                try:
                    parquet = pq.ParquetFile(f, page_checksum_verification=True)
                    for i in range(parquet.num_row_groups):
                        parquet.read_row_group(i)
                except (OSError, pa.ArrowException) as exc:
                    raise self._damaged(rel, exc) from None

    def _check_size(self, rel: str, record: dict, size: int) -> None:
        if size != record["size"]:
            raise DataError(
                f"{self.path(rel)} has {size} bytes where {record['size']} were written: it is "
                f"truncated or replaced; {redo_hint(rel)}"
            )

    def _check_chunks(self, rel: str, record: dict, first: int, hashes: list[str]) -> None:
        """Compare the hashes of chunks first, first + 1, ... with the record's (the whole file's from 0)."""
        listed: list[str] = record.get("chunks") or []
        for i, h in enumerate(hashes if "chunks" in record else (), first):
            if i >= len(listed) or h[:CHUNK_HEX] != listed[i]:
                chunk = record["chunk"]
                raise self._corrupt(rel, f"in bytes {i * chunk:,}..{min(record['size'], (i + 1) * chunk) - 1:,}")
        whole = first == 0 and ("chunks" not in record or len(hashes) == len(listed))
        if whole and _sha("".join(hashes).encode()) != record["sha256"]:
            raise self._corrupt(rel)

    def _corrupt(self, rel: str, where: str = "") -> DataError:
        return DataError(
            f"{self.path(rel)} is corrupt (its content differs from what was written{' ' * bool(where)}"
            f"{where}); {redo_hint(rel)}"
        )

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
            raise DataError(
                f"run directory {self.url} does not exist; give the run_dir of a run, e.g. runs/demo "
                "after `ne run --config configs/demo.yaml`"
            )
        if not self.exists(MANIFEST):
            raise DataError(
                f"{self.url} has no manifest.json, so it is not a run directory or its harvest never "
                "started; run `ne harvest` with run_dir set to it"
            )
        return self.manifest()

    def write_manifest(self, m: dict) -> None:
        m["format"] = MANIFEST_FORMAT
        m["versions"] = package_versions()
        self.write_json(MANIFEST, m)

    def set_manifest_entry(self, key: str, value: Any) -> None:
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
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self.check_is_run_or_empty()
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
            log.warning(
                "%s: this filesystem cannot create a file exclusively; the run's lock is checked, then written",
                self.url,
            )
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
        _check_entry(name, entry, bad)
    m.setdefault("stages", stages)


def _check_entry(name: str, entry: Any, bad: Callable[[str], DataError]) -> None:
    """`check_manifest` of one stage's entry."""
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
    if not isinstance(entry.get("fingerprint"), str):
        raise bad(f"stages.{name} has no fingerprint")
    if entry["status"] == "done" and not isinstance(entry.get("info"), dict):
        raise bad(f"stages.{name} is done but has no info")


def file_records(manifest: dict) -> dict[str, dict]:
    """{run-relative path: record} of every file the manifest's stages recorded."""
    return {rel: record for entry in manifest["stages"].values() for rel, record in entry.get("files", {}).items()}


def redo_hint(rel: str) -> str:
    """What to run when `rel` is missing or damaged: redo the stage that writes it."""
    stage = owner_of(rel)
    return f"redo stage '{stage}': {redo_command(stage)}" if stage else "rerun the stage that writes it"


def _record(rel: str, size: int, hashes: list[str], chunk: int) -> dict:
    """The record of a file from its chunks' hashes; every chunk's hash is kept for a non-Parquet file of
    more than one chunk (Parquet files are read by row group, whose pages carry their own checksums)."""
    record = {"size": size, "hashed": "chunks", "chunk": chunk, "sha256": _sha("".join(hashes).encode())}
    if len(hashes) > 1 and not rel.endswith(".parquet"):
        record["chunks"] = [h[:CHUNK_HEX] for h in hashes]
    return record


def bytes_record(data: bytes, rel: str) -> dict:
    """The record of a file from its bytes, as `RunDir.file_record` gives it."""
    record = _record(rel, len(data), _chunk_hashes(_slices(data, CHUNK)), CHUNK)
    if rel.endswith(".parquet"):
        record["footer"] = _legacy_sha(_reader(data), len(data), "footer")
    return record


def _chunk_hashes(blocks) -> list[str]:
    return [hashlib.sha256(block).hexdigest() for block in blocks]


def _slices(data: bytes, chunk: int):
    view = memoryview(data)
    return (view[i : i + chunk] for i in range(0, len(data), chunk))


def _reader(source):
    """read_at(offset, n) over bytes or a seekable file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return lambda offset, n: bytes(source[offset : offset + n])

    def read_at(offset: int, n: int) -> bytes:
        source.seek(offset)
        return source.read(n)

    return read_at


def _legacy_sha(read_at, size: int, kind: str) -> str:
    """The hash of a file as older records took it: `full`, its ends (first and last MiB) or its Parquet
    footer (with the 8-byte trailer; the trailer alone when the file is not Parquet). Chunked records keep
    the footer's, for the quick check."""
    if kind == "full":
        return _sha(read_at(0, size))
    if kind == "footer":
        last_8 = read_at(max(0, size - 8), 8)
        n = min(size, int.from_bytes(last_8[:4], "little") + 8 if last_8[4:] == b"PAR1" else 8)
        return _sha(read_at(size - n, n))
    tail = max(0, size - ENDS)
    return _sha(read_at(0, min(size, ENDS)) + read_at(tail, size - tail))


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


def _mtime(info: dict) -> str:
    """A file's modification time from fsspec's `info` (local `mtime`, S3 `LastModified`, memory `created`)."""
    return str(info.get("mtime") or info.get("LastModified") or info.get("created") or "")


def input_url(url: str) -> str:
    """An input's path as the manifest keeps it: absolute for a local file, with its protocol otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def input_record(url: str) -> dict:
    """Path, size, modification time and content hash of a file from outside the run (the hash streamed, and
    taken once per process for a file whose size and time are unchanged)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    key = (url, int(info["size"]), _mtime(info))
    if key not in _input_hashes:
        with fs.open(path, "rb") as f:
            _input_hashes[key] = _sha("".join(_chunk_hashes(iter(lambda: f.read(CHUNK), b""))).encode())
    return {"path": url, "size": key[1], "mtime": key[2], "sha256": _input_hashes[key]}


def input_change(url: str, record: dict) -> str | None:
    """How the input now at `url` differs from its record, or None. The file the record was taken of, with the
    same size and modification time, is taken as unchanged (as make and git do: a stat, no read); any other
    is hashed, so a file merely touched, copied back or found at another path is not a change."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return "it is gone"
    if int(info["size"]) != record["size"]:
        return f"it has {int(info['size'])} bytes, {record['size']} when read"
    if (url == record["path"] and _mtime(info) == record["mtime"]) or input_record(url)["sha256"] == record["sha256"]:
        return None
    return "its content differs from when it was read"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


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
    for name in (
        "neuron-embeddings",
        "torch",
        "transformer_lens",
        "transformers",
        "ray",
        "faiss-cpu",
        "numpy",
        "scipy",
        "pyarrow",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
