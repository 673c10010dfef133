"""Exports of a run's feature clusters for other tools: EleutherAI delphi's latent cache, Neuronpedia's import layout.

Each feature cluster is a virtual latent of its layer, numbered `unit × C + cluster`, where C is the most clusters any
unit of the run has (recorded in each export). Clusters smaller than `cluster.min_cluster_size` (outliers, lone
examples) are left out.

**delphi** (`OUT/latents/layers.L.mlp/`, one folder per layer, as delphi's `LatentCache.save_splits` and
`save_config` write them): `{start}_{end}.safetensors` files over consecutive latent ranges (end inclusive), each with
`locations` [N, 3] (row of `tokens`, position, latent - start; uint16, or uint32 when a value needs it),
`activations` [N] (float16) and `tokens` [contexts, n_ctx] (int64, short contexts padded with the pad token), and a
`config.json` with delphi's cache settings. The locations are where each cluster fires in held-out contexts (the
`occurrence` stage's table; `tokens` then holds the held-out contexts of `heldout/` that it names) when the run has
them, otherwise the key tokens of its dataset examples: then `tokens` holds the run's corpus, and a context where no
example was kept may still hold a firing below the top k.

**Neuronpedia** (`OUT/<model id>/<layer>-<source set>/`, as its `convert-saedashboard-to-neuronpedia-export.py`
writes them and its importer reads them): `model.jsonl`, `sourceset.jsonl`, `source.jsonl`, and `features/`,
`activations/`, `explanations/` as `batch-N.jsonl.gz`, one JSON object per line with the fields of the importer's
tables. Activations are each cluster's dataset examples: the stored window of tokens around the key token, the
cluster's activation at the key token and 0 elsewhere (which cluster fired at the other tokens is not known).
Explanations are the offline labels, and the LLM descriptions when the run has them.

Fields, types and layouts were read from the two projects' sources; `tests/fixtures/export_formats.json` cites the
files and commits, and the tests read every export back against it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import safetensors.numpy

from ne import schema
from ne.compute.harvest import SIGNS
from ne.config import RunConfig
from ne.errors import ConfigError, DataError
from ne.rundir.graph import GRAPH
from ne.rundir.reader import RunData
from ne.rundir.stages import require_done, state_of
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

FORMATS = ("delphi", "neuronpedia")
DEFAULT_SPLITS = 5
"""Files per layer of a delphi cache: its `CacheConfig.n_splits` default."""
NEURONPEDIA_CREATOR = "clkht01d40000jv08hvalcvly"
"""The user Neuronpedia's database seed creates and its webapp uses as DEFAULT_CREATOR_USER_ID."""
NEURONS_PER_BATCH = 256
"""Units per Neuronpedia batch file (their features, activations and explanations)."""
HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
"""Model names of ours whose tokenizer delphi should load from the hub under another name."""


@dataclass
class ExportSummary:
    format: str
    out: str
    latents: int
    """Feature clusters exported."""
    rows: int
    """delphi: locations written; Neuronpedia: activation records."""
    source: str
    """Where firings come from: `occurrences` (held-out) or `examples` (the run's dataset examples)."""
    seconds: float

    def describe(self) -> str:
        what = "locations" if self.format == "delphi" else "activation records"
        return (
            f"export done in {self.seconds:.1f} s: {self.latents} feature clusters as {self.format} latents, "
            f"{self.rows} {what} from the run's {self.source}\noutputs: {self.out}"
        )


def export_run(
    run_dir: str,
    fmt: str,
    out: str,
    force: bool = False,
    splits: int | None = None,
    model_id: str | None = None,
    source_set: str = "ne-clusters",
    creator_id: str | None = None,
) -> ExportSummary:
    """Write the run's feature clusters to `out` in format `fmt`; an existing non-empty `out` only with `force`.
    `splits`: delphi files per layer (default `DEFAULT_SPLITS`); `creator_id`: Neuronpedia's user id (default
    `NEURONPEDIA_CREATOR`)."""
    splits = DEFAULT_SPLITS if splits is None else splits
    creator_id = creator_id or NEURONPEDIA_CREATOR
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if splits < 1:
        raise ConfigError(f"--splits is {splits}; a delphi cache needs at least one file per layer, e.g. --splits 5")
    start = time.perf_counter()
    run = RunDir(run_dir)
    manifest = run.require_manifest()
    require_done(run, "cluster", manifest)
    target = RunDir(out)
    if target.fs.exists(target.root):
        if not target.fs.isdir(target.root):
            raise ConfigError(f"{out} is a file; give a directory to export into")
        if target.fs.ls(target.root) and not force:
            raise ConfigError(f"{out} is not empty; give a new or empty directory, or --force to replace what is there")
    staging = RunDir(f"{out.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}")  # written whole, then moved into place
    try:
        view = RunView(run, manifest)
        if fmt == "delphi":
            latents, rows, source = write_delphi(view, staging, splits)
        else:
            require_done(run, "label", manifest)
            latents, rows = write_neuronpedia(
                view, staging, model_id or slug(view.cfg.model.name), source_set, creator_id
            )
            source = "examples"
        if target.fs.exists(target.root):
            target.fs.rm(target.root, recursive=True)
        staging.fs.mv(staging.root, target.root, recursive=True)
    finally:
        if staging.fs.exists(staging.root):
            staging.fs.rm(staging.root, recursive=True)
    return ExportSummary(fmt, out, latents, rows, source, time.perf_counter() - start)


def slug(name: str) -> str:
    """A Neuronpedia model id: letters, digits, dashes and underscores, lower case."""
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower().rsplit("/", 1)[-1]).strip("-") or "model"


class RunView:
    """What both exports read from a finished run: its config, layers, units, clusters and examples."""

    def __init__(self, run: RunDir, manifest: dict):
        self.run, self.manifest = run, manifest
        self.cfg: RunConfig = RunData(run.url).config(manifest)  # each setting as the stage that made it ran
        self.layers: list[int] = manifest["stages"]["examples"]["info"]["layers"]
        self.model = manifest.get("model", {})
        self.d_mlp = int(self.model["d_mlp"])
        self.sign = SIGNS[self.cfg.harvest.direction]
        self.min_size = self.cfg.cluster.min_cluster_size
        self.per_unit = max(
            int(
                pc.max(
                    run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer), columns=["cluster"]).column(
                        "cluster"
                    )
                ).as_py()
                or 0
            )
            + 1
            for layer in self.layers
        )
        """C: every unit's clusters are numbered below it."""

    def kept_clusters(self, layer: int, lo: int, hi: int) -> pd.DataFrame:
        """neuron, cluster, size of the clusters of units lo..hi-1 that are not outliers."""
        table = self.run.read_parquet(
            schema.layer_dir(schema.CENTROIDS_DIR, layer),
            columns=["neuron", "cluster", "size"],
            filters=[("neuron", ">=", lo), ("neuron", "<", hi)],
        ).to_pandas()
        return table[table["size"] >= self.min_size].sort_values(["neuron", "cluster"]).reset_index(drop=True)

    def examples(self, layer: int, lo: int, hi: int) -> pd.DataFrame:
        """The examples of units lo..hi-1 with their cluster, those of outlier clusters left out."""
        where = [("neuron", ">=", lo), ("neuron", "<", hi)]
        ex = self.run.read_parquet(
            schema.layer_dir(schema.EXAMPLES_DIR, layer),
            columns=["neuron", "rank", "ctx_id", "pos", "act", "window_start", "window"],
            filters=where,
        ).to_pandas()
        cl = self.run.read_parquet(
            schema.layer_dir(schema.CLUSTERS_DIR, layer),
            columns=["neuron", "rank", "cluster", "outlier"],
            filters=where,
        ).to_pandas()
        both = ex.merge(cl, on=["neuron", "rank"], how="left", validate="one_to_one")
        if both.cluster.isna().any():
            raise DataError(
                f"{self.run.url}: examples of layer {layer} have no cluster; redo the clusters with "
                "`ne cluster --config CONFIG --force cluster`"
            )
        both = both[~both.outlier.astype(bool)]
        return both.astype({"cluster": np.int64}).sort_values(["neuron", "cluster", "rank"]).reset_index(drop=True)

    def occurrences_ready(self) -> bool:
        return occurrences_ready(self.manifest)

    def pad_id(self) -> int:
        pad = self.model.get("pad_token_id")
        return int(pad) if pad is not None else 0


def occurrences_ready(manifest: dict) -> bool:
    """True when the run has a finished `occurrence` stage (where every feature cluster fires in held-out contexts).
    The stage is issue 18's; until it is in the graph, no run has one."""
    return "occurrence" in GRAPH and state_of(manifest, "occurrence")[0] == "done"


def unit_ranges(d_mlp: int, splits: int) -> list[tuple[int, int]]:
    """Consecutive unit ranges [lo, hi) covering 0..d_mlp-1, as even as delphi's own splits."""
    bounds = np.linspace(0, d_mlp, min(splits, d_mlp) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --- delphi -----------------------------------------------------------------------------------------------------


def delphi_module(layer: int) -> str:
    return f"layers.{layer}.mlp"


def write_delphi(view: RunView, out: RunDir, splits: int, from_occurrences: bool | None = None) -> tuple[int, int, str]:
    """The latent cache of every layer; returns (latents, locations, source). `from_occurrences`: take the firings
    from `occurrences/` (held-out contexts) rather than from the dataset examples; by default when the run's
    `occurrence` stage is done."""
    occurrences = view.occurrences_ready() if from_occurrences is None else from_occurrences
    source = "occurrences" if occurrences else "examples"
    n_ctx, pad = view.cfg.data.n_ctx, view.pad_id()
    if occurrences:  # held-out firings name held-out contexts: heldout/, not the harvest's contexts/
        tokens, ctx_ids = heldout_matrix(view.run, n_ctx, pad, occurrence_contexts(view.run, view.layers))
    else:
        tokens, ctx_ids = token_matrix(view.run, n_ctx, pad)
    folder_read = schema.HELDOUT_DIR if occurrences else schema.CONTEXTS_DIR
    c = view.per_unit
    latents = rows = 0
    for layer in view.layers:
        folder = f"latents/{delphi_module(layer)}"
        for lo, hi in unit_ranges(view.d_mlp, splits):
            kept = view.kept_clusters(layer, lo, hi)
            latents += len(kept)
            fired = read_occurrences(view.run, kept, layer, lo, hi) if occurrences else view.examples(layer, lo, hi)
            unit = fired["unit" if "unit" in fired else "neuron"].to_numpy(np.int64)
            seq = np.searchsorted(ctx_ids, fired.ctx_id.to_numpy(np.int64))
            if len(seq) and (seq.max() >= len(ctx_ids) or not np.array_equal(ctx_ids[seq], fired.ctx_id.to_numpy())):
                raise DataError(
                    f"{view.run.url}: firings of layer {layer} name contexts that {folder_read}/ does not hold; "
                    "redo the stage that wrote them"
                )
            locations = np.stack(
                [seq, fired.pos.to_numpy(np.int64), unit * c + fired.cluster.to_numpy(np.int64) - lo * c], axis=1
            ).reshape(-1, 3)
            small = not len(locations) or (locations[:, 2].max() < 2**16 and locations[:, 0].max() < 2**16)
            data = {
                "locations": locations.astype(np.uint16 if small else np.uint32),
                "activations": (view.sign * fired.act.to_numpy(np.float32)).astype(np.float16),
                "tokens": tokens,
            }
            out.write_bytes(f"{folder}/{lo * c}_{hi * c - 1}.safetensors", safetensors.numpy.save(data))
            rows += len(locations)
        out.write_bytes(f"{folder}/config.json", json.dumps(delphi_config(view, tokens, splits), indent=4).encode())
    return latents, rows, source


def delphi_config(view: RunView, tokens: np.ndarray, splits: int) -> dict:
    """delphi's `CacheConfig` fields and `model_name`, as its `save_config` writes them, plus what numbers our
    latents (keys of our own start with `ne_`; delphi reads only its own)."""
    data = view.cfg.data
    repo = {"hf": data.name, "pydoc": "pydoc_data.topics", "files": ",".join(data.paths)}[data.source]
    return {
        "dataset_repo": repo,
        "dataset_split": data.split if data.source == "hf" else "",
        "dataset_name": "",
        "dataset_column": data.text_field,
        "batch_size": view.cfg.harvest.batch_size,
        "cache_ctx_len": int(tokens.shape[1]),
        "n_tokens": int(tokens.size),
        "n_splits": splits,
        "model_name": model_hub_id(view.cfg),
        "ne_latent": "unit * ne_clusters_per_unit + cluster",
        "ne_clusters_per_unit": view.per_unit,
        "ne_units": view.d_mlp,
        "ne_run": view.run.url,
        "ne_direction": view.cfg.harvest.direction,
    }


def model_hub_id(cfg: RunConfig) -> str:
    """The name delphi gives `AutoTokenizer.from_pretrained` for the run's tokenizer."""
    if cfg.model.backend == "safetensors" and cfg.model.tokenizer:
        return cfg.model.tokenizer
    return HUB_IDS.get(cfg.model.name, cfg.model.name)


def token_matrix(run: RunDir, n_ctx: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """([contexts, n_ctx] int64 tokens padded with `pad`, their sorted ctx_ids) of every context of contexts/."""
    table = run.read_parquet(schema.CONTEXTS_DIR, columns=["ctx_id", "tokens"]).sort_by("ctx_id")
    return padded(run, table.column("ctx_id").to_numpy(), table.column("tokens").combine_chunks(), n_ctx, pad)


def heldout_matrix(run: RunDir, n_ctx: int, pad: int, ctx_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As `token_matrix`, of the held-out contexts `ctx_ids` (heldout/; an id not held out is an error naming it)."""
    ids = np.unique(np.asarray(ctx_ids, np.int64))
    tokens = RunData(run.url).heldout_tokens(ids.tolist())
    return padded(run, ids, pa.array([tokens[int(c)] for c in ids], pa.list_(pa.int64())), n_ctx, pad)


def padded(run: RunDir, ids: np.ndarray, col: pa.ListArray, n_ctx: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The token lists `col` as rows of a [len(ids), n_ctx] int64 matrix padded with `pad`, and `ids` as int64."""
    out = np.full((len(ids), n_ctx), pad, np.int64)
    flat, offsets = col.flatten().to_numpy(), col.offsets.to_numpy() - col.offsets[0].as_py()
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > n_ctx:
        raise DataError(f"{run.url}: a context holds {lengths.max()} tokens, more than data.n_ctx {n_ctx}")
    row = np.repeat(np.arange(len(ids)), lengths)
    col_index = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    out[row, col_index] = flat
    return out, np.asarray(ids, np.int64)


def read_occurrences(run: RunDir, kept: pd.DataFrame, layer: int, lo: int, hi: int) -> pd.DataFrame:
    """The held-out firings of units lo..hi-1 of `layer` (`schema.OCCURRENCES`) as one of the `kept` clusters
    (neuron, cluster), in table order: a unit without clusters (cluster -1) or an outlier cluster is no latent."""
    table = run.read_parquet(
        schema.layer_dir(schema.OCCURRENCES_DIR, layer), filters=[("unit", ">=", lo), ("unit", "<", hi)]
    ).to_pandas()
    keys = kept[["neuron", "cluster"]].rename(columns={"neuron": "unit"}).astype(np.int64)
    return table.astype({"unit": np.int64, "cluster": np.int64}).merge(keys, on=["unit", "cluster"], how="inner")


def occurrence_contexts(run: RunDir, layers: Sequence[int]) -> np.ndarray:
    """The sorted ctx_ids of the held-out contexts where any unit of `layers` fires."""
    ids = [
        pc.unique(
            run.read_parquet(schema.layer_dir(schema.OCCURRENCES_DIR, layer), columns=["ctx_id"]).column("ctx_id")
        ).to_numpy()
        for layer in layers
    ]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


# --- Neuronpedia ----------------------------------------------------------------------------------------------


def write_neuronpedia(
    view: RunView,
    out: RunDir,
    model_id: str,
    source_set: str,
    creator_id: str,
    decode: Callable[[Sequence[int]], list[str]] | None = None,
) -> tuple[int, int]:
    """One source per layer under `out/model_id/`; returns (features, activation records)."""
    from ne.describe import read_descriptions
    from ne.models import load_token_decoder

    if not re.fullmatch(r"[a-z0-9_-]{1,128}", model_id):
        raise ConfigError(
            f"--model-id {model_id!r}: Neuronpedia model ids hold only lower-case letters, digits, "
            "dashes and underscores, e.g. gpt2-small"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", source_set):
        raise ConfigError(f"--source-set {source_set!r}: use letters, digits, dashes and underscores, e.g. ne-clusters")
    created = view.manifest["stages"]["cluster"].get("finished") or ""
    described = read_descriptions(view.run) if state_of(view.manifest, "describe")[0] == "done" else {}
    features = records = 0
    for layer in view.layers:
        source_id = f"{layer}-{source_set}"
        folder = f"{model_id}/{source_id}"
        meta = neuronpedia_meta(view, model_id, source_id, source_set, creator_id, created)
        for name, row in meta.items():
            out.write_bytes(f"{folder}/{name}.jsonl", (json.dumps(row) + "\n").encode())
        labels = view.run.read_parquet(
            schema.layer_dir(schema.LABELS_DIR, layer), columns=["neuron", "cluster", "label"]
        ).to_pandas()
        source = _Source(
            view,
            layer,
            {"modelId": model_id, "layer": source_id},
            source_set,
            creator_id,
            created,
            dict(zip(zip(labels.neuron, labels.cluster), labels.label)),
            described,
            decode or load_token_decoder(view.cfg.model),
        )
        for batch, (lo, hi) in enumerate(unit_ranges(view.d_mlp, -(-view.d_mlp // NEURONS_PER_BATCH))):
            feats, acts, expl = source.batch(lo, hi)
            for kind, rows in (("features", feats), ("activations", acts), ("explanations", expl)):
                if rows:
                    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    out.write_bytes(
                        f"{folder}/{kind}/batch-{batch}.jsonl.gz",
                        gzip.compress(text.encode(), compresslevel=5, mtime=0),
                    )
            features += len(feats)
            records += len(acts)
    return features, records


@dataclass
class _Source:
    """One layer's Neuronpedia source: its rows, batch by batch of neurons."""

    view: RunView
    layer: int
    where: dict[str, str]
    """modelId and layer (the source id) of every row."""
    source_set: str
    creator_id: str
    created: str
    labels: dict[tuple[int, int], str]
    described: dict
    decode: Callable[[Sequence[int]], list[str]]

    def batch(self, lo: int, hi: int) -> tuple[list[dict], list[dict], list[dict]]:
        """(features, activations, explanations) of neurons lo..hi - 1."""
        view = self.view
        ex = view.examples(self.layer, lo, hi)
        windows = list(_windows(_contexts(view.run, ex.ctx_id.unique()), ex))
        ids = sorted({int(t) for tokens, _ in windows for t in tokens})
        pieces = dict(zip(ids, self.decode(ids))) if ids else {}
        neuron_n, cluster_n = ex.neuron.to_numpy(np.int64), ex.cluster.to_numpy(np.int64)
        act_n = view.sign * ex.act.to_numpy(np.float64)
        ctx_n, pos_n = ex.ctx_id.to_numpy(np.int64), ex.pos.to_numpy(np.int64)
        starts = np.flatnonzero(np.r_[True, (np.diff(neuron_n) != 0) | (np.diff(cluster_n) != 0)])
        feats, acts, expl = [], [], []
        for first, end in zip(starts, np.r_[starts[1:], len(ex)]):
            neuron, cluster = int(neuron_n[first]), int(cluster_n[first])
            common = {**self.where, "index": str(neuron * view.per_unit + cluster)}
            for i in range(first, end):
                tokens, key = windows[i]
                acts.append(
                    self._activation(
                        common, [pieces[int(t)] for t in tokens], key, float(act_n[i]), int(ctx_n[i]), int(pos_n[i])
                    )
                )
            feats.append(
                {
                    **common,
                    "creatorId": self.creator_id,
                    "createdAt": self.created,
                    "maxActApprox": float(act_n[first:end].max()),
                    **FEATURE_DEFAULTS,
                    "sourceSetName": self.source_set,
                }
            )
            expl += self._explanations(common, neuron, cluster)
        return feats, acts, expl

    def _activation(self, common: dict, tokens: list[str], key: int, value: float, ctx: int, pos: int) -> dict:
        values = [0.0] * len(tokens)
        values[key] = value
        return {
            "id": _cuid(common["modelId"], common["layer"], common["index"], ctx, pos),
            "tokens": tokens,
            **common,
            "maxValue": value,
            "maxValueTokenIndex": key,
            "minValue": min(values),
            "values": values,
            "creatorId": self.creator_id,
            "dataSource": None,
            "dataIndex": str(ctx),
            **ACTIVATION_DEFAULTS,
            "createdAt": self.created,
            "qualifyingTokenIndex": key,
        }

    def _explanations(self, common: dict, neuron: int, cluster: int) -> list[dict]:
        texts = [("ne offline label", self.labels.get((neuron, cluster)))]
        llm = self.described.get((self.layer, neuron, cluster))
        if llm is not None:
            texts.append((f"ne describe, {llm['model']}", llm["description"]))
        return [
            {
                "id": _cuid(common["modelId"], common["layer"], common["index"], notes),
                **common,
                "description": text,
                "authorId": self.creator_id,
                "triggeredById": None,
                "typeName": None,
                "explanationModelName": None,
                "notes": notes,
                "createdAt": self.created,
            }
            for notes, text in texts
            if text
        ]


ACTIVATION_DEFAULTS: dict[str, object] = {
    "dfaValues": [],
    "dfaTargetIndex": None,
    "dfaMaxValue": None,
    "lossValues": [],
    "logitContributions": None,
    "binMin": None,
    "binMax": None,
    "binContains": None,
    "zIndices": None,
    "zValues": None,
}
"""The Activation fields of data an export does not have, at Neuronpedia's own defaults."""

FEATURE_DEFAULTS: dict[str, object] = {
    "hasVector": False,
    "vector": [],
    "vectorLabel": None,
    "vectorDefaultSteerStrength": 10,
    "hookName": None,
    "topkCosSimIndices": [],
    "topkCosSimValues": [],
    "neuron_alignment_indices": [],
    "neuron_alignment_values": [],
    "neuron_alignment_l1": [],
    "correlated_neurons_indices": [],
    "correlated_neurons_pearson": [],
    "correlated_neurons_l1": [],
    "correlated_features_indices": [],
    "correlated_features_pearson": [],
    "correlated_features_l1": [],
    "neg_str": [],
    "neg_values": [],
    "pos_str": [],
    "pos_values": [],
    "frac_nonzero": 0,
    "freq_hist_data_bar_heights": [],
    "freq_hist_data_bar_values": [],
    "logits_hist_data_bar_heights": [],
    "logits_hist_data_bar_values": [],
    "decoder_weights_dist": [],
}
"""The Feature fields an export without dashboards data leaves at Neuronpedia's own defaults."""


def neuronpedia_meta(
    view: RunView, model_id: str, source_id: str, source_set: str, creator_id: str, created: str
) -> dict[str, dict]:
    """model.jsonl, sourceset.jsonl and source.jsonl of one source (the importer requires all three)."""
    name = view.cfg.model.name
    data = view.cfg.data
    model = {
        "id": model_id,
        "instruct": False,
        "creatorId": creator_id,
        "displayNameShort": name,
        "displayName": name,
        "tlensId": name if view.cfg.model.backend == "transformer_lens" else None,
        "dimension": view.model.get("d_model"),
        "visibility": "PUBLIC",
        "defaultSourceSetName": source_set,
        "defaultSourceId": source_id,
        "inferenceEnabled": False,
        "layers": int(view.model.get("n_layers", 0)),
        "neuronsPerLayer": view.d_mlp * view.per_unit,
        "createdAt": created,
        "owner": "",
        "updatedAt": created,
        "website": None,
    }
    sourceset = {
        "modelId": model_id,
        "name": source_set,
        "creatorId": creator_id,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "description": "Feature clusters of MLP units (neuron embeddings)",
        "type": "",
        "creatorName": "neuron-embeddings",
        "urls": [],
        "creatorEmail": None,
        "releaseName": None,
        "defaultOfModelId": None,
        "defaultRange": 1,
        "defaultShowBreaks": True,
        "showDfa": False,
        "showCorrelated": False,
        "showHeadAttribution": False,
        "showUmap": False,
        "createdAt": created,
    }
    source = {
        "id": source_id,
        "modelId": model_id,
        "setName": source_set,
        "creatorId": creator_id,
        "hasDashboards": True,
        "inferenceEnabled": False,
        "inferenceHosts": [],
        "saelensConfig": None,
        "saelensRelease": None,
        "saelensSaeId": None,
        "hfRepoId": None,
        "hfFolderId": None,
        "visibility": "PUBLIC",
        "defaultOfModelId": None,
        "hasUmap": False,
        "hasUmapLogSparsity": False,
        "hasUmapClusters": False,
        "num_prompts": int(view.manifest["stages"]["contexts"].get("info", {}).get("n_contexts", 0)) or None,
        "num_tokens_in_prompt": data.n_ctx,
        "dataset": {"hf": data.name, "pydoc": "pydoc_data.topics", "files": ",".join(data.paths)}[data.source],
        "notes": f"neuron-embeddings feature clusters: index = unit * {view.per_unit} + cluster",
        "createdAt": created,
    }
    return {"model": model, "sourceset": sourceset, "source": source}


def _windows(tokens: dict[int, np.ndarray], ex: pd.DataFrame):
    """(token ids from window_start to the end of the stored window, position of the key token in it) per example."""
    for ctx, start, window, pos in zip(ex.ctx_id.to_numpy(), ex.window_start.to_numpy(), ex.window, ex.pos.to_numpy()):
        yield tokens[int(ctx)][start : start + len(window)], int(pos - start)


def _contexts(run: RunDir, ctx_ids) -> dict[int, np.ndarray]:
    if not len(ctx_ids):
        return {}
    table = run.read_parquet(
        schema.CONTEXTS_DIR,
        columns=["ctx_id", "tokens"],
        filters=pc.field("ctx_id").isin(pa.array(np.asarray(ctx_ids, np.int64))),
    )
    ids, tokens = table.column("ctx_id").to_pylist(), table.column("tokens").to_pylist()
    return {int(c): np.asarray(t) for c, t in zip(ids, tokens)}


def _cuid(*parts) -> str:
    """A deterministic 25-character id in the shape of the cuids Neuronpedia's rows carry."""
    return "c" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24]


def exported_layout(out: str) -> list[str]:
    """Every file of an export, relative to `out` (for listings and tests)."""
    target = RunDir(out)
    return [posixpath.relpath(p, target.root) for p in sorted(target.fs.find(target.root))]
