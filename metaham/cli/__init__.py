"""The ``metaham`` command line: one module per subcommand, discovered in this package.

Each subcommand module defines ``HELP``, ``EXAMPLES``, ``add_arguments(parser)`` and ``run(args) -> int``
(see :mod:`metaham.cli._common`). Usage errors exit with code 2 and a message naming the offending value.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from metaham import __version__

from ._common import UsageError

# Display order of the subcommands; module name -> command name.
COMMANDS = {
    "systems": "systems",
    "simulate": "simulate",
    "meta_train": "meta-train",
    "adapt": "adapt",
    "qh9": "qh9",
    "bench": "bench",
    "cache": "cache",
    "config": "config",
    "demo": "demo",
}


def _available():
    for module_name, command in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module_name}":
                continue  # subcommand not part of this build
            raise
        yield command, module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaham",
        description="Learn Hamiltonians: meta-learned Hamiltonian graph networks across physical systems, "
        "and sparse equivariant DFT Hamiltonian-matrix prediction (QH9).",
        epilog="Run `metaham COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"metaham {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, module in _available():
        p = sub.add_parser(
            command,
            help=module.HELP,
            description=module.HELP,
            epilog="examples:\n" + module.EXAMPLES.strip("\n"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"metaham {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `metaham config show qh9 | head`): not an error of ours. Point
        # stdout at /dev/null so that Python's own flush at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
