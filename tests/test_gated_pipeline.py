"""A gated model through every stage after the harvest (clusters, metrics, index), and the settings that bound
each stage's memory (h slices in the cluster stage, output parts in the harvest's merge) changing nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score

import jobs.cluster as cluster_job
import jobs.harvest as harvest_job
from index.build import run_index
from index.query import SimilarFeatures
from ne import schema
from ne.config import ModelConfig
from ne.errors import ConfigError
from ne.rundir.store import RunDir
from tests.jobs.test_cluster import _assert_same, _cfg, _outputs
from tests.jobs.test_harvest import assert_same_rows, make_cfg, naive_harvest, read_examples
from tests.planted import write_synthetic_run


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.conftest import write_gated_hf

    return write_gated_hf(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pydoc_data.topics

    folder = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, key in enumerate(sorted(pydoc_data.topics.topics)[:6]):
        (folder / f"doc{i}.txt").write_text(pydoc_data.topics.topics[key])
        paths.append(str(folder / f"doc{i}.txt"))
    return paths


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, llama_dir, corpus):
    cfg = make_cfg(
        tmp_path_factory.mktemp("gated") / "run",
        ModelConfig(backend="hf", name=str(llama_dir), device="cpu"),
        corpus,
        num_workers=0,
        k=8,
    )
    cfg.cluster.neurons_per_task = 64
    cfg.cluster.cut = "fixed"  # the reference below cuts every neuron at cluster.threshold
    cfg.index.vectors = "neuron"  # the index of neuron embeddings is what holds the concat embedding
    harvest_job.run_harvest(cfg)
    return cfg


def test_gated_clusters_and_index_use_the_concat_embedding(gated_run, llama_dir):
    """Clusters equal scipy's on [h ⊙ g ; h ⊙ u] built from the Hugging Face modules' own weights; the index
    holds 2 × d_model-wide vectors and answers queries."""
    from transformers import AutoModelForCausalLM

    summary = cluster_job.run_cluster(gated_run, in_process=True)
    run = RunDir(gated_run.run_dir)
    assert summary.with_examples > 0
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    layer = 1
    block = hf.model.layers[layer]
    norm = block.post_attention_layernorm.weight.detach()
    g = (block.mlp.gate_proj.weight.detach() * norm).numpy().astype(np.float64)  # rows: neurons
    u = (block.mlp.up_proj.weight.detach() * norm).numpy().astype(np.float64)
    examples = run.read_parquet(schema.layer_dir(schema.EXAMPLES_DIR, layer)).to_pandas()
    h_rows = run.read_parquet(schema.layer_dir(schema.H_DIR, layer)).to_pandas().set_index("h_id")
    clusters = run.read_parquet(schema.layer_dir(schema.CLUSTERS_DIR, layer)).to_pandas()
    checked = 0
    for neuron, ex in examples.groupby("neuron"):
        if len(ex) < 4:
            continue
        h = np.stack(h_rows.loc[ex.sort_values("rank").h_id, "h"].to_numpy()).astype(np.float64)
        e = np.concatenate([h * g[neuron], h * u[neuron]], axis=1)
        ref = fcluster(linkage(pdist(e, "cosine"), "average"), t=gated_run.cluster.threshold, criterion="distance")
        got = clusters[clusters.neuron == neuron].sort_values("rank").cluster.to_numpy()
        assert adjusted_rand_score(ref, got) == 1.0, neuron
        checked += 1
    assert checked >= 20

    info = run_index(gated_run).info
    assert info["d"] == 2 * 64 and info["n_vectors"] > 0
    index = SimilarFeatures.load(gated_run.run_dir)
    row = index.ids.iloc[0]
    hits = index.query(int(row.layer), int(row.neuron), int(row.cluster), k=3)
    assert len(hits) == 3 and all((h.layer, h.neuron) != (row.layer, row.neuron) for h in hits)

    gate_cfg = dataclasses.replace(gated_run, model=dataclasses.replace(gated_run.model, gated_embedding="gate"))
    with pytest.raises(ConfigError, match="model.gated_embedding is 'gate' in this config but was 'concat'"):
        cluster_job.run_cluster(gate_cfg, in_process=True)


def test_explain_on_a_gated_run_reclustered_with_the_gate(gated_run, tmp_path):
    """Issue 17 item 6: `--set model.gated_embedding=gate --force cluster`, then `ne explain`: the explainer
    embeds as the clusters were made (h ⊙ g_j), not as the config the harvest recorded says (concat)."""
    import shutil

    import torch

    from ne.explain import Explainer
    from ne.rundir.weights import read_layer_weights

    run_dir = tmp_path / "run"
    shutil.copytree(gated_run.run_dir, run_dir)
    gate_cfg = dataclasses.replace(
        gated_run, run_dir=str(run_dir), model=dataclasses.replace(gated_run.model, gated_embedding="gate")
    )
    cluster_job.run_cluster(gate_cfg, force=["cluster"], in_process=True)
    explainer = Explainer.load(str(run_dir))
    assert explainer.gated_embedding == "gate"
    model = explainer.model
    ids = model.encode("The for statement is used to iterate over the elements of a sequence")[:20]
    tokens = explainer.explain_tokens(ids, top=3)
    bos = [] if model.bos_token_id is None else [model.bos_token_id]
    t = torch.tensor([bos + ids])
    out = model.run(t, torch.ones_like(t), [0, 1])
    run = RunDir(str(run_dir))
    centroids = {
        layer: run.read_parquet(schema.layer_dir(schema.CENTROIDS_DIR, layer))
        .to_pandas()
        .set_index(["neuron", "cluster"])
        for layer in (0, 1)
    }
    gates = {layer: read_layer_weights(run, layer).gate for layer in (0, 1)}
    checked = 0
    for tok in tokens:
        for u in tok.units:
            if u.cluster is None:
                continue
            e = out[u.layer].h[0, len(bos) + tok.pos].float().numpy() * gates[u.layer][u.neuron]
            v = np.asarray(centroids[u.layer].loc[(u.neuron, u.cluster), "vector"], np.float32)
            assert u.similarity == pytest.approx(float(e @ v / np.linalg.norm(e) / np.linalg.norm(v)), abs=2e-3)
            checked += 1
    assert checked > 0


def test_explain_on_a_min_run_finds_the_units_that_go_low(tmp_path, llama_dir, corpus):
    """In a `harvest.direction: min` run a unit fires where its activation is at or below frac × its minimum;
    of_max is act / that minimum (positive). Brute force from the model's own activations."""
    import torch

    from ne.explain import Explainer, describe
    from ne.models import load_model
    from ne.viewer.render import explain_html

    cfg = make_cfg(
        tmp_path / "run",
        ModelConfig(backend="hf", name=str(llama_dir), device="cpu"),
        corpus,
        num_workers=0,
        k=8,
        direction="min",
    )
    harvest_job.run_harvest(cfg)
    cluster_job.run_cluster(cfg, in_process=True)
    model = load_model(cfg.model)
    ids = model.encode("The for statement is used to iterate over the elements of a sequence")[: cfg.data.n_ctx - 1]
    explainer = Explainer.load(cfg.run_dir, model)
    tokens = explainer.explain_tokens(ids, top=100_000)
    minima = RunDir(cfg.run_dir).read_parquet(schema.MAXIMA).to_pandas()
    bos = [] if model.bos_token_id is None else [model.bos_token_id]
    t = torch.tensor([bos + ids])
    out = model.run(t, torch.ones_like(t), [0, 1])
    found = 0
    for layer in (0, 1):
        low = minima[minima.layer == layer].sort_values("neuron").min_act.to_numpy()
        act = out[layer].act[0, len(bos) :].float().numpy()
        fires = (act <= cfg.harvest.frac * low) & (low < 0)
        for tok in tokens:
            units = [u for u in tok.units if u.layer == layer]
            assert sorted(u.neuron for u in units) == np.flatnonzero(fires[tok.pos]).tolist()
            for u in units:
                assert u.act == pytest.approx(float(act[tok.pos, u.neuron]), rel=1e-5, abs=1e-6)
                assert u.of_max == pytest.approx(u.act / low[u.neuron], rel=1e-5) and u.of_max >= cfg.harvest.frac
                found += 1
    assert found > 0
    printed = describe(tokens, explainer.direction)  # what `ne explain` prints: the ratio to the minimum
    assert "× min" in printed and "× max" not in printed
    assert "× min" in explain_html(tokens, cfg.harvest.frac, explainer.direction)


def test_misspelt_gated_embedding_is_a_one_line_error():
    from ne.config import load_config

    with pytest.raises(ConfigError, match="model.gated_embedding is 'gates'; choose one of 'concat', 'gate'"):
        load_config(None, ["model.gated_embedding=gates"])


def test_cluster_in_h_slices_equals_whole_layers(tmp_path, monkeypatch):
    """A budget far below a layer's h: many slices, each within it, and outputs identical to whole layers."""
    reference, sliced = tmp_path / "ref", tmp_path / "sliced"
    write_synthetic_run(str(reference))
    write_synthetic_run(str(sliced))
    cluster_job.run_cluster(_cfg(reference), in_process=True)
    real, seen = cluster_job.h_slices, []
    row_bytes = 32 * 4

    def small(run, layer, batches, budget):
        groups = real(run, layer, batches, 40 * row_bytes)
        seen.extend(groups)
        return groups

    monkeypatch.setattr(cluster_job, "h_slices", small)
    cluster_job.run_cluster(_cfg(sliced), in_process=True)
    assert len(seen) > 2 and all(ids is not None for _, ids in seen)
    assert all(len(ids) <= 40 or len(group) == 1 for group, ids in seen)
    _assert_same(_outputs(sliced), _outputs(reference))


def test_merge_in_small_parts_equals_naive_loop(tmp_path, tiny_model_cfg, corpus, monkeypatch):
    """Output parts of a few h rows and a few neurons each: the same rows as the naive loop."""
    from ne.models import load_model

    monkeypatch.setattr(harvest_job, "H_PART_BYTES", 64 * 4 * 50)  # 50 rows of d_model 64, float32
    monkeypatch.setattr(harvest_job, "EXAMPLE_NEURONS_PER_PART", 40)
    cfg = make_cfg(tmp_path / "run", tiny_model_cfg, corpus, num_workers=0)
    harvest_job.run_harvest(cfg)
    run = RunDir(cfg.run_dir)
    assert len(run.ls("h/layer=0")) > 3 and len(run.ls("examples/layer=0")) > 3
    model = load_model(tiny_model_cfg)
    ctx = run.read_parquet("contexts").to_pandas().sort_values("ctx_id")
    contexts = list(zip(ctx.ctx_id.tolist(), ctx.tokens.map(list).tolist()))
    assert_same_rows(
        read_examples(cfg.run_dir, [0, 1]), naive_harvest(model, contexts, [0, 1], k=5, frac=0.5, before=3, after=2)
    )
    h_ids = run.read_parquet("h/layer=1", columns=["h_id"]).column("h_id").to_numpy()
    assert np.all(np.diff(h_ids) > 0)  # parts in h_id order, each row once
