"""Similar features: by behaviour (the feature clusters that fire on the same held-out tokens, from the
co-activation stage) or by vector (the FAISS index of the clusters' central examples).

`SimilarFeatures.load(run).query(layer=, neuron=, cluster=, k=)` answers by behaviour where the run has a
co-activation table and the query feature fired in its held-out text, by vector otherwise; `by=` forces one, and
every hit says which answered (`SimilarFeature.by`). `query_vector` (a raw vector, new text) is the index's alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import pandas as pd

from ne import schema
from ne.checks import integer
from ne.coactivation import CoActivation
from ne.compute.embed import unit_rows
from ne.errors import ConfigError, DataError
from ne.rundir.reader import RunData, central_examples
from ne.rundir.stages import require_done, state_of, version
from ne.rundir.store import RunDir
from ne.rundir.weights import read_layer_weights

_REBUILD = "rebuild it with `ne index --config CONFIG --force index`"
By = Literal["auto", "behaviour", "vector"]


@dataclass
class SimilarFeature:
    """One feature cluster found by a query, identified by its central example."""

    layer: int
    neuron: int
    cluster: int
    similarity: float
    """The answer's score, higher is more similar: the pair's co-activation score (coactivation.score) when `by`
    is "behaviour", the cosine of its central example's vector to the query's when `by` is "vector"."""
    ctx_id: int
    pos: int
    """The central example: its context and key token."""
    rank: int
    """The central example's rank among the neuron's examples."""
    by: str = "vector"
    """Which answer found it: "behaviour" (it fires on the query's held-out tokens) or "vector" (the index)."""
    count: int | None = None
    """By behaviour: the held-out tokens where both fire."""


def _load_index(run: RunDir, manifest: dict) -> tuple[faiss.Index, pd.DataFrame, dict]:
    entry = require_done(run, "index", manifest)
    info = entry["info"]
    if schema.INDEX_IDS_FILE in entry["files"]:
        run.verify(schema.INDEX_IDS_FILE, entry["files"][schema.INDEX_IDS_FILE])
    data = run.read_bytes(schema.INDEX_FILE)
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise DataError(
            f"{run.path(schema.INDEX_FILE)} is not a readable FAISS index ({len(data)} bytes); {_REBUILD}"
        ) from exc
    ids = run.read_parquet(schema.INDEX_IDS_FILE).to_pandas().sort_values("row").reset_index(drop=True)
    if version(run.manifest(), "index") != version(manifest, "index"):
        raise DataError(
            f"stage 'index' of {run.url} was redone while it was read; read it again once `ne index` has finished"
        )
    if index.ntotal != len(ids) or index.d != info["d"] or not np.array_equal(ids.row, np.arange(len(ids))):
        raise DataError(
            f"{run.path(schema.INDEX_FILE)} holds {index.ntotal} vectors of dimension {index.d} but ids.parquet "
            f"has {len(ids)} rows and the manifest says d={info['d']}; {_REBUILD}"
        )
    return index, ids, info


class SimilarFeatures:
    """A run's similar-features answers: its co-activation table and its index, either of which may be absent;
    `load` it once, query it many times."""

    def __init__(
        self, index: faiss.Index | None, ids: pd.DataFrame, info: dict, coactivation: CoActivation | None = None
    ):
        self.index, self.ids, self.info, self.coactivation = index, ids, info, coactivation
        self.no_index = "this run has no similar-features index; run `ne index --config CONFIG`"
        """Why there is no index to answer by vector (the index stage's state, when `load` found it not done)."""
        self.d_mlp = {int(k): v for k, v in info["d_mlp"].items()}
        self._row = pd.Series(ids.index.to_numpy(), index=pd.MultiIndex.from_frame(ids[["layer", "neuron", "cluster"]]))
        self._clusters = ids.groupby(["layer", "neuron"]).size()
        if index is not None and "nprobe" in info:
            faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
            faiss.extract_index_ivf(index).make_direct_map()

    @classmethod
    def load(cls, run_dir: str | RunDir) -> SimilarFeatures:
        """The run's co-activation table (when its stage is done) and its index (when that is): at least one."""
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        manifest = run.require_manifest()
        coactivation = CoActivation(run) if state_of(manifest, "coactivation")[0] == "done" else None
        if coactivation is None or state_of(manifest, "index")[0] == "done":
            return cls(*_load_index(run, manifest), coactivation)
        layers = manifest["stages"]["occurrence"]["info"]["layers"]
        ids = pd.concat(
            [central_examples(run, layer).drop_columns(["h_id"]).to_pandas().assign(layer=layer) for layer in layers],
            ignore_index=True,
        )
        d_mlp = {str(layer): read_layer_weights(run, layer, 0, 0).d_mlp for layer in layers}
        answers = cls(None, ids, {"d_mlp": d_mlp}, coactivation)
        try:
            require_done(run, "index", manifest)
        except DataError as exc:  # running, stale or missing: say which, should a vector answer be asked for
            answers.no_index = str(exc)
        return answers

    @property
    def dim(self) -> int:
        return self.index.d if self.index is not None else 0

    def _check_k(self, k: int) -> int:
        if integer("k", k) <= 0:
            raise ConfigError(f"k is {k!r}; ask for at least one similar feature, for example k=20")
        return int(k)

    def row_of(self, layer: int, neuron: int, cluster: int) -> int:
        """The index row of a feature cluster; an error naming the valid range when it does not exist."""
        layer, neuron, cluster = integer("layer", layer), integer("neuron", neuron), integer("cluster", cluster)
        if layer not in self.d_mlp:
            raise ConfigError(f"layer {layer} is not in this run; it has layers {sorted(self.d_mlp)}")
        if not 0 <= neuron < self.d_mlp[layer]:
            raise ConfigError(f"neuron {neuron} is out of range; layer {layer} has neurons 0..{self.d_mlp[layer] - 1}")
        n_clusters = int(self._clusters.get((layer, neuron), 0))
        if n_clusters == 0:
            raise ConfigError(f"neuron {neuron} of layer {layer} has no examples, hence no clusters; pick another")
        if not 0 <= cluster < n_clusters:
            raise ConfigError(
                f"cluster {cluster} is out of range; neuron {neuron} of layer {layer} has clusters 0..{n_clusters - 1}"
            )
        return int(self._row[(layer, neuron, cluster)])

    def query(
        self,
        layer: int,
        neuron: int,
        cluster: int,
        k: int = 20,
        exclude_same_neuron: bool = True,
        by: By = "auto",
    ) -> list[SimilarFeature]:
        """The k feature clusters most similar to (layer, neuron, cluster), each with its score.

        `by`: "behaviour", the features that fire on the same held-out tokens, best co-activation score first;
        "vector", the nearest in the index; "auto" (the default), by behaviour where the run has co-activation,
        then by vector for the rest of the k when the query fires with fewer features (each hit's `by` says
        which). With `exclude_same_neuron` (the default) the query neuron's own clusters are left out."""
        k = self._check_k(k)
        self.row_of(layer, neuron, cluster)
        if by not in ("auto", "behaviour", "vector"):
            raise ConfigError(f"by is {by!r}; choose 'auto', 'behaviour' or 'vector'")
        hits: list[SimilarFeature] = []
        if by != "vector" and (self.coactivation is not None or by == "behaviour"):
            hits = self._by_behaviour(layer, neuron, cluster, k, exclude_same_neuron)
            if len(hits) == k or by == "behaviour" or self.index is None:
                return hits
        seen = {(h.layer, h.neuron, h.cluster) for h in hits}
        more = self._by_vector(layer, neuron, cluster, k + len(hits), exclude_same_neuron)
        return hits + [h for h in more if (h.layer, h.neuron, h.cluster) not in seen][: k - len(hits)]

    def _by_vector(
        self, layer: int, neuron: int, cluster: int, k: int, exclude_same_neuron: bool
    ) -> list[SimilarFeature]:
        row = self.row_of(layer, neuron, cluster)
        if self.index is None:
            raise DataError(f"no answer by vector: {self.no_index}")
        vec = np.asarray(self.index.reconstruct(row))[None]
        skip = int(self._clusters[(layer, neuron)]) if exclude_same_neuron else 0
        hits = self._search(vec, k + skip)
        if exclude_same_neuron:
            hits = [h for h in hits if (h.layer, h.neuron) != (layer, neuron)]
        return hits[:k]

    def _by_behaviour(
        self, layer: int, neuron: int, cluster: int, k: int, exclude_same_neuron: bool
    ) -> list[SimilarFeature]:
        if self.coactivation is None:
            raise DataError(
                "this run has no co-activation table, so it cannot answer by behaviour; run "
                "`ne occurrence --config CONFIG`"
            )
        out = []
        for p in self.coactivation.partners(layer, neuron, cluster, k, exclude_same_neuron):
            r = self.ids.iloc[self._row[(p.layer, p.neuron, p.cluster)]]
            out.append(
                SimilarFeature(
                    p.layer,
                    p.neuron,
                    p.cluster,
                    p.score,
                    int(r.ctx_id),
                    int(r.pos),
                    int(r["rank"]),
                    "behaviour",
                    p.count,
                )
            )
        return out

    def query_vector(self, vec, k: int = 20) -> list[SimilarFeature]:
        """The k feature clusters most similar to a vector in the indexed space: only its direction counts."""
        k = self._check_k(k)
        if self.index is None:
            raise DataError(f"no search by vector: {self.no_index}")
        try:
            vec = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"the query vector must hold numbers; got {type(vec).__name__}") from None
        vec = vec.reshape(1, -1) if vec.ndim == 1 else vec
        if vec.shape != (1, self.dim):
            raise ConfigError(
                f"the query vector has shape {tuple(np.shape(vec))}; this index holds vectors of "
                f"dimension {self.dim} ({self.info.get('vectors')} embeddings of d_model)"
            )
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ConfigError("the query vector is zero or not finite; give a vector with a direction")
        # Scaled by its largest entry first, so that neither 1e-30 nor 1e30 under- or overflows the norm.
        vec = vec / np.abs(vec).max()
        return self._search(unit_rows(vec).astype(np.float32), k)

    def _search(self, vec: np.ndarray, k: int) -> list[SimilarFeature]:
        assert self.index is not None, "callers check that the run has an index"
        sims, rows = self.index.search(vec, min(k, self.index.ntotal))
        out = []
        for sim, row in zip(sims[0], rows[0]):
            if row < 0:
                continue
            r = self.ids.iloc[row]
            out.append(
                SimilarFeature(
                    int(r.layer), int(r.neuron), int(r.cluster), float(sim), int(r.ctx_id), int(r.pos), int(r["rank"])
                )
            )
        return out


def describe_similar(
    run_dir: str, layer: int, neuron: int, cluster: int, k: int = 20, include_self: bool = False, by: By = "auto"
) -> str:
    """The query's central example, which answer was given, then one line per similar feature: what `ne similar`
    prints."""
    run = RunDir(run_dir)
    index = SimilarFeatures.load(run)
    hits = index.query(layer, neuron, cluster, k, exclude_same_neuron=not include_self, by=by)
    own = index.ids.iloc[index.row_of(layer, neuron, cluster)]
    texts = _central_texts(run, [own] + hits)
    data = RunData(run.url)
    labels = [data.labels(int(h.layer), int(h.neuron)).get(int(h.cluster), "") for h in [own] + hits]
    width = max(len("label"), *map(len, labels))
    own_label = labels.pop(0)
    own_label = f" {own_label}" if own_label else ""
    lines = [f"query: layer {layer}, neuron {neuron}, cluster {cluster}{own_label}: {texts.pop(0)}"]
    co = index.coactivation
    n_behaviour = sum(h.by == "behaviour" for h in hits)
    if n_behaviour and co is not None:  # behavioural hits come from a co-activation table
        stats = co.stats(layer, neuron, cluster) or {}
        then = (
            f", then the nearest by vector for the last {len(hits) - n_behaviour} (it fires with no more features)"
            if n_behaviour < len(hits)
            else ""
        )
        lines.append(
            f"answered by behaviour: the features that fire on the same held-out tokens (it fires on "
            f"{stats.get('occurrences', 0)} of {co.n_tokens}; score: {co.score}){then}"
        )
        lines.append(
            f"{'layer':>5} {'neuron':>6} {'cluster':>7} {'score':>10} {'together':>8} {'by':>9}  "
            f"{'label':<{width}}  central example (key token in [[ ]])"
        )
        lines += [
            f"{h.layer:>5} {h.neuron:>6} {h.cluster:>7} {h.similarity:>10.4g} "
            f"{h.count if h.count is not None else '-':>8} {h.by:>9}  {label:<{width}}  {text}"
            for h, label, text in zip(hits, labels, texts)
        ]
        return "\n".join(lines)
    if co is None:
        why = "this run has no co-activation table (`ne occurrence`)"
    elif by == "vector":
        why = "asked for"
    else:
        why = "this feature never fires together with another in the held-out text"
    lines.append(f"answered by vector: the nearest in the index, by {index.info.get('vectors')} vectors ({why})")
    lines.append(
        f"{'layer':>5} {'neuron':>6} {'cluster':>7} {'similarity':>10}  {'label':<{width}}  central example "
        "(key token in [[ ]])"
    )
    lines += [
        f"{h.layer:>5} {h.neuron:>6} {h.cluster:>7} {h.similarity:>10.4f}  {label:<{width}}  {text}"
        for h, label, text in zip(hits, labels, texts)
    ]
    return "\n".join(lines)


def _central_texts(run, hits, before: int = 12, after: int = 4) -> list[str]:
    """The text around each hit's key token, decoded with the run's model tokenizer (token ids without one)."""
    import pyarrow.compute as pc

    from ne import schema
    from ne.models import load_token_decoder
    from ne.rundir.reader import RunData, key_token_snippet

    if not hits:
        return []
    table = run.read_parquet(
        schema.CONTEXTS_DIR, columns=["ctx_id", "tokens"], filters=pc.field("ctx_id").isin([h.ctx_id for h in hits])
    )
    tokens = dict(zip(table.column("ctx_id").to_pylist(), table.column("tokens").to_pylist()))
    missing = sorted({h.ctx_id for h in hits} - set(tokens))
    if missing:
        raise DataError(
            f"{run.url}: contexts {missing[:5]} of the index are missing from contexts/; the run is "
            "inconsistent: redo stage 'contexts' with `ne harvest --config CONFIG --force contexts`"
        )
    model_cfg = RunData(run.url).config().model  # the model the run's stages ran with: a bad manifest is an error
    try:
        decode = load_token_decoder(model_cfg)
    except Exception as exc:  # the tokenizer is only needed for display: fall back to token ids
        logging.getLogger(__name__).warning("cannot load the run's tokenizer (%s); showing token ids", exc)
        decode = lambda ids: [f"<{i}>" for i in ids]  # noqa: E731
    return [key_token_snippet(tokens[h.ctx_id], h.pos, decode, before, after) for h in hits]
