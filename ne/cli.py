"""`ne`: the command line. Each subcommand is a small function that parses, then calls jobs/ or ne/.

Errors of ours (`NeError`) print one line and exit 2; Ctrl-C prints one line and exits 130; a closed output
pipe (`ne explain ... | head`) ends quietly; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ne import schema
from ne.errors import ConfigError, NeError
from ne.rundir.graph import stages_of

RUN_COMMANDS = ("ne harvest", "ne cluster", "ne index", "ne occurrence", "ne run")
"""What `ne run` runs, in order; each command's stages come from the graph (`stages_of`; `ne run`'s own is
`sae_eval`)."""
FIGURE_MODELS = ("mlp", "sae_standard", "sae_ne_loss")


def _config_args(p: argparse.ArgumentParser, stages: tuple[str, ...]) -> None:
    _config_file_args(
        p,
        "configs/demo.yaml",
        "YAML experiment config (configs/*.yaml)",
        "--set harvest.k=50 --set run_dir=s3://bucket/run",
    )
    _force_arg(p, stages)


def _config_file_args(p: argparse.ArgumentParser, default: str, what: str, example: str) -> None:
    """--config FILE and repeatable --set KEY=VALUE overrides."""
    p.add_argument("--config", default=default, help=what)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. {example}",
    )


def _force_arg(p: argparse.ArgumentParser, stages: tuple[str, ...]) -> None:
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help=f"redo a finished stage ({', '.join(stages)}) and mark every stage after it stale",
    )


def _load(args):
    from ne.config import load_config

    return load_config(args.config, args.overrides)


def _out_dir(path: str):
    """`--out` as a run-style directory (created when missing); a file in its way is an error before any work."""
    from ne.rundir.store import RunDir

    out = RunDir(path)
    at = out.root.rstrip("/")
    while at and not out.fs.exists(at) and os.path.dirname(at) != at:
        at = os.path.dirname(at)
    if at and out.fs.exists(at) and not out.fs.isdir(at):
        where = "is a file" if at == out.root.rstrip("/") else f"lies under {at!r}, which is a file"
        raise ConfigError(f"--out {path!r} {where}; give a directory (it is created when missing)")
    return out


def cmd_harvest(args) -> None:
    from jobs.harvest import run_harvest

    cfg = _load(args)
    summary = run_harvest(cfg, force=args.force)
    print(summary.describe())


def cmd_view(args) -> None:
    import subprocess

    from ne.rundir.store import RunDir
    from ne.viewer import check_address, launch_command

    RunDir(args.run_dir).require_manifest()
    cmd = launch_command(args.run_dir, host=args.host, port=args.port)
    host, port = cmd[cmd.index("--server.address") + 1], int(cmd[cmd.index("--server.port") + 1])
    check_address(host, port)
    print(f"ne view: serving {args.run_dir} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        code = subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return  # Ctrl-C is how the viewer stops
    if code != 0:  # e.g. the port was taken after the check above
        raise ConfigError(
            f"the viewer's server on {host}:{port} stopped with exit code {code} (its reason is printed "
            "above); pass a free --port, or another --host"
        )


def cmd_cluster(args) -> None:
    from jobs.cluster import run_cluster
    from jobs.label import run_label
    from ne.rundir.stages import check_force
    from ne.rundir.store import RunDir

    cfg = _load(args)
    force = check_force(args.force, stages_of("ne cluster"))
    with RunDir(cfg.run_dir).lock("ne cluster"):
        print(run_cluster(cfg, force=force & {"cluster"}).describe(), end="\n\n")
        print(run_label(cfg, force=force & {"label"}).describe())


def cmd_index(args) -> None:
    from index.build import run_index

    print(run_index(_load(args), force=args.force).describe())


def cmd_occurrence(args) -> None:
    from jobs.occurrence import run_occurrence

    print(run_occurrence(_load(args), force=args.force).describe())


def cmd_importance(args) -> None:
    from jobs.importance import run_importance

    print(run_importance(_load(args), layers=args.layer, neurons=args.neuron, force=args.force).describe())


def cmd_status(args) -> None:
    from ne.rundir.stages import describe_status
    from ne.rundir.store import RunDir

    print(describe_status(RunDir(args.run_dir)))


def cmd_explain(args) -> None:
    import json

    from ne.explain import Explainer, describe, to_records

    explainer = Explainer.load(args.run_dir)
    tokens = explainer.explain(args.text, top=args.top)
    print(json.dumps(to_records(tokens), indent=1) if args.json else describe(tokens, explainer.direction))


def cmd_similar(args) -> None:
    from index.query import describe_similar

    print(describe_similar(args.run_dir, args.layer, args.neuron, args.cluster, args.k, args.include_self, args.by))


def cmd_describe(args) -> None:
    from ne.describe import run_describe

    cfg, chosen = _load(args), {"layers": args.layer, "neurons": args.neuron, "limit": args.limit}
    print(run_describe(cfg, **chosen, force=args.force).describe())
    if args.score:
        from ne.detection import run_detection

        print(run_detection(cfg, **chosen, force=args.force).describe())


def cmd_export(args) -> None:
    from ne.export import export_run

    print(
        export_run(
            args.run_dir,
            args.format,
            args.out,
            force=args.force,
            splits=args.splits,
            model_id=args.model_id,
            source_set=args.source_set,
            creator_id=args.creator_id,
        ).describe()
    )


def cmd_run(args) -> None:
    """Harvest, clusters, index, occurrences and co-activation in one go; then the most polysemantic neurons and
    one example query of similar features."""

    from index.build import run_index
    from index.query import describe_similar
    from jobs.cluster import comparison, run_cluster
    from jobs.harvest import run_harvest
    from jobs.label import run_label
    from jobs.occurrence import run_occurrence
    from ne.rundir.labels import read_all_labels
    from ne.rundir.report import most_polysemantic, unit_comparison
    from ne.rundir.stages import check_force
    from ne.rundir.store import RunDir

    cfg = _load(args)
    force = check_force(args.force, stages_of(*RUN_COMMANDS))
    if cfg.sae.compare.active:
        from jobs.lm_sae_compare import run_comparison

        print(run_comparison(cfg, force).describe())
        stem = f"{cfg.run_dir}/{schema.COMPARISON}"
        print(f"\ntables: {stem}.md and .csv; plot: {stem}.png; each SAE's run: {cfg.run_dir}/NAME-seedS/")
        return
    run = RunDir(cfg.run_dir)
    with run.lock("ne run"):
        print(run_harvest(cfg, force=force & set(stages_of("ne harvest"))).describe(), end="\n\n")
        print(run_cluster(cfg, force=force & {"cluster"}).describe(), end="\n\n")
        print(run_label(cfg, force=force & {"label"}).describe(), end="\n\n")
        print(run_index(cfg, force=force & {"index"}).describe(), end="\n\n")
        print(run_occurrence(cfg, force=force & set(stages_of("ne occurrence"))).describe(), end="\n\n")
        if cfg.sae.active:
            from dataclasses import asdict

            from jobs.lm_sae import run_sae_eval
            from ne.lm_sae.eval import to_markdown

            print(f"The SAE, evaluated ({schema.SAE_EVAL_MD}):")
            print(to_markdown({"this run": asdict(run_sae_eval(cfg, force=force & {"sae_eval"}))}))
        table = run.read_parquet(schema.METRICS)
        labels = read_all_labels(run, run.layers(schema.LABELS_DIR))
    metrics = table.to_pandas()
    compared = comparison(cfg, table)
    if compared:
        print("SAE latents vs MLP neurons of the same layer:")
        print(unit_comparison(compared).to_string(index=False), end="\n\n")
    top = most_polysemantic(metrics[metrics.n_examples > 0], labels, 10)
    if top.empty:
        print(f"No neuron has dataset examples; report: {cfg.run_dir}/{schema.REPORT_MD}")
        return
    print("The 10 most polysemantic neurons (by substantial, well-separated clusters; their labels below each):")
    print(_polysemantic_text(top))
    layer, neuron, cluster = _demo_query(cfg.run_dir, top)
    print(
        f"\nFeatures most similar to cluster {cluster} of layer {layer}, neuron {neuron} "
        f"(ne similar {cfg.run_dir} --layer {layer} --neuron {neuron} --cluster {cluster} -k 5):"
    )
    print(describe_similar(cfg.run_dir, layer, neuron, cluster, 5))
    print(f"\nreport: {cfg.run_dir}/{schema.REPORT_MD}; browse it: ne view {cfg.run_dir}")


def _polysemantic_text(top) -> str:
    """One line per neuron, then one indented line per substantial cluster's label."""
    lines = [f"{'layer':>5} {'neuron':>6} {'examples':>8} {'clusters':>8} {'substantial':>11} {'silhouette':>10}"]
    for row in top.itertuples(index=False):
        lines.append(
            f"{row.layer:>5} {row.neuron:>6} {row.n_examples:>8} {row.n_clusters:>8} {row.substantial:>11} "
            f"{'–' if row.silhouette != row.silhouette else f'{row.silhouette:.3f}':>10}"
        )
        lines += [f"{'':>14}{text}" for text in (row.labels.split(" · ") if row.labels else [])]
    return "\n".join(lines)


def _demo_query(run_dir: str, top) -> tuple[int, int, int]:
    """The feature `ne run` shows similar features of: the most polysemantic neuron's cluster that fires most in
    the held-out text (cluster 0 of the most polysemantic neuron when the run has no co-activation table)."""
    from ne.coactivation import CoActivation
    from ne.errors import DataError

    layer, neuron = int(top.iloc[0].layer), int(top.iloc[0].neuron)
    try:
        features = CoActivation(run_dir).features().to_pandas()
    except DataError:
        return layer, neuron, 0
    fired = features.merge(top[["layer", "neuron"]], on=["layer", "neuron"])
    fired = fired[fired.occurrences > 0]
    if fired.empty:
        return layer, neuron, 0
    best = fired.sort_values("occurrences", ascending=False, kind="stable").iloc[0]
    return int(best.layer), int(best.neuron), int(best.cluster)


def _mnist_args(p: argparse.ArgumentParser) -> None:
    _config_file_args(
        p, "configs/mnist-sae.yaml", "MNIST experiment config", "--set sae.ne_coeff=3 --set trainer.num_workers=2"
    )


def _load_mnist(args):
    from ne.config import load_config
    from ne.mnist.config import MnistRunConfig

    return load_config(args.config, args.overrides, cls=MnistRunConfig)


def cmd_train(args) -> None:
    """The MNIST MLP and both SAEs on Ray Train, then Tables 2 and 3."""
    from jobs.train import run_train
    from ne.mnist.eval import to_markdown

    summary = run_train(_load_mnist(args), force=args.force)
    print(summary.describe())
    if summary.metrics:
        print(to_markdown({k: vars(m) for k, m in summary.metrics.items()}))


def cmd_sae_eval(args) -> None:
    """Tables 2 and 3 for a directory of weights in the authors' layout (default: the run's mnist/)."""
    from jobs.train import load_splits
    from ne.mnist.eval import evaluate_dir, with_paper, write_tables
    from ne.rundir.stages import check_not_owned
    from ne.rundir.store import RunDir

    cfg = _load_mnist(args)
    weights = args.weights or RunDir(cfg.run_dir).url_of(schema.MNIST_DIR)
    default = f"{cfg.run_dir.rstrip('/')}/sae-eval"
    out = args.out or default  # never the run's mnist/: its tables are stage mnist_eval's outputs
    out_dir = _out_dir(out)
    check_not_owned(out, ["sae_eval.md", "sae_eval.csv"], default=default)
    metrics = evaluate_dir(weights, *load_splits(cfg), cfg.eval)
    rows = {k: vars(m) for k, m in metrics.items()}
    print(write_tables(out_dir, with_paper(rows) if args.paper else rows))
    print(f"written: {out}/sae_eval.md and .csv")


def cmd_figure(args) -> None:
    """Figure 5 PNGs for MLP or SAE neurons."""
    from jobs.train import load_splits
    from ne.mnist.figures import figure5
    from ne.mnist.model import MLP, load_sae
    from ne.rundir.stages import check_not_owned
    from ne.rundir.store import RunDir

    if args.model not in FIGURE_MODELS:
        raise ConfigError(
            f"--model {args.model!r} is not a model of the MNIST run; choose one of {', '.join(FIGURE_MODELS)}"
        )
    cfg = _load_mnist(args)
    out = _out_dir(args.out or f"{cfg.run_dir.rstrip('/')}/mnist/figures")
    check_not_owned(out.url, [f"{args.model}_{neuron}.png" for neuron in args.neuron])
    weights = (args.weights or RunDir(cfg.run_dir).url_of(schema.MNIST_DIR)).rstrip("/")
    mlp = MLP.load(f"{weights}/mlp.safetensors")
    sae = None if args.model == "mlp" else load_sae(f"{weights}/{args.model}.safetensors", mlp.hidden_size)
    _, test = load_splits(cfg)
    for neuron in args.neuron:
        name = f"{args.model}_{neuron}.png"
        out.write_bytes(name, figure5(mlp, sae, neuron, test, max_examples=cfg.eval.max_examples))
        print(f"written: {out.url.rstrip('/')}/{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ne", description="neuron-embeddings: find the distinct behaviours inside polysemantic neurons."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    config_commands = [
        (
            "run",
            "harvest, cluster, index, occurrences and co-activation in one go (the demo)",
            cmd_run,
            stages_of(*RUN_COMMANDS),
        ),
        ("harvest", "find every neuron's dataset examples (passes 1 and 2)", cmd_harvest, stages_of("ne harvest")),
        (
            "cluster",
            "feature clusters, polysemy metrics, their labels and the run report",
            cmd_cluster,
            stages_of("ne cluster"),
        ),
        ("index", "the FAISS index of similar features across neurons", cmd_index, stages_of("ne index")),
        (
            "occurrence",
            "where every feature cluster fires in held-out text, which fire together, and how well each label finds it",
            cmd_occurrence,
            stages_of("ne occurrence"),
        ),
    ]
    for name, help_text, func, stages in config_commands:
        p = sub.add_parser(name, help=help_text)
        _config_args(p, stages)
        p.set_defaults(func=func)
    _run_commands(sub)
    _query_commands(sub)
    _mnist_commands(sub)
    return parser


def _run_commands(sub) -> None:
    """Commands on one run's stages beyond the pipeline's: status, importance, describe, export."""
    p = sub.add_parser("status", help="each stage of a run: done, stale, running or missing, with its settings")
    p.add_argument("run_dir", help="run directory (local path or fsspec URL)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("importance", help="precompute token importance of examples for the viewer (adds to it)")
    _config_args(p, stages_of("ne importance"))
    p.add_argument("--layer", type=int, action="append", help="only this layer (repeatable); default all")
    p.add_argument("--neuron", type=int, action="append", help="only this neuron (repeatable); default all")
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser(
        "describe", help="LLM descriptions of feature clusters (any OpenAI-compatible endpoint; adds to what is there)"
    )
    _config_args(p, stages_of("ne describe"))
    p.add_argument("--layer", type=int, action="append", help="only this layer (repeatable); default all")
    p.add_argument("--neuron", type=int, action="append", help="only this neuron (repeatable); default all")
    p.add_argument(
        "--limit", type=int, help="describe at most this many clusters (the first, by layer, neuron, cluster)"
    )
    p.add_argument(
        "--score",
        action="store_true",
        help="then score each description by LLM detection on the held-out text (needs `ne occurrence` first)",
    )
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("export", help="write a run's feature clusters for delphi or Neuronpedia")
    p.add_argument("run_dir", help="run directory with finished clusters (local path or fsspec URL)")
    p.add_argument("--format", required=True, help="delphi (its latent cache) or neuronpedia (its import layout)")
    p.add_argument("out", help="directory to write (new or empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace what OUT holds")
    p.add_argument("--splits", type=int, help="delphi: files per layer, over consecutive latent ranges (default 5)")
    p.add_argument("--model-id", help="Neuronpedia: the model's id (default: from model.name)")
    p.add_argument("--source-set", default="ne-clusters", help="Neuronpedia: the source set (sources are LAYER-SET)")
    p.add_argument(
        "--creator-id",
        help="Neuronpedia: the user id its rows are created by (default: the default user its database seed creates)",
    )
    p.set_defaults(func=cmd_export)


def _query_commands(sub) -> None:
    """Commands that read a finished run: explain, similar, view."""
    p = sub.add_parser("explain", help="which units fire on a text, and as which of their feature clusters")
    p.add_argument("run_dir", help="run directory with finished clusters (local path or fsspec URL)")
    p.add_argument("--text", required=True, help="the text to explain")
    p.add_argument("--top", type=int, default=10, help="units listed per token, strongest first")
    p.add_argument("--json", action="store_true", help="print JSON records instead of text")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("similar", help="feature clusters of other neurons that behave most like one cluster")
    p.add_argument("run_dir", help="run directory (local path or fsspec URL)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--neuron", type=int, required=True)
    p.add_argument("--cluster", type=int, default=0, help="cluster of the neuron (0 is its largest)")
    p.add_argument("-k", type=int, default=20, help="how many similar features to print")
    p.add_argument("--include-self", action="store_true", help="keep the query neuron's own clusters")
    p.add_argument(
        "--by",
        choices=("auto", "behaviour", "vector"),
        default="auto",
        help="behaviour: the features that fire on the same held-out tokens; vector: the nearest central "
        "examples in the index; auto (default): behaviour where the run has it for this feature",
    )
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("view", help="browse neurons, feature clusters and similar features in a browser")
    p.add_argument("run_dir", help="run directory (local path or fsspec URL)")
    p.add_argument("--host", default=None, help="address to bind; default the run's viewer.host, 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="port; default the run's viewer.port, 8501")
    p.set_defaults(func=cmd_view)


def _mnist_commands(sub) -> None:
    """The MNIST experiment: train, sae-eval, figure."""
    p = sub.add_parser("train", help="MNIST: train the MLP and the SAEs with and without the NE loss (Ray Train)")
    _mnist_args(p)
    _force_arg(p, stages_of("ne train"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sae-eval", help="MNIST: the paper's Tables 2 and 3 for a directory of SAE weights")
    _mnist_args(p)
    p.add_argument("--weights", help="directory with mlp.safetensors and sae_*.safetensors; default RUN/mnist")
    p.add_argument("--out", help="where sae_eval.md/.csv go; default RUN/sae-eval (never a stage's outputs)")
    p.add_argument("--paper", action="store_true", help="add the paper's rows to the table")
    p.set_defaults(func=cmd_sae_eval)

    p = sub.add_parser("figure", help="MNIST: Figure 5 (activation and importance maps, feature clusters)")
    _mnist_args(p)
    p.add_argument("--weights", help="directory with mlp.safetensors and sae_*.safetensors; default RUN/mnist")
    p.add_argument("--model", default="sae_ne_loss", help=f"one of {', '.join(FIGURE_MODELS)}")
    p.add_argument("--neuron", type=int, action="append", required=True, help="neuron index (repeatable)")
    p.add_argument("--out", help="output directory; default RUN/mnist/figures")
    p.set_defaults(func=cmd_figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature it tries
    for name in ("botocore", "aiobotocore"):  # s3:// runs: "Found credentials in ..." on every command
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args.func(args)
    except NeError as exc:
        print(f"ne {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stop_ray()
        print(f"ne {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # what a shell reports for a program stopped by SIGPIPE, as `yes | head` is
    return 0


def _stop_ray() -> None:
    """Shut down the Ray this process started or joined, so that its workers stop with it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: the workers die with this process anyway
            pass


def _quiet_stdout() -> None:
    """The reader of our output has gone (`ne explain ... | head`): point stdout at /dev/null, so that the
    interpreter's last flush at exit does not complain about the closed pipe either."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no real file (captured, closed)
        pass


if __name__ == "__main__":
    sys.exit(main())
