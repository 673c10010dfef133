"""Queries of the similar-features index: by (layer, neuron, cluster) or by a raw vector."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd

from ne import schema
from ne.checks import integer
from ne.errors import ConfigError, DataError
from ne.rundir.reader import RunData
from ne.rundir.stages import require_done, version
from ne.rundir.store import RunDir

_REBUILD = "rebuild it with `ne index --config CONFIG --force index`"


@dataclass
class SimilarFeature:
    """One feature cluster found by a query, identified by its central example."""

    layer: int
    neuron: int
    cluster: int
    similarity: float
    """Cosine similarity of its central example's vector to the query."""
    ctx_id: int
    pos: int
    """The central example: its context and key token."""
    rank: int
    """The central example's rank among the neuron's examples."""


class SimilarFeatures:
    """The index of a run directory with its row ids; `load` it once, query it many times."""

    def __init__(self, index: faiss.Index, ids: pd.DataFrame, info: dict):
        self.index, self.ids, self.info = index, ids, info
        self.d_mlp = {int(k): v for k, v in info["d_mlp"].items()}
        self._row = pd.Series(ids.index.to_numpy(), index=pd.MultiIndex.from_frame(ids[["layer", "neuron", "cluster"]]))
        self._clusters = ids.groupby(["layer", "neuron"]).size()
        if "nprobe" in info:
            faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
            faiss.extract_index_ivf(index).make_direct_map()

    @classmethod
    def load(cls, run_dir: str | RunDir) -> SimilarFeatures:
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        m = run.require_manifest()
        entry = require_done(run, "index", m)
        info = entry["info"]
        if schema.INDEX_IDS_FILE in entry["files"]:
            run.verify(schema.INDEX_IDS_FILE, entry["files"][schema.INDEX_IDS_FILE])
        data = run.read_bytes(schema.INDEX_FILE)
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise DataError(f"{run.path(schema.INDEX_FILE)} is not a readable FAISS index ({len(data)} bytes); "
                            f"{_REBUILD}") from exc
        ids = run.read_parquet(schema.INDEX_IDS_FILE).to_pandas().sort_values("row").reset_index(drop=True)
        if version(run.manifest(), "index") != version(m, "index"):
            raise DataError(f"stage 'index' of {run.url} was redone while it was read; read it again once "
                            f"`ne index` has finished")
        if index.ntotal != len(ids) or index.d != info["d"] or not np.array_equal(ids.row, np.arange(len(ids))):
            raise DataError(
                f"{run.path(schema.INDEX_FILE)} holds {index.ntotal} vectors of dimension {index.d} but ids.parquet "
                f"has {len(ids)} rows and the manifest says d={info['d']}; {_REBUILD}"
            )
        return cls(index, ids, info)

    @property
    def dim(self) -> int:
        return self.index.d

    def _check_k(self, k: int) -> int:
        if integer("k", k) <= 0:
            raise ConfigError(f"k is {k!r}; ask for at least one similar feature, for example k=20")
        return int(k)

    def row_of(self, layer: int, neuron: int, cluster: int) -> int:
        """The index row of a feature cluster; an error naming the valid range when it does not exist."""
        layer, neuron, cluster = integer("layer", layer), integer("neuron", neuron), integer("cluster", cluster)
        if layer not in self.d_mlp:
            raise ConfigError(f"layer {layer} is not in this index; it holds layers {sorted(self.d_mlp)}")
        if not 0 <= neuron < self.d_mlp[layer]:
            raise ConfigError(f"neuron {neuron} is out of range; layer {layer} has neurons 0..{self.d_mlp[layer] - 1}")
        n_clusters = int(self._clusters.get((layer, neuron), 0))
        if n_clusters == 0:
            raise ConfigError(f"neuron {neuron} of layer {layer} has no examples, hence no clusters; pick another")
        if not 0 <= cluster < n_clusters:
            raise ConfigError(f"cluster {cluster} is out of range; neuron {neuron} of layer {layer} has clusters "
                              f"0..{n_clusters - 1}")
        return int(self._row[(layer, neuron, cluster)])

    def query(
        self, layer: int, neuron: int, cluster: int, k: int = 20, exclude_same_neuron: bool = True
    ) -> list[SimilarFeature]:
        """The k feature clusters most similar to (layer, neuron, cluster), by their central examples.

        With `exclude_same_neuron` (the default) the query neuron's own clusters are left out.
        """
        k = self._check_k(k)
        row = self.row_of(layer, neuron, cluster)
        vec = np.asarray(self.index.reconstruct(row))[None]
        skip = int(self._clusters[(layer, neuron)]) if exclude_same_neuron else 0
        hits = self._search(vec, k + skip)
        if exclude_same_neuron:
            hits = [h for h in hits if (h.layer, h.neuron) != (layer, neuron)]
        return hits[:k]

    def query_vector(self, vec, k: int = 20) -> list[SimilarFeature]:
        """The k feature clusters most similar to a vector in the indexed space: only its direction counts."""
        k = self._check_k(k)
        try:
            vec = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"the query vector must hold numbers; got {type(vec).__name__}") from None
        vec = vec.reshape(1, -1) if vec.ndim == 1 else vec
        if vec.shape != (1, self.dim):
            raise ConfigError(f"the query vector has shape {tuple(np.shape(vec))}; this index holds vectors of "
                              f"dimension {self.dim} ({self.info.get('vectors')} embeddings of d_model)")
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ConfigError("the query vector is zero or not finite; give a vector with a direction")
        # Scaled by its largest entry first, so that neither 1e-30 nor 1e30 under- or overflows the norm.
        vec = vec / np.abs(vec).max()
        return self._search((vec / np.linalg.norm(vec)).astype(np.float32), k)

    def _search(self, vec: np.ndarray, k: int) -> list[SimilarFeature]:
        sims, rows = self.index.search(vec, min(k, self.index.ntotal))
        out = []
        for sim, row in zip(sims[0], rows[0]):
            if row < 0:
                continue
            r = self.ids.iloc[row]
            out.append(SimilarFeature(int(r.layer), int(r.neuron), int(r.cluster), float(sim), int(r.ctx_id),
                                      int(r.pos), int(r["rank"])))
        return out


def describe_similar(run_dir: str, layer: int, neuron: int, cluster: int, k: int = 20,
                     include_self: bool = False) -> str:
    """The query's central example, then one line per similar feature: what `ne similar` prints."""
    run = RunDir(run_dir)
    index = SimilarFeatures.load(run)
    hits = index.query(layer, neuron, cluster, k, exclude_same_neuron=not include_self)
    own = index.ids.iloc[index.row_of(layer, neuron, cluster)]
    texts = _central_texts(run, [own] + hits)
    data = RunData(run.url)
    labels = [data.labels(int(h.layer), int(h.neuron)).get(int(h.cluster), "") for h in [own] + hits]
    width = max(len("label"), *map(len, labels))
    own_label = labels.pop(0)
    own_label = f" {own_label}" if own_label else ""
    lines = [
        f"query: layer {layer}, neuron {neuron}, cluster {cluster}{own_label}: {texts.pop(0)}",
        f"{'layer':>5} {'neuron':>6} {'cluster':>7} {'similarity':>10}  {'label':<{width}}  central example "
        "(key token in [[ ]])",
    ]
    for hit, label, text in zip(hits, labels, texts):
        lines.append(f"{hit.layer:>5} {hit.neuron:>6} {hit.cluster:>7} {hit.similarity:>10.4f}  {label:<{width}}  "
                     f"{text}")
    return "\n".join(lines)


def _central_texts(run, hits, before: int = 12, after: int = 4) -> list[str]:
    """The text around each hit's key token, decoded with the run's model tokenizer (token ids without one)."""
    import pyarrow.compute as pc

    from ne import schema
    from ne.models import load_token_decoder
    from ne.rundir.reader import RunData, key_token_snippet

    if not hits:
        return []
    table = run.read_parquet(schema.CONTEXTS_DIR, columns=["ctx_id", "tokens"],
                             filters=pc.field("ctx_id").isin([h.ctx_id for h in hits]))
    tokens = dict(zip(table.column("ctx_id").to_pylist(), table.column("tokens").to_pylist()))
    missing = sorted({h.ctx_id for h in hits} - set(tokens))
    if missing:
        raise DataError(f"{run.url}: contexts {missing[:5]} of the index are missing from contexts/; the run is "
                        "inconsistent: redo stage 'contexts' with `ne harvest --config CONFIG --force contexts`")
    model_cfg = RunData(run.url).config().model  # the model the run's stages ran with: a bad manifest is an error
    try:
        decode = load_token_decoder(model_cfg)
    except Exception as exc:  # the tokenizer is only needed for display: fall back to token ids
        logging.getLogger(__name__).warning("cannot load the run's tokenizer (%s); showing token ids", exc)
        decode = lambda ids: [f"<{i}>" for i in ids]  # noqa: E731
    return [key_token_snippet(tokens[h.ctx_id], h.pos, decode, before, after) for h in hits]
