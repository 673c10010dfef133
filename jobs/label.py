"""The label stage: an offline label for every feature cluster (`ne.compute.label` chooses it, `ne.rundir.labels`
reads what it needs), then the run report, which shows them.

One process, one layer at a time: a layer's labels are one Parquet part, written atomically, so an interrupted
stage resumes with the layers it had not finished. It needs no model, only the run's tokenizer to spell tokens.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from jobs.cluster import comparison
from ne import schema
from ne.compute.label import uses_word_pieces
from ne.config import RunConfig
from ne.models import load_model_tokenizer
from ne.models.tokenizers import decode_each
from ne.rundir.labels import corpus_counts, label_layer, read_all_labels
from ne.rundir.report import write_report
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)


@dataclass
class LabelSummary:
    run_dir: str
    clusters: int
    seconds: float

    def describe(self) -> str:
        return (
            f"label done in {self.seconds:.1f} s: {self.clusters} feature clusters labelled\n"
            f"outputs: {self.run_dir}/ ({schema.LABELS_DIR}/, {schema.REPORT_DIR}/report.md)"
        )


def run_label(cfg: RunConfig, force: Collection[str] = ()) -> LabelSummary:
    """Run (or resume) the label stage of `cfg`, then write the report."""
    forced = check_force(force, ("label",))
    run = RunDir(cfg.run_dir)
    with run.lock("ne label"):
        start = time.perf_counter()
        stage = Stage(run, "label", cfg, forced)
        if stage.needed():
            stage.begin()
            layers = run.manifest()["stages"]["examples"]["info"]["layers"]
            tokenizer = load_model_tokenizer(cfg.model)
            decode, word_pieces = functools.partial(decode_each, tokenizer), uses_word_pieces(tokenizer)
            model = run.manifest().get("model", {})
            special = [t for t in (model.get("bos_token_id"), model.get("pad_token_id")) if t is not None]
            corpus = None
            for layer in layers:
                rel = schema.part_path(schema.LABELS_DIR, 0, layer)
                if run.exists(rel):  # finished before an interruption
                    continue
                if corpus is None:
                    corpus = corpus_counts(run)
                run.write_parquet(
                    rel, label_layer(run, layer, corpus, decode, special, word_pieces), row_group_size=4096
                )
                log.info("labels of layer %d written", layer)
            metrics = run.read_parquet(schema.METRICS)
            write_report(
                run,
                metrics,
                compare=comparison(cfg, metrics),
                cut=cfg.cluster.cut,
                threshold=cfg.cluster.threshold,
                labels=read_all_labels(run, layers),
            )
            stage.done(
                clusters=sum(
                    run.read_footer(schema.part_path(schema.LABELS_DIR, 0, layer)).num_rows for layer in layers
                )
            )
        return LabelSummary(run.url, int(stage.info.get("clusters", 0)), time.perf_counter() - start)
