"""Which feature fired here: the units that fire on a new text, each assigned to one of its feature clusters.

A unit fires at a token when its activation reaches `harvest.frac` × its maximum over the corpus (the rule
that made its dataset examples). The token's neuron embedding for that unit then goes to the nearest of the
unit's feature clusters: the highest cosine between the embedding and the cluster's vector, which is the
mean of its members' unit-length embeddings (`ASSIGN_RULE`, chosen by measurement: held-out examples of the
demo run join the cluster they would join if clustered together; `benchmarks/explain.py` prints it). Only
clusters of at least `cluster.min_cluster_size` examples are candidates: outliers are lone examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ne.checks import integer
from ne.compute.device import CPU_CHUNK_BYTES
from ne.compute.embed import neuron_embeddings, unit_rows
from ne.compute.harvest import SIGNS, thresholds_from_maxima
from ne.errors import ConfigError
from ne.models.base import MLPModel
from ne.rundir.maxima import signed_extremes
from ne.rundir.reader import RunData, key_token_snippet
from ne.rundir.stages import check_inputs, require_done
from ne.rundir.weights import read_layer_weights

AssignRule = Literal["mean", "central"]
ASSIGN_RULE: AssignRule = "mean"


def cluster_vectors(
    e_nd: Float[np.ndarray, "n d"], labels: Int[np.ndarray, " n"], central: Int[np.ndarray, " C"],
    rule: AssignRule = ASSIGN_RULE,
) -> Float[np.ndarray, "C d"]:
    """One unit-length vector per cluster: the mean of its members' unit embeddings, or its central example."""
    unit = unit_rows(e_nd)
    if rule == "central":
        return unit[central]
    one_hot = np.zeros((len(central), len(unit)), np.float32)
    one_hot[labels, np.arange(len(unit))] = 1.0
    return unit_rows(one_hot @ unit)


def batch_cluster_vectors(
    h_bnd: Float[Tensor, "b n d_model"], w_bpd: Float[Tensor, "b parts d_model"], labels: list[np.ndarray],
    max_bytes: int = CPU_CHUNK_BYTES,
) -> list[Float[np.ndarray, "C e"]]:
    """`cluster_vectors` (mean rule) of every neuron of a batch, as batched products over chunks of neurons
    whose embeddings fit in `max_bytes`."""
    b, n, d = h_bnd.shape
    per_neuron = n * w_bpd.shape[1] * d * 4
    step = max(1, max_bytes // max(per_neuron, 1))
    out: list[np.ndarray] = []
    for lo in range(0, b, step):
        chunk = labels[lo : lo + step]
        e = neuron_embeddings(h_bnd[lo : lo + step], w_bpd[lo : lo + step])
        unit = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        n_clusters = max((int(lab.max()) + 1 for lab in chunk if len(lab)), default=1)
        one_hot = torch.zeros(len(chunk), n_clusters, n)
        for i, lab in enumerate(chunk):
            one_hot[i, torch.from_numpy(lab.astype(np.int64)), torch.arange(len(lab))] = 1.0
        sums = torch.bmm(one_hot, unit)
        vectors = sums / torch.linalg.vector_norm(sums, dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        out += [vectors[i, : int(lab.max()) + 1].numpy() if len(lab) else vectors[i, :0].numpy()
                for i, lab in enumerate(chunk)]
    return out


def assign(e_md: Float[np.ndarray, "m d"], vectors_cd: Float[np.ndarray, "C d"]) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine similarity) of each embedding's nearest cluster vector."""
    sims = unit_rows(e_md) @ vectors_cd.T
    best = sims.argmax(axis=1)
    return best, sims[np.arange(len(best)), best]


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

    def __init__(self, data: RunData, model: MLPModel, frac: float, n_ctx: int, min_cluster_size: int = 1,
                 gated_embedding: str = "concat", direction: str = "max"):
        self.data, self.model, self.n_ctx, self.min_size = data, model, n_ctx, min_cluster_size
        self.gated_embedding, self.direction = gated_embedding, direction
        self.layers = data.layers()
        self.sign = SIGNS[direction]  # a `min` run's units fire by going low: compare sign × act throughout
        self.max_act = signed_extremes(data.run, self.layers, direction)
        self.thresholds = {layer: thresholds_from_maxima(torch.from_numpy(m), frac).numpy()
                           for layer, m in self.max_act.items()}
        self._centroids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.weights = {layer: read_layer_weights(data.run, layer) for layer in self.layers}
        self._texts: dict[tuple[int, int, int], str | None] = {}

    @classmethod
    def load(cls, run_dir: str, model: MLPModel | None = None) -> Explainer:
        """The run's explainer; `model` saves loading the run's model again (the viewer passes its own)."""
        from ne.models import load_units

        data = RunData(run_dir)
        data.pin()  # one version of the run throughout: a stage redone meanwhile is an error, never a mix
        m = data.manifest()
        require_done(data.run, "cluster", m)
        check_inputs(data.run, m, ("sae", "weights", "maxima"))  # the model runs again: it must be the same
        cfg = data.config(m)  # every setting as the stage that made what is read ran with it
        return cls(data, model or load_units(cfg), cfg.harvest.frac, cfg.data.n_ctx, cfg.cluster.min_cluster_size,
                   cfg.model.gated_embedding, cfg.harvest.direction)

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

    @torch.inference_mode()
    def _explain_context(self, tokens: list[int], first: int, offset: int, top: int) -> list[TokenUnits]:
        t = torch.tensor([tokens], dtype=torch.long)
        run = self.model.run(t.to(self.model.device), torch.ones_like(t).to(self.model.device), self.layers)
        acts = {layer: run[layer].act[0].float().cpu().numpy() for layer in self.layers}
        hs = {layer: run[layer].h[0].float().cpu().numpy() for layer in self.layers}
        pieces = self.model.decode_tokens(tokens)
        out = []
        for pos in range(first, len(tokens)):
            firing = []
            for layer in self.layers:
                act = self.sign * acts[layer][pos]
                for neuron in np.flatnonzero(act >= self.thresholds[layer]):
                    firing.append((float(act[neuron] / self.max_act[layer][neuron]), layer, int(neuron)))
            firing.sort(key=lambda f: (-f[0], f[1], f[2]))
            units = [self._unit(layer, neuron, float(acts[layer][pos, neuron]), of_max, hs[layer][pos])
                     for of_max, layer, neuron in firing[:top]]
            out.append(TokenUnits(offset + pos - first, pieces[pos], units))
        return out

    def _unit(self, layer: int, neuron: int, act: float, of_max: float, h_d: np.ndarray) -> FiringUnit:
        if (layer, neuron) not in self._centroids:  # a unit often fires at many tokens: read its clusters once
            self._centroids[layer, neuron] = self.data.centroids(layer, neuron)
        clusters, sizes, vectors = self._centroids[layer, neuron]
        if not len(clusters):
            return FiringUnit(layer, neuron, act, of_max, None, None, None, None)
        behaviours = sizes >= self.min_size  # outliers are lone examples, not behaviours to join
        if behaviours.any():
            clusters, sizes, vectors = clusters[behaviours], sizes[behaviours], vectors[behaviours]
        e_1e = self.weights[layer].embed(h_d[None], np.array([neuron]), self.gated_embedding)
        best, sim = assign(e_1e, vectors)
        cluster = int(clusters[best[0]])
        return FiringUnit(layer, neuron, act, of_max, cluster, float(sim[0]), int(sizes[best[0]]),
                          self.central_text(layer, neuron, cluster))

    def central_text(self, layer: int, neuron: int, cluster: int) -> str | None:
        key = (layer, neuron, cluster)
        if key not in self._texts:
            example = self.data.central_example(layer, neuron, cluster)
            self._texts[key] = None if example is None else key_token_snippet(
                example.tokens, example.pos, self.model.decode_tokens)
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
            where = (f"cluster {u.cluster} ({u.cluster_size} example{'s' * (u.cluster_size != 1)}, similarity "
                     f"{u.similarity:.2f}): "
                     f"{u.central_text}" if u.cluster is not None else "no clusters")
            lines.append(f"       L{u.layer} N{u.neuron:<6} {of_extreme(u, direction):>10}   {where}")
    return "\n".join(lines) if lines else "no unit reaches its threshold on this text"
