"""Per-neuron reads of a run directory (the viewer, importance): open a neuron, read only its rows.

Examples, clusters, dendrograms and importance are sorted by neuron inside each layer's part files, and
contexts by ctx_id. `SortedParts` keeps the key range of every Parquet row group (read from the file
footers, once) and decodes only the row groups that can hold the wanted keys. Decoded row groups stay in a
small LRU cache, so neighbouring neurons and repeated visits cost no second decode. Nothing is read before
it is asked for: building a `RunData` touches no file.

Only the outputs of finished stages are read (`ne.rundir.stages.state_of`): a stage left stale by redoing one
upstream of it is shown as missing, with what to run. Everything kept between reads (footers, row groups,
neuron lists) is keyed by the version of the stage that wrote it (`ne.rundir.stages.version`), so a stage redone
while a viewer is open is seen on the next read. A read that fails because a stage was redone meanwhile
says so, and a reader that must see one version throughout (`ne explain`) `pin`s it. Every problem a user
can cause (a wrong path, a run whose harvest has not finished, a damaged file) comes out as a `DataError`
whose message says what is wrong and what to run; the app shows it in the page.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ne import schema
from ne.config import RunConfig, from_dict
from ne.errors import DataError, NeError
from ne.rundir.graph import LM_STAGES, owner_of, redo_command
from ne.rundir.stages import config_as_run, require_done, state_of, version
from ne.rundir.store import RunDir, file_records

log = logging.getLogger(__name__)

SCORE_COLUMNS = {
    schema.SCORES_DIR: {"precision": "label_precision", "recall": "label_recall"},
    schema.EMBEDDING_SCORES_DIR: {"closer": "closer", "heldout": "heldout"},
}
"""What `RunData.cluster_scores` takes from each table of scores: {column: name in its answer}."""
_CACHE_BYTES = 256 * 2**20


class SortedParts:
    """The Parquet parts of one folder, read by key through row-group statistics."""

    def __init__(self, run: RunDir, folder: str, key: str, cache: _RowGroupCache, version: str | None = None):
        self.run, self.folder, self.key, self.cache, self.version = run, folder, key, cache, version
        records = file_records(run.manifest())  # read once: each part is verified against its record
        self.groups: list[tuple[str, pq.FileMetaData, int, float, float]] = []
        """(run-relative path, footer, row group, min key, max key), one per row group of every part."""
        for rel in run.parts(folder):
            record = records.get(rel)
            if record is not None:
                run.verify(rel, record, deep=False)  # size and footer; row groups are read with page checksums
            meta = run.read_footer(rel)
            for i in range(meta.num_row_groups):
                lo, hi = _key_range(meta.row_group(i), key)
                self.groups.append((rel, meta, i, lo, hi))

    def read(self, keys: Iterable[int], columns: list[str] | None = None) -> pa.Table:
        """Rows whose key is in `keys`, in file order."""
        wanted = np.unique(np.asarray(list(keys), dtype=np.int64))
        pieces = []
        for path, meta, i, lo, hi in self.groups:
            if not len(wanted) or not _overlaps(wanted, lo, hi):
                continue
            table = self.cache.get(
                (path, self.version, i), lambda path=path, meta=meta, i=i: self.run.read_row_group(path, meta, i)
            )
            mask = pc.is_in(table.column(self.key), value_set=pa.array(wanted, type=table.schema.field(self.key).type))
            rows = table.filter(mask)
            pieces.append(rows.select(columns) if columns else rows)
        if not pieces:
            return pa.table({})
        return pa.concat_tables(pieces)

    def column(self, name: str) -> np.ndarray:
        """One column of every row (small columns only: used to list a layer's neurons)."""
        out = [self.run.read_row_group(path, meta, i, columns=[name]).column(0) for path, meta, i, _, _ in self.groups]
        return np.concatenate([c.to_numpy() for c in out]) if out else np.zeros(0, np.int64)


class _RowGroupCache:
    """Decoded row groups, least recently used first, bounded by their size in bytes."""

    def __init__(self, max_bytes: int = _CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self.tables: OrderedDict[tuple, pa.Table] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, load) -> pa.Table:
        with self.lock:
            if key in self.tables:
                self.tables.move_to_end(key)
                return self.tables[key]
        table = load()
        with self.lock:
            self.tables[key] = table
            self.bytes += table.nbytes
            while self.bytes > self.max_bytes and len(self.tables) > 1:
                _, old = self.tables.popitem(last=False)
                self.bytes -= old.nbytes
        return table

    def clear(self) -> None:
        with self.lock:
            self.tables.clear()
            self.bytes = 0


def _key_range(group: pq.RowGroupMetaData, key: str) -> tuple[float, float]:
    for j in range(group.num_columns):
        col = group.column(j)
        if col.path_in_schema == key:
            stats = col.statistics
            if stats is not None and stats.has_min_max:
                return stats.min, stats.max
    return -np.inf, np.inf


def _overlaps(sorted_keys: np.ndarray, lo, hi) -> bool:
    i = np.searchsorted(sorted_keys, lo, side="left")
    return i < len(sorted_keys) and sorted_keys[i] <= hi


@dataclass
class Example:
    """One dataset example of a neuron, with what the page needs to draw it."""

    rank: int
    ctx_id: int
    pos: int
    """Position of the key token in the context."""
    act: float
    window_start: int
    window: np.ndarray
    """Stored activations from `window_start` on."""
    tokens: np.ndarray
    """The whole context's token ids."""
    cluster: int | None = None
    is_central: bool = False
    outlier: bool = False

    def act_at(self, i: int) -> float | None:
        """Activation at context position i, or None when the harvest did not store it."""
        j = i - self.window_start
        return float(self.window[j]) if 0 <= j < len(self.window) else None


@dataclass
class NeuronData:
    layer: int
    neuron: int
    examples: list[Example]
    """In rank (corpus) order."""
    max_act: float | None = None
    """The neuron's maximum over the corpus (maxima.parquet), which scales the highlighting; its minimum, a
    negative number, in a `harvest.direction: min` run."""
    linkage: np.ndarray | None = None
    """scipy linkage matrix [(n - 1), 4] over the examples in rank order; None before clustering."""
    threshold: float | None = None
    metrics: dict | None = None
    importance: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    """Precomputed token importance by rank: (first position, values up to the key token)."""
    labels: dict[int, str] = field(default_factory=dict)
    """Offline label of each feature cluster (the label stage's); empty before it ran."""
    scores: dict[int, dict[str, float | None]] = field(default_factory=dict)
    """Each feature cluster's scores on held-out text (`RunData.cluster_scores`); empty before they ran."""

    @property
    def clustered(self) -> bool:
        return any(e.cluster is not None for e in self.examples)

    def clusters(self) -> dict[int, list[Example]]:
        """Examples by cluster, clusters in id order (0 is the largest), the central example first."""
        out: dict[int, list[Example]] = {}
        for e in self.examples:
            out.setdefault(-1 if e.cluster is None else e.cluster, []).append(e)
        for members in out.values():
            members.sort(key=lambda e: (not e.is_central, e.rank))
        return dict(sorted(out.items()))

    @property
    def scale(self) -> float:
        """Activation that maps to full colour."""
        if self.max_act:  # signed: activations of the harvested sign are coloured
            return float(self.max_act)
        top = max((e.act for e in self.examples), key=abs, default=0.0)
        return top if top < 0 else max(top, 1e-9)


@dataclass
class RunStatus:
    kind: list[str]
    """`lm` when the run has language-model examples, `mnist` when it has MNIST models."""
    errors: list[str]
    """Problems that leave nothing to show."""
    warnings: list[str]
    """Stages missing or unfinished: the pages that need them say so."""


class RunData:
    """Lazy, thread-safe reader of one run directory; share one per run (st.cache_resource)."""

    def __init__(self, url: str, cache_bytes: int = _CACHE_BYTES):
        self.url = str(url)
        self.run = RunDir(self.url)
        self.cache = _RowGroupCache(cache_bytes)
        self._parts: dict[tuple[str, int | None], SortedParts] = {}
        self._neurons: dict[int, tuple[str | None, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._pinned: dict[str, str | None] | None = None

    # --- the run as a whole -----------------------------------------------------------------------------

    def manifest(self) -> dict:
        return self.run.require_manifest()

    def ready(self, stage: str, manifest: dict | None = None) -> bool:
        """True when `stage` finished and nothing upstream of it was redone since: its outputs may be read.
        `manifest`: one already read (a page reads it once, not once per table). Pinned, a stage redone
        since `pin` is an error, and one finished since is not ready."""
        m = manifest if manifest is not None else self.manifest()
        now = version(m, stage)
        if self._pinned is not None:
            if self._pinned.get(stage) is None:
                return False
            if now != self._pinned[stage]:
                raise self._redone(stage, m)
        return now is not None

    def require(self, stage: str, manifest: dict | None = None) -> None:
        """An error saying what to run unless `stage` can be read (`ready`)."""
        m = manifest if manifest is not None else self.manifest()
        if not self.ready(stage, m):
            require_done(self.run, stage, m)
            raise DataError(f"stage '{stage}' of {self.url} finished after this reader pinned the run; read it again")

    def versions(self, manifest: dict | None = None) -> tuple:
        """The version of every stage (`ne.rundir.stages.version`): a key for anything a caller keeps of this run."""
        m = manifest if manifest is not None else self.manifest()
        return tuple(version(m, name) for name in LM_STAGES)

    def pin(self) -> None:
        """Read the run as it is now from here on: a stage redone meanwhile makes every later read an error
        (`check_unchanged`), never an answer mixing two versions."""
        m = self.manifest()
        self._pinned = {name: version(m, name) for name in LM_STAGES}

    def check_unchanged(self, since: dict | None = None) -> None:
        """An error when a stage finished in manifest `since` (default: the pinned versions) was redone."""
        m = self.manifest()
        then = self._pinned if since is None else {name: version(since, name) for name in LM_STAGES}
        for name, was in (then or {}).items():
            if was is not None and version(m, name) != was:
                raise self._redone(name, m)

    @contextlib.contextmanager
    def _reading(self, m: dict):
        """Reads of the stages as manifest `m` has them: a read that fails because a stage was redone meanwhile
        (a part missing, or replaced under a cached footer) is reported as that."""
        try:
            yield
        except DataError:
            self.check_unchanged(m)
            raise

    def _redone(self, stage: str, m: dict) -> DataError:
        state, _ = state_of(m, stage)
        again = "read it again" if state == "done" else f"read it again once {redo_command(stage, False)} has finished"
        return DataError(
            f"stage '{stage}' of {self.url} was redone while this reader used it (it is now {state}); {again}"
        )

    def status(self) -> RunStatus:
        try:
            manifest = self.manifest()
        except DataError as exc:
            return RunStatus([], [str(exc)], [])
        stages = manifest["stages"]
        kind, errors, warnings = [], [], []
        if self.run.exists(schema.MNIST_DIR):
            kind.append("mnist")
        if "examples" in stages or self.run.exists(schema.EXAMPLES_DIR):
            try:
                require_done(self.run, "examples", manifest)
                if self.layers():
                    kind.append("lm")
                else:
                    errors.append(f"{self.url}/examples/ holds no layer; rerun the harvest with --force examples")
            except DataError as exc:
                errors.append(str(exc))
        if "lm" in kind:
            for stage in ("cluster", "index"):
                try:
                    require_done(self.run, stage, manifest)
                except DataError as exc:
                    warnings.append(str(exc))
        if not kind and not errors:
            errors.append(
                f"{self.url} holds neither language-model examples (examples/) nor MNIST models (mnist/); "
                "run `ne harvest` or the MNIST training into it first"
            )
        return RunStatus(kind, errors, warnings)

    def config(self, manifest: dict | None = None) -> RunConfig:
        """The config the run was made with: each setting as the stage that made what is read ran with it
        (`ne.rundir.stages.config_as_run`). A manifest without one, or with one not understood, is an error."""
        raw = config_as_run(manifest if manifest is not None else self.manifest(), self.url)
        try:
            cfg = from_dict(RunConfig, raw)
        except NeError as exc:
            raise DataError(
                f"the config in {self.run.path('manifest.json')} is not understood ({exc}); restore the "
                "manifest, or redo the run"
            ) from None
        cfg.run_dir = self.url  # where the run is read now, wherever it was written from
        return cfg

    def model_info(self) -> dict:
        """What the harvest recorded about the model: n_layers, d_mlp, bos_token_id, pad_token_id."""
        return self.manifest().get("model", {})

    def layers(self) -> list[int]:
        return self.run.layers(schema.EXAMPLES_DIR)

    def neurons(self, layer: int) -> np.ndarray:
        """Sorted ids of the neurons of `layer` that have examples (reads one int column)."""
        m = self.manifest()
        now = version(m, "examples")
        with self._lock:
            if layer in self._neurons and self._neurons[layer][0] == now:
                return self._neurons[layer][1]
        with self._reading(m):
            ids = np.unique(self._sorted(schema.EXAMPLES_DIR, layer, "neuron", m).column("neuron"))
        with self._lock:
            self._neurons[layer] = (now, ids)
        return ids

    def _sorted(self, kind: str, layer: int | None, key: str, manifest: dict) -> SortedParts:
        """The parts of one folder, kept while the stage that wrote them is not redone."""
        name = (kind, layer)
        folder = kind if layer is None else schema.layer_dir(kind, layer)
        now = version(manifest, owner_of(folder) or "")
        with self._lock:
            parts = self._parts.get(name)
        if parts is None or parts.version != now:
            parts = SortedParts(self.run, folder, key, self.cache, now)
            with self._lock:
                self._parts[name] = parts
        return parts

    def sorted_rows(
        self, kind: str, layer: int | None, key: str, keys: Iterable[int], columns: list[str] | None = None
    ) -> pa.Table:
        """Rows of folder `kind` (of `layer`, or the folder itself for None) whose `key` is in `keys`: the row
        groups that can hold them are the only ones decoded (the folder's parts must be sorted by `key`)."""
        m = self.manifest()
        with self._reading(m):
            return self._sorted(kind, layer, key, m).read(keys, columns)

    # --- one neuron ---------------------------------------------------------------------------------------

    def neuron(self, layer: int, neuron: int) -> NeuronData:
        """Everything the neuron page shows, read from the neuron's own rows, all of one version of the run."""
        m = self.manifest()
        self.require("examples", m)
        if layer not in self.layers():
            raise DataError(f"layer {layer} is not in {self.url}; it has layers {self.layers()}")
        with self._reading(m):
            data = self._neuron(layer, neuron, m)
        self.check_unchanged(m)
        return data

    def _neuron(self, layer: int, neuron: int, m: dict) -> NeuronData:
        rows = self._sorted(schema.EXAMPLES_DIR, layer, "neuron", m).read([neuron])
        data = NeuronData(layer, neuron, [], max_act=self._max_act(layer, neuron, m))
        if rows.num_rows == 0:
            return data
        rows = rows.sort_by("rank").to_pydict()
        tokens = self.tokens(rows["ctx_id"], m)
        for i, rank in enumerate(rows["rank"]):
            ctx = rows["ctx_id"][i]
            if ctx not in tokens:
                raise DataError(
                    f"context {ctx} of layer {layer} neuron {neuron} is missing from {self.url}/contexts/; "
                    "the run is half-written: rerun `ne harvest` with --force contexts"
                )
            data.examples.append(
                Example(
                    rank,
                    ctx,
                    rows["pos"][i],
                    rows["act"][i],
                    rows["window_start"][i],
                    np.asarray(rows["window"][i], np.float32),
                    tokens[ctx],
                )
            )
        if self.ready("cluster", m):
            self._add_clusters(data, m)
            self._add_dendrogram(data, m)
            data.metrics = self.metrics(layer, neuron, m)
            data.labels = self.labels(layer, neuron, m)
            data.scores = self.cluster_scores(layer, neuron, m)
        data.importance = self.precomputed_importance(layer, neuron, m)
        return data

    def tokens(self, ctx_ids: Iterable[int], manifest: dict | None = None) -> dict[int, np.ndarray]:
        m = manifest if manifest is not None else self.manifest()
        table = self._sorted(schema.CONTEXTS_DIR, None, "ctx_id", m).read(ctx_ids, ["ctx_id", "tokens"])
        if table.num_rows == 0:
            return {}
        return {
            c: np.asarray(t, np.int64)
            for c, t in zip(table.column("ctx_id").to_pylist(), table.column("tokens").to_pylist())
        }

    def heldout_tokens(self, ctx_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """{ctx_id: token ids} of held-out contexts (heldout/, the occurrence stage's); an id that is not a
        held-out context is an error naming it."""
        m = self.manifest()
        self.require("occurrence", m)
        wanted = [int(c) for c in ctx_ids]
        with self._reading(m):
            table = self._sorted(schema.HELDOUT_DIR, None, "ctx_id", m).read(wanted, ["ctx_id", "tokens"])
        out = (
            {}
            if table.num_rows == 0
            else {
                c: np.asarray(t, np.int64)
                for c, t in zip(table.column("ctx_id").to_pylist(), table.column("tokens").to_pylist())
            }
        )
        missing = sorted(set(wanted) - set(out))
        if missing:
            raise DataError(
                f"contexts {missing[:5]} are not held-out contexts of {self.url}; its held-out ids are "
                "those of heldout/ (occurrences/ name them)"
            )
        return out

    def _max_act(self, layer: int, neuron: int, manifest: dict) -> float | None:
        if not self.ready("maxima", manifest):
            return None
        table = self._read_small(schema.MAXIMA, [("layer", "=", layer), ("neuron", "=", neuron)])
        return float(table.column(2)[0].as_py()) if table.num_rows else None  # max_act, or min_act

    def _add_clusters(self, data: NeuronData, m: dict) -> None:
        table = self._sorted(schema.CLUSTERS_DIR, data.layer, "neuron", m).read([data.neuron]).to_pydict()
        by_rank = {r: i for i, r in enumerate(table.get("rank", []))}
        for e in data.examples:
            i = by_rank.get(e.rank)
            if i is not None:
                e.cluster, e.is_central, e.outlier = table["cluster"][i], table["is_central"][i], table["outlier"][i]

    def _add_dendrogram(self, data: NeuronData, m: dict) -> None:
        table = self._sorted(schema.DENDROGRAMS_DIR, data.layer, "neuron", m).read([data.neuron]).to_pydict()
        if table.get("linkage"):
            data.linkage = np.asarray(table["linkage"][0], np.float64).reshape(-1, 4)
            data.threshold = float(table["threshold"][0])

    def metrics(self, layer: int, neuron: int, manifest: dict | None = None) -> dict | None:
        if not self.ready("cluster", manifest):
            return None
        table = self._read_small(schema.METRICS, [("layer", "=", layer), ("neuron", "=", neuron)])
        return table.to_pylist()[0] if table.num_rows else None

    def metrics_table(self) -> pa.Table:
        """Every neuron's metrics (one small row each), for the sortable neuron table."""
        m = self.manifest()
        self.require("cluster", m)
        with self._reading(m):
            return self._read_small(schema.METRICS)

    def labels(self, layer: int, neuron: int, manifest: dict | None = None) -> dict[int, str]:
        """{cluster: offline label} of one neuron's feature clusters; empty before the label stage ran."""
        m = manifest if manifest is not None else self.manifest()
        if not (self.ready("label", m) and self.run.exists(schema.layer_dir(schema.LABELS_DIR, layer))):
            return {}
        table = self._sorted(schema.LABELS_DIR, layer, "neuron", m).read([neuron], ["cluster", "label"])
        if table.num_rows == 0:
            return {}
        return dict(zip(table.column("cluster").to_pylist(), table.column("label").to_pylist()))

    def cluster_scores(
        self, layer: int, neuron: int, manifest: dict | None = None
    ) -> dict[int, dict[str, float | None]]:
        """{cluster: scores on held-out text} of one neuron's feature clusters, from the stages that finished:
        `label_precision` and `label_recall` of its label (`scores`), `closer` and `heldout` (the share of its
        held-out occurrences closer to its own examples than to the unit's other clusters', of how many;
        `embedding_scores`). None where a score is undefined."""
        m = manifest if manifest is not None else self.manifest()
        out: dict[int, dict[str, float | None]] = {}
        for folder, names in SCORE_COLUMNS.items():
            if not (self.ready(owner_of(folder) or "", m) and self.run.exists(schema.layer_dir(folder, layer))):
                continue
            for row in self._sorted(folder, layer, "neuron", m).read([neuron], ["cluster", *names]).to_pylist():
                out.setdefault(row["cluster"], {}).update(
                    {new: None if row[old] is None or row[old] != row[old] else row[old] for old, new in names.items()}
                )
        return out

    def precomputed_importance(
        self, layer: int, neuron: int, manifest: dict | None = None
    ) -> dict[int, tuple[int, np.ndarray]]:
        m = manifest if manifest is not None else self.manifest()
        if not (self.ready("importance", m) and self.run.exists(schema.layer_dir(schema.IMPORTANCE_DIR, layer))):
            return {}
        table = self._sorted(schema.IMPORTANCE_DIR, layer, "neuron", m).read([neuron]).to_pydict()
        return {
            r: (s, np.asarray(v, np.float32))
            for r, s, v in zip(table.get("rank", []), table.get("start", []), table.get("importance", []))
        }

    def centroids(self, layer: int, neuron: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster ids, sizes, unit vectors [C, d]) of a neuron's feature clusters (empty for a neuron without
        examples); an error when the run's clusters are not finished."""
        m = self.manifest()
        self.require("cluster", m)
        with self._reading(m):
            table = self._sorted(schema.CENTROIDS_DIR, layer, "neuron", m).read([neuron]).to_pydict()
        if not table.get("cluster"):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        order = np.argsort(table["cluster"])
        vectors = np.asarray(table["vector"], np.float32)[order]
        return np.asarray(table["cluster"])[order], np.asarray(table["size"])[order], vectors

    def central_example(self, layer: int, neuron: int, cluster: int) -> Example | None:
        """The central example of one feature cluster (None when the neuron has no such cluster); a damaged or
        missing file is an error naming it, as for the neuron itself."""
        members = self.neuron(layer, neuron).clusters().get(cluster, [])
        return members[0] if members else None

    def _read_small(self, rel: str, filters=None, columns=None) -> pa.Table:
        return self.run.read_parquet(rel, columns=columns, filters=filters)


def central_examples(run: RunDir, layer: int) -> pa.Table:
    """neuron, cluster, rank, ctx_id, pos, h_id of every feature cluster's central example of one layer, sorted by
    neuron then cluster (what the index stores, and what a similar feature is shown by)."""
    central = run.read_parquet(
        schema.layer_dir(schema.CLUSTERS_DIR, layer),
        columns=["neuron", "rank", "cluster", "is_central"],
        filters=pc.field("is_central"),
    )
    examples = run.read_parquet(
        schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "rank", "ctx_id", "pos", "h_id"]
    )
    ids = central.join(examples, keys=["neuron", "rank"]).sort_by([("neuron", "ascending"), ("cluster", "ascending")])
    if ids.num_rows != central.num_rows:
        raise DataError(f"{run.url}: clusters/layer={layer} names examples missing from examples/; rerun `ne cluster`")
    return ids.select(["neuron", "cluster", "rank", "ctx_id", "pos", "h_id"])


def key_token_snippet(tokens, pos: int, decode, before: int = 12, after: int = 4) -> str:
    """The text around position `pos` of a context on one line, the key token in [[ ]] (its leading space
    left outside the brackets, newlines shown as ⏎)."""
    lo, hi = max(0, pos - before), min(len(tokens), pos + after + 1)
    pieces = list(decode(list(tokens[lo:hi]))) if len(tokens) else []
    key = pos - lo
    if key < len(pieces):
        text = pieces[key]
        stripped = text.lstrip()
        pieces[key] = f"{text[: len(text) - len(stripped)]}[[{stripped}]]"
    return "".join(pieces).strip().replace("\n", "⏎")
