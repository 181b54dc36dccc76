"""The `depmatch` command: each part of the package registers its own subcommands.

Only the module of the command that runs is imported (`COMMANDS`): the others appear in
`depmatch --help` through their one-line help here, so that no command, `--help` included,
waits for torch or the model libraries unless it needs them. Each module's `register(subparsers)`
adds its subcommands (without `help=`, which lives here) and sets `func(args) -> status`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from depmatch import __version__
from depmatch.errors import run_reporting_user_errors


@dataclass(frozen=True)
class Command:
    module: str  # registers the command; imported only when the command is named
    help: str  # its line in `depmatch --help`
    # The words after the command are another tool's command line, handed over unparsed in
    # `args.passed_on`: argparse would take that tool's options as depmatch's (`--debug`) or
    # reorder them. `depmatch COMMAND --help` alone is still depmatch's.
    passes_on: bool = False


COMMANDS = {
    "train": Command("depmatch.train", "train a model (no arguments: the synthetic RGB-D default on CPU)"),
    "launch": Command(
        "depmatch.launch",
        "accelerate launch, with a cluster's stop signals handled: the ranks checkpoint, the job exits 0",
        passes_on=True,
    ),
    "shards": Command("depmatch.data.cli", "build, generate and check WebDataset shards"),
    "eval": Command("depmatch.evaluation.cli", "mIoU and per-class IoU of a checkpoint on a shard split"),
    "predict": Command("depmatch.evaluation.cli", "label maps and overlays for a folder of images"),
    "export": Command("depmatch.evaluation.cli", "a standalone model directory from a checkpoint"),
    "ablate": Command(
        "depmatch.ablate.cli", "does depth help on your data? variants × seeds × depth controls, one report"
    ),
    "bench": Command(
        "depmatch.bench.cli",
        "encoder-swap benchmark: step time, images/s, peak memory, FLOPs, MFU, optional mIoU and profile",
    ),
}


def _named_command(argv: list[str]) -> str | None:
    """The subcommand in `argv`: the first word that is not an option (the top-level options take no
    value). None when `--help` comes first: the top-level help lists the commands by their lines here."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word
    return None


def _split_passed_on(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` for depmatch's parser, and the words it leaves to a command that `passes_on`."""
    named = _named_command(argv)
    if named not in COMMANDS or not COMMANDS[named].passes_on:
        return argv, []
    end = argv.index(named) + 1
    if argv[end:] in (["-h"], ["--help"]):
        return argv, []
    return argv[:end], argv[end:]


def _add_common_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an error instead of its one-line message",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="keep the INFO and warning lines of accelerate, DeepSpeed and the model libraries",
    )


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers that end a command line (`shards build`, not `shards`)."""
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subcommands:
        yield parser
    for action in subcommands:
        for child in dict.fromkeys(action.choices.values()):  # a parser with aliases appears once
            yield from _leaf_parsers(child)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `depmatch`; the command named in `argv` gets its full parser, the others a stub."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="depmatch",
        description="Depth-guided semi-supervised semantic segmentation: build shards, train, evaluate, predict, "
        "export, benchmark. `depmatch COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"depmatch {__version__}")
    _add_common_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = _named_command(argv)
    if named in COMMANDS:
        importlib.import_module(COMMANDS[named].module).register(subparsers)
        # A command that passes its words on gets no flags of its own: they would be the other tool's.
        for leaf in [] if COMMANDS[named].passes_on else _leaf_parsers(subparsers.choices[named]):
            # SUPPRESS: a flag given before the command (`depmatch --debug train`) is not reset
            _add_common_flags(leaf, default=argparse.SUPPRESS)
    for name, command in COMMANDS.items():
        if name not in subparsers.choices:  # not registered by the module imported for the named command
            subparsers.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, passed_on = _split_passed_on(argv)
    args = build_parser(argv).parse_args(argv)
    args.passed_on = passed_on
    from depmatch.logs import quiet_third_party_logs

    if not args.verbose:
        quiet_third_party_logs()
    return run_reporting_user_errors(lambda: args.func(args) or 0, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
