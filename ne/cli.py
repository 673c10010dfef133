"""`ne`: the command line. Each subcommand is a small function that parses, then calls jobs/ or ne/.

Errors of ours (`NeError`) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ne.errors import NeError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/demo.yaml", help="YAML experiment config (configs/*.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set harvest.k=50 --set run_dir=s3://bucket/run",
    )
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo a finished stage")


def _load(args):
    from ne.config import load_config

    return load_config(args.config, args.overrides)


def cmd_harvest(args) -> None:
    from jobs.harvest import run_harvest

    cfg = _load(args)
    summary = run_harvest(cfg, force=args.force)
    print(summary.describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ne", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("harvest", help="find every neuron's dataset examples (passes 1 and 2)")
    _config_args(p)
    p.set_defaults(func=cmd_harvest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except NeError as exc:
        print(f"ne {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
