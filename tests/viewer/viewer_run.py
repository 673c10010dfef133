"""A complete, tiny language-model run directory for the viewer's tests and benchmark.

Built in one process from a real (tiny, random) model with the library's own stages: contexts from
Python's pydoc topics, maxima and examples through `ne.compute.harvest`, clusters, dendrograms and metrics through
the cluster stage run in-process, the labels, and the index stage.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import safetensors.numpy
import torch

from index.build import run_index
from jobs.cluster import run_cluster
from jobs.label import run_label
from ne import schema
from ne.compute import harvest
from ne.config import ClusterConfig, DataConfig, HarvestConfig, ModelConfig, RunConfig, to_dict
from ne.models import load_model
from ne.rundir.stages import Stage
from ne.rundir.store import RunDir

SILENT = (0, 5)
"""(layer, neuron) given no examples, as a neuron whose maximum is never reached."""


def pydoc_contexts(model, n_contexts: int, n_ctx: int) -> list[tuple[int, list[int]]]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))[: n_contexts * n_ctx * 6]
    ids = model.encode(text)
    body = n_ctx - (model.bos_token_id is not None)
    bos = [model.bos_token_id] if model.bos_token_id is not None else []
    return [(i, bos + ids[i * body : (i + 1) * body]) for i in range(n_contexts)]


def build_lm_run(
    root: Path,
    model_cfg: ModelConfig,
    n_contexts: int = 48,
    n_ctx: int = 48,
    k: int = 12,
    layers: tuple[int, ...] = (0, 1),
    threshold: float = 0.8,
    with_index: bool = True,
) -> RunConfig:
    torch.manual_seed(0)
    cfg = RunConfig(
        run_dir=str(root),
        model=model_cfg,
        data=DataConfig(n_ctx=n_ctx, max_contexts=n_contexts, contexts_per_part=n_contexts // 2),
        harvest=HarvestConfig(layers=list(layers), k=k, batch_size=16),
        cluster=ClusterConfig(threshold=threshold, neurons_per_task=128),
    )
    model = load_model(model_cfg)
    run = RunDir(str(root))
    run.set_manifest_entry("config", to_dict(cfg))
    run.set_manifest_entry("model", model.manifest_entry())
    contexts = pydoc_contexts(model, n_contexts, n_ctx)
    per_part = cfg.data.contexts_per_part
    with stage(run, "contexts", cfg, n_contexts=n_contexts):
        for p in range(0, n_contexts, per_part):
            chunk = contexts[p : p + per_part]
            run.write_parquet(
                f"{schema.CONTEXTS_DIR}/{schema.part_name(p // per_part)}",
                pa.Table.from_pydict(
                    {"ctx_id": [c for c, _ in chunk], "doc_id": [0] * len(chunk), "tokens": [t for _, t in chunk]},
                    schema=schema.CONTEXTS,
                ),
            )
    with stage(run, "sae", cfg):  # no SAE: the model's own neurons are the units
        pass
    with stage(run, "weights", cfg, layers=list(layers)):
        for layer in layers:
            run.write_bytes(
                schema.weights_path(layer),
                safetensors.numpy.save(
                    {"W_in": model.W_in(layer).float().numpy(), "b_in": model.b_in(layer).float().numpy()}
                ),
            )

    maxima = harvest.shard_maxima(model, contexts, list(layers), 16)
    rows = [(layer, n, float(v)) for layer in layers for n, v in enumerate(maxima[layer].tolist())]
    with stage(run, "maxima", cfg, layers=list(layers)):
        run.write_parquet(
            schema.MAXIMA,
            pa.Table.from_pydict(
                {"layer": [r[0] for r in rows], "neuron": [r[1] for r in rows], "max_act": [r[2] for r in rows]},
                schema=schema.MAXIMA_SCHEMA,
            ),
        )
    thresholds = {layer: harvest.thresholds_from_maxima(maxima[layer], cfg.harvest.frac) for layer in layers}
    if SILENT[0] in thresholds:
        thresholds[SILENT[0]][SILENT[1]] = float("inf")
    window = (cfg.harvest.window_before, cfg.harvest.window_after)
    tables = harvest.shard_examples(model, contexts, thresholds, k, window, n_ctx, 16)
    with stage(run, "examples", cfg, layers=list(layers)):
        for layer in layers:
            examples, h = tables[layer]
            examples = harvest.merge_examples(examples, k)
            run.write_parquet(f"{schema.layer_dir(schema.EXAMPLES_DIR, layer)}/{schema.part_name(0)}", examples)
            run.write_parquet(
                f"{schema.layer_dir(schema.H_DIR, layer)}/{schema.part_name(0)}", harvest.select_h(h, examples)
            )

    run_cluster(cfg, in_process=True)
    run_label(cfg)
    if with_index:
        run_index(cfg)
    return cfg


@contextlib.contextmanager
def stage(run: RunDir, name: str, cfg: RunConfig, **info):
    """Write a stage's outputs by hand, inside its lifecycle (as the jobs do), and record it done."""
    st = Stage(run, name, cfg)
    st.begin()
    yield
    st.done(**info)
