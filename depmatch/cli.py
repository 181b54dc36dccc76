"""The `depmatch` command: each part of the package registers its own subcommands."""

from __future__ import annotations

import argparse
import sys

from depmatch import __version__


def build_parser() -> argparse.ArgumentParser:
    from depmatch import train
    from depmatch.bench import cli as bench_cli
    from depmatch.data import cli as data_cli
    from depmatch.evaluation import cli as evaluation_cli

    parser = argparse.ArgumentParser(
        prog="depmatch",
        description="Depth-guided semi-supervised semantic segmentation: build shards, train, evaluate, predict, export, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"depmatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = subparsers.add_parser(
        "train",
        help="train a model (no arguments: the synthetic RGB-D default on CPU)",
        description=train.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.run)
    data_cli.register(subparsers)
    evaluation_cli.register(subparsers)
    bench_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
