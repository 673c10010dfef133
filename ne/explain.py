"""Which feature fired here: the units that fire on a new text, each assigned to one of its feature clusters.

A unit fires at a token when its activation reaches `harvest.frac` × its maximum over the corpus (the rule
that made its dataset examples; the occurrence stage uses `occurrence.frac`). The token's neuron embedding for
that unit then goes to the nearest of the unit's feature clusters: the highest cosine between the embedding and
the cluster's vector, which is the mean of its members' unit-length embeddings (`ASSIGN_RULE`, chosen by
measurement: held-out examples of the demo run join the cluster they would join if clustered together;
`benchmarks/explain.py` prints it). Only clusters of at least `cluster.min_cluster_size` examples are candidates:
outliers are lone examples. `Explainer.firings` is the one implementation of both rules: `ne explain` and the
occurrence stage (ne/occurrence.py) call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from threadpoolctl import threadpool_limits
from torch import Tensor

from ne import schema
from ne.checks import integer
from ne.compute.device import CPU_CHUNK_BYTES
from ne.compute.embed import LayerWeights, cluster_means, neuron_embeddings, unit_rows
from ne.compute.harvest import SIGNS, thresholds_from_maxima
from ne.errors import ConfigError, DataError
from ne.models.base import UnitModel
from ne.rundir.maxima import signed_extremes
from ne.rundir.reader import RunData, key_token_snippet
from ne.rundir.stages import check_inputs, require_done
from ne.rundir.store import RunDir
from ne.rundir.weights import read_layer_weights

AssignRule = Literal["mean", "central"]
ASSIGN_RULE: AssignRule = "mean"


def cluster_vectors(
    e_nd: Float[np.ndarray, "n d"],
    labels: Int[np.ndarray, " n"],
    central: Int[np.ndarray, " C"],
    rule: AssignRule = ASSIGN_RULE,
) -> Float[np.ndarray, "C d"]:
    """One unit-length vector per cluster: the mean of its members' unit embeddings, or its central example."""
    unit = unit_rows(e_nd)
    if rule == "central":
        return unit[central]
    return cluster_means(torch.from_numpy(unit)[None], [labels])[0]


def batch_cluster_vectors(
    h_bnd: Float[Tensor, "b n d_model"],
    w_bpd: Float[Tensor, "b parts d_model"],
    labels: list[np.ndarray],
    max_bytes: int = CPU_CHUNK_BYTES,
) -> list[Float[np.ndarray, "C e"]]:
    """`cluster_vectors` (mean rule) of every neuron of a batch, as batched products over chunks of neurons
    whose embeddings fit in `max_bytes`."""
    b, n, d = h_bnd.shape
    per_neuron = n * w_bpd.shape[1] * d * 4
    step = max(1, max_bytes // max(per_neuron, 1))
    out: list[np.ndarray] = []
    for lo in range(0, b, step):
        e = neuron_embeddings(h_bnd[lo : lo + step], w_bpd[lo : lo + step])
        out += cluster_means(unit_rows(e), labels[lo : lo + step])
    return out


def assign(e_md: Float[np.ndarray, "m d"], vectors_cd: Float[np.ndarray, "C d"]) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine similarity) of each embedding's nearest cluster vector (all rows share the candidates)."""
    return _nearest(unit_rows(e_md) @ np.asarray(vectors_cd, np.float32).T)


def _nearest(sims_mc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule: each row joins its candidate of highest cosine, the first of equals."""
    best = sims_mc.argmax(axis=1)
    return best, sims_mc[np.arange(len(best)), best]


@dataclass(frozen=True)
class LayerClusters:
    """The feature clusters each unit of one layer may join: those of at least `cluster.min_cluster_size` examples,
    or all of a unit's clusters when none is that large (outliers are lone examples, not behaviours to join).

    The cosine of a neuron embedding e = [h ⊙ w_p]_p with a cluster vector v = [v_p]_p is h·Σ_p(w_p ⊙ v_p) / ‖e‖
    and ‖e‖² = h²·Σ_p w_p²: kept as `u` and `w2`, a firing's cosines are one product with its h, never an
    embedding built and normalised per firing, and a gated `concat` embedding costs what a plain one does."""

    layer: int
    start: Int[np.ndarray, " units_plus_1"]
    """Unit j's candidates are rows start[j]..start[j+1]-1."""
    cluster: Int[np.ndarray, " C"]
    size: Int[np.ndarray, " C"]
    u: Float[np.ndarray, "C d_model"]
    """Σ_p w_p ⊙ v_p of each candidate, v its stored vector (the mean of its members' unit neuron embeddings)."""
    w2: Float[np.ndarray, "units d_model"]
    """Σ_p w_p² of each unit."""

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.w2.nbytes + self.cluster.nbytes + self.size.nbytes + self.start.nbytes

    def of(self, neuron: int) -> slice:
        return slice(int(self.start[neuron]), int(self.start[neuron + 1]))


def read_layer_clusters(
    run: RunDir, layer: int, weights: LayerWeights, min_size: int, gated_embedding: str, rows_per_step: int = 4096
) -> LayerClusters:
    """Every unit's candidate clusters of one layer, from centroids/ (one read of the layer) and its weights."""
    n_units = weights.d_mlp
    table = run.read_parquet(
        schema.layer_dir(schema.CENTROIDS_DIR, layer), columns=["neuron", "cluster", "size", "vector"]
    )
    table = table.sort_by([("neuron", "ascending"), ("cluster", "ascending")])
    neuron, size = table.column("neuron").to_numpy().astype(np.int64), table.column("size").to_numpy()
    large = size >= min_size
    has_large = np.zeros(n_units, bool)
    has_large[neuron[large]] = True
    keep = np.flatnonzero(large | ~has_large[neuron])
    vector = table.column("vector").combine_chunks()
    width = len(vector[0]) if len(vector) else 0
    flat = vector.flatten().to_numpy(zero_copy_only=False)
    w_all = weights.unit_weights(np.arange(n_units), gated_embedding)  # [units, parts, d]
    parts, d = w_all.shape[1], w_all.shape[2]
    if len(keep) and width != parts * d:
        raise DataError(
            f"{run.url}: centroids of layer {layer} have {width} dimensions but model.gated_embedding "
            f"{gated_embedding!r} embeds in {parts * d}; redo the cluster stage with this config"
        )
    u = np.empty((len(keep), d), np.float32)
    for lo in range(0, len(keep), rows_per_step):
        rows = keep[lo : lo + rows_per_step]
        v = flat.reshape(-1, max(width, 1))[rows].astype(np.float32).reshape(len(rows), parts, d)
        u[lo : lo + len(rows)] = (w_all[neuron[rows]] * v).sum(axis=1)
    return LayerClusters(
        layer,
        np.searchsorted(neuron[keep], np.arange(n_units + 1)),
        table.column("cluster").to_numpy()[keep].astype(np.int32),
        size[keep].astype(np.int32),
        u,
        np.square(w_all).sum(axis=1),
    )


def assign_firings(
    clusters: LayerClusters,
    neurons_m: Int[np.ndarray, " m"],
    h_td: Float[np.ndarray, "t d"],
    token_m: Int[np.ndarray, " m"] | None = None,
) -> tuple[Int[np.ndarray, " m"], Float[np.ndarray, " m"]]:
    """(cluster, cosine similarity) of each firing, unit `neurons_m[i]` at a token whose pre-MLP embedding is
    `h_td[token_m[i]]` (`h_td[i]` without `token_m`): its neuron embedding joins the nearest of the unit's
    candidate clusters (cluster -1 and NaN for a unit with none). The one rule of `ne explain` and the occurrence
    stage; one product per unit that fires."""
    neurons_m = np.asarray(neurons_m, np.int64)
    token_m = np.arange(len(neurons_m)) if token_m is None else np.asarray(token_m)
    cluster, sim = np.full(len(neurons_m), -1, np.int32), np.full(len(neurons_m), np.nan, np.float32)
    order = np.argsort(neurons_m, kind="stable")
    units = neurons_m[order]
    h_md = np.ascontiguousarray(h_td[token_m[order]], np.float32)  # one gather; each unit's rows are then a slice
    bounds = np.r_[np.flatnonzero(np.r_[True, units[1:] != units[:-1]]), len(units)] if len(units) else [0]
    tiny = np.finfo(np.float32).tiny
    with threadpool_limits(1, user_api="blas"):  # small products: BLAS threads cost more than they save (8x here)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            unit = int(units[lo])
            rows = clusters.of(unit)
            if rows.start == rows.stop:
                continue
            h = h_md[lo:hi]
            norm = np.maximum(np.sqrt((h * h) @ clusters.w2[unit]), tiny)
            best, s = _nearest((h @ clusters.u[rows].T) / norm[:, None])
            cluster[order[lo:hi]], sim[order[lo:hi]] = clusters.cluster[rows][best], s
    return cluster, sim


def firing(
    act_bpn: Float[Tensor, "b pos n"],
    thresholds_n: Float[Tensor, " n"],
    sign: float,
    lengths: Sequence[int],
    first: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(context, position, unit, activation) where a unit fires: sign × act (float32) reaches its threshold
    (`thresholds_from_maxima`; inf never fires), at positions first..lengths[i]-1 of context i (never BOS, never
    padding). On a GPU where the activations are; on a CPU in numpy, whose one-thread scan is 10× faster here
    than torch's threads on a busy machine."""
    act = act_bpn.float()
    if act.device.type == "cpu":
        a, thr = act.numpy(), thresholds_n.cpu().numpy()
        flat = np.flatnonzero(a >= thr if sign > 0 else a <= -thr)  # -act >= thr, without negating a copy
        row, rest = np.divmod(flat, a.shape[1] * a.shape[2])
        pos, unit = np.divmod(rest, a.shape[2])
        keep = (pos >= first) & (pos < np.asarray(lengths)[row])
        return row[keep], pos[keep], unit[keep], a.reshape(-1)[flat[keep]]
    thr_t = thresholds_n.to(act.device)
    row_t, pos_t, unit_t = (act >= thr_t if sign > 0 else act <= -thr_t).nonzero(as_tuple=True)
    keep_t = (pos_t >= first) & (pos_t < torch.as_tensor(lengths, device=act.device)[row_t])
    row_t, pos_t, unit_t = row_t[keep_t], pos_t[keep_t], unit_t[keep_t]
    values = act[row_t, pos_t, unit_t]
    return row_t.cpu().numpy(), pos_t.cpu().numpy(), unit_t.cpu().numpy(), values.cpu().numpy()


@dataclass
class FiringUnit:
    """One unit firing at one token, and the feature cluster its embedding joins."""

    layer: int
    neuron: int
    act: float
    """Its activation at the token."""
    of_max: float
    """act / the unit's maximum over the corpus (its minimum in a `harvest.direction: min` run)."""
    cluster: int | None
    """The nearest of the unit's feature clusters; None when the run has no clusters for it."""
    similarity: float | None
    """Cosine between the token's embedding and that cluster's vector."""
    cluster_size: int | None
    central_text: str | None
    """The cluster's central example, key token in [[ ]]."""
    label: str | None = None
    """The cluster's offline label (`ne.compute.label`); None before the label stage ran."""
    scores: dict[str, float | None] | None = None
    """The cluster's scores on held-out text (`RunData.cluster_scores`); None before they ran."""


@dataclass
class TokenUnits:
    """One token of the text and the units firing there, strongest (of_max) first."""

    pos: int
    token: str
    units: list[FiringUnit]


class Explainer:
    """A finished run's model, thresholds and feature clusters, ready to explain new texts.

    `Explainer.load(run_dir).explain(text)` gives one `TokenUnits` per token of the text.
    """

    def __init__(
        self,
        data: RunData,
        model: UnitModel,
        frac: float,
        n_ctx: int,
        min_cluster_size: int = 1,
        gated_embedding: str = "concat",
        direction: str = "max",
        layers: Sequence[int] | None = None,
    ):
        self.data, self.model, self.n_ctx, self.min_size = data, model, n_ctx, min_cluster_size
        self.gated_embedding, self.direction = gated_embedding, direction
        self.layers = data.layers() if layers is None else list(layers)
        self.sign = SIGNS[direction]  # a `min` run's units fire by going low: compare sign × act throughout
        self.max_act = signed_extremes(data.run, self.layers, direction)
        self.thresholds = {
            layer: thresholds_from_maxima(torch.from_numpy(m), frac).to(model.device)
            for layer, m in self.max_act.items()
        }
        self.weights = {layer: read_layer_weights(data.run, layer) for layer in self.layers}
        self._clusters: dict[int, LayerClusters] = {}
        self._texts: dict[tuple[int, int, int], str | None] = {}
        self._labels: dict[tuple[int, int], dict[int, str]] = {}
        self._scores: dict[tuple[int, int], dict[int, dict[str, float | None]]] = {}

    @classmethod
    def load(
        cls,
        run_dir: str,
        model: UnitModel | None = None,
        frac: float | None = None,
        layers: Sequence[int] | None = None,
    ) -> Explainer:
        """The run's explainer; `model` saves loading the run's model again (the viewer passes its own); `frac`
        replaces harvest.frac as the firing threshold (the occurrence stage's occurrence.frac); `layers` keeps
        some of the run's layers (default all)."""
        from ne.models import load_units

        data = RunData(run_dir)
        data.pin()  # one version of the run throughout: a stage redone meanwhile is an error, never a mix
        m = data.manifest()
        require_done(data.run, "cluster", m)
        check_inputs(data.run, m, ("sae", "weights", "maxima"))  # the model runs again: it must be the same
        cfg = data.config(m)  # every setting as the stage that made what is read ran with it
        return cls(
            data,
            model or load_units(cfg),
            cfg.harvest.frac if frac is None else frac,
            cfg.data.n_ctx,
            cfg.cluster.min_cluster_size,
            cfg.model.gated_embedding,
            cfg.harvest.direction,
            layers,
        )

    def clusters(self, layer: int) -> LayerClusters:
        """The layer's candidate clusters, read on first use."""
        if layer not in self._clusters:
            self._clusters[layer] = read_layer_clusters(
                self.data.run, layer, self.weights[layer], self.min_size, self.gated_embedding
            )
        return self._clusters[layer]

    def explain(self, text: str, top: int = 10) -> list[TokenUnits]:
        """The units firing at each token of `text`; a text longer than the run's contexts is explained in
        consecutive chunks of that length, each with its own BOS, as the harvest cut its corpus."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("the text to explain is empty; give some text, e.g. --text 'def f(x): return x'")
        ids = self.model.encode(text)
        if not ids:
            raise ConfigError(f"the text {text[:40]!r} has no tokens for {self.model.name}; give some words")
        return self.explain_tokens(ids, top)

    def explain_tokens(self, ids: Sequence[int], top: int = 10) -> list[TokenUnits]:
        """As `explain`, for token ids without BOS."""
        if integer("top", top) < 1:
            raise ConfigError(f"--top is {top}; ask for at least one unit per token, e.g. --top 10")
        vocab = self.model.d_vocab
        ids = [integer(f"ids[{i}]", t, 0, vocab, f"a token id of {self.model.name}") for i, t in enumerate(ids)]
        bos = [] if self.model.bos_token_id is None else [self.model.bos_token_id]
        step = self.n_ctx - len(bos)
        out: list[TokenUnits] = []
        for start in range(0, len(ids), step):
            chunk = list(ids[start : start + step])
            out += self._explain_context(bos + chunk, len(bos), start, top)
        self.data.check_unchanged()  # everything above came from the version pinned at load
        return out

    def fire(
        self, layer: int, act_bpn: Tensor, lengths: Sequence[int], first: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(context, position, unit, activation) of every unit of the layer firing in a batch of contexts, in that
        order, from its activations [b, pos, units] (`firing` with the layer's thresholds)."""
        return firing(act_bpn, self.thresholds[layer], self.sign, lengths, first)

    def assign(
        self, layer: int, unit_m: np.ndarray, h_td: np.ndarray, token_m: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cluster, similarity) of firings of the layer: `assign_firings` with the layer's candidate clusters."""
        return assign_firings(self.clusters(layer), unit_m, h_td, token_m)

    def firings(
        self, layer: int, act_bpn: Tensor, h_bpd: Tensor, lengths: Sequence[int], first: int = 0
    ) -> tuple[np.ndarray, ...]:
        """(context, position, unit, activation, cluster, similarity) of every unit firing in a batch of contexts:
        `fire`, then `assign`. What `ne explain` shows and the occurrence stage records (it calls the two in turn,
        holding many batches' firings before it assigns them)."""
        row, pos, unit, act = self.fire(layer, act_bpn, lengths, first)
        cluster, sim = self.assign(layer, unit, h_bpd[row, pos].float().cpu().numpy())
        return row, pos, unit, act, cluster, sim

    @torch.inference_mode()
    def _explain_context(self, tokens: list[int], first: int, offset: int, top: int) -> list[TokenUnits]:
        t = torch.tensor([tokens], dtype=torch.long)
        run = self.model.run(t.to(self.model.device), torch.ones_like(t).to(self.model.device), self.layers)
        pieces = self.model.decode_tokens(tokens)
        by_pos: dict[int, list[tuple[float, int, int, float, int, float]]] = {}
        for layer in self.layers:
            _, pos, unit, act, cluster, sim = self.firings(layer, run[layer].act, run[layer].h, [len(tokens)], first)
            of_max = self.sign * act / self.max_act[layer][unit]
            for p, u, c, s, f, a in zip(
                pos.tolist(), unit.tolist(), cluster.tolist(), sim.tolist(), of_max.tolist(), act.tolist()
            ):
                by_pos.setdefault(p, []).append((f, layer, u, a, c, s))
        out = []
        for p in range(first, len(tokens)):
            firing_here = sorted(by_pos.get(p, []), key=lambda f: (-f[0], f[1], f[2]))
            units = [
                self._unit(layer, neuron, act, of_max, cluster, sim)
                for of_max, layer, neuron, act, cluster, sim in firing_here[:top]
            ]
            out.append(TokenUnits(offset + p - first, pieces[p], units))
        return out

    def _unit(self, layer: int, neuron: int, act: float, of_max: float, cluster: int, sim: float) -> FiringUnit:
        if cluster < 0:
            return FiringUnit(layer, neuron, act, of_max, None, None, None, None)
        clusters = self.clusters(layer)
        rows = clusters.of(neuron)
        size = int(clusters.size[rows][clusters.cluster[rows] == cluster][0])
        return FiringUnit(
            layer,
            neuron,
            act,
            of_max,
            cluster,
            sim,
            size,
            self.central_text(layer, neuron, cluster),
            self.label(layer, neuron, cluster),
            self.scores(layer, neuron, cluster),
        )

    def label(self, layer: int, neuron: int, cluster: int) -> str | None:
        if (layer, neuron) not in self._labels:
            self._labels[layer, neuron] = self.data.labels(layer, neuron)
        return self._labels[layer, neuron].get(cluster)

    def scores(self, layer: int, neuron: int, cluster: int) -> dict[str, float | None] | None:
        if (layer, neuron) not in self._scores:
            self._scores[layer, neuron] = self.data.cluster_scores(layer, neuron)
        return self._scores[layer, neuron].get(cluster)

    def central_text(self, layer: int, neuron: int, cluster: int) -> str | None:
        key = (layer, neuron, cluster)
        if key not in self._texts:
            example = self.data.central_example(layer, neuron, cluster)
            self._texts[key] = (
                None if example is None else key_token_snippet(example.tokens, example.pos, self.model.decode_tokens)
            )
        return self._texts[key]


def to_records(tokens: list[TokenUnits]) -> list[dict]:
    """Plain dicts (for JSON): one per token, with its firing units."""
    return [dataclasses.asdict(t) for t in tokens]


def of_extreme(unit: FiringUnit, direction: str = "max") -> str:
    """A unit's activation as a multiple of its extreme: "0.83× max", or "0.83× min" in a `direction: min` run."""
    return f"{unit.of_max:.2f}× {direction}"


def describe(tokens: list[TokenUnits], direction: str = "max") -> str:
    """What `ne explain` prints: each token with firing units, and their feature clusters (`direction`: the
    run's `harvest.direction`, which says whether activations are shown as a multiple of a max or a min)."""
    lines = []
    for t in tokens:
        if not t.units:
            continue
        lines.append(f"{t.pos:>4} {t.token.strip() or repr(t.token)}")
        for u in t.units:
            where = (
                f"cluster {u.cluster}{f' {u.label}' if u.label else ''} ({u.cluster_size} "
                f"example{'s' * (u.cluster_size != 1)}, similarity {u.similarity:.2f}): "
                f"{u.central_text}"
                if u.cluster is not None
                else "no clusters"
            )
            lines.append(f"       L{u.layer} N{u.neuron:<6} {of_extreme(u, direction):>10}   {where}")
    return "\n".join(lines) if lines else "no unit reaches its threshold on this text"
