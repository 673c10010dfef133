"""A run's labels, `labels/layer=L/part-00000.parquet`: the offline label of every feature cluster (`ne.compute.label`
chooses them) from the layer's examples, clusters and contexts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import pyarrow as pa

from ne import schema
from ne.compute.label import CorpusCounts, count_tokens, label_clusters
from ne.errors import DataError
from ne.rundir.contexts import context_parts, tokens_at
from ne.rundir.store import RunDir


def corpus_counts(run: RunDir) -> CorpusCounts:
    """Token and adjacent-pair counts over `contexts/`, one part at a time."""
    return count_tokens(
        run.read_parquet(schema.part_path(schema.CONTEXTS_DIR, part), columns=["tokens"])
        .column("tokens")
        .combine_chunks()
        for part in context_parts(run)
    )


def label_layer(
    run: RunDir,
    layer: int,
    corpus: CorpusCounts,
    decode: Callable[[Sequence[int]], list[str]],
    special: Sequence[int] = (),
    word_pieces: bool = False,
) -> pa.Table:
    """The labels of every feature cluster of one layer, from its examples, clusters and contexts."""
    examples = run.read_parquet(
        schema.layer_dir(schema.EXAMPLES_DIR, layer), columns=["neuron", "rank", "ctx_id", "pos"]
    ).sort_by([("neuron", "ascending"), ("rank", "ascending")])
    clusters = run.read_parquet(
        schema.layer_dir(schema.CLUSTERS_DIR, layer), columns=["neuron", "rank", "cluster", "outlier"]
    ).sort_by([("neuron", "ascending"), ("rank", "ascending")])
    if examples.num_rows != clusters.num_rows or not (
        examples.column("neuron").equals(clusters.column("neuron"))
        and examples.column("rank").equals(clusters.column("rank"))
    ):
        raise DataError(
            f"{run.url}: the clusters of layer {layer} do not match its examples; redo the clusters with "
            "`ne cluster --config CONFIG --force cluster`"
        )
    toks = tokens_at(run, examples.column("ctx_id").to_numpy(), examples.column("pos").to_numpy())
    return label_clusters(
        layer,
        examples.column("neuron").to_numpy(),
        clusters.column("cluster").to_numpy(),
        clusters.column("outlier").to_numpy(zero_copy_only=False),
        toks,
        corpus,
        decode,
        special,
        word_pieces,
    )


def read_all_labels(run: RunDir, layers: Sequence[int]) -> pd.DataFrame:
    """Every feature cluster's size, outlier flag and label (small: one row per cluster)."""
    columns = ["layer", "neuron", "cluster", "size", "outlier", "label"]
    tables = [run.read_parquet(schema.layer_dir(schema.LABELS_DIR, layer), columns=columns) for layer in layers]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)
