"""The ``metaham`` command line: one module per subcommand, discovered in this package.

Each subcommand module defines ``HELP``, ``EXAMPLES``, ``add_arguments(parser)`` and ``run(args) -> int``
(see :mod:`metaham.cli._common`). One error path for every command: a failure the user caused -- a
:class:`~metaham.errors.UserError` (bad value, file, plugin, checkpoint, non-finite result) or a file-system
refusal naming a path (unwritable or missing location, a file where a folder is needed) -- prints one line,
``metaham COMMAND: error: ...``, and exits 2; ``metaham --debug COMMAND`` (or ``METAHAM_DEBUG=1``) shows its
traceback. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sqlite3
import sys

from metaham import __version__

from metaham.errors import UserError
from metaham.allocator import tune_cpu_allocator

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
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
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
    debug = args.debug or os.environ.get("METAHAM_DEBUG", "") not in ("", "0")
    try:
        tune_cpu_allocator()
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `metaham config show qh9 | head`): not an error of ours. Point
        # stdout at /dev/null so that Python's own flush at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if _is_rank_failure(exc) and not debug:
            # Not the user's doing and not a bug of this rank: a peer died or went silent. One line, exit 1.
            print(f"metaham {args.command}: error: rank failure: {_one_line(str(exc))}", file=sys.stderr)
            return 1
        message = user_error_message(exc)
        if message is None or debug:
            raise
        print(f"metaham {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    """One line, whatever the message's source put in it (a library's multi-line text, say)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _is_rank_failure(exc: BaseException) -> bool:
    # Checked through sys.modules: importing metaham.train.distributed would load torch at every start-up, and
    # a RankFailure can only exist once that module is loaded.
    distributed = sys.modules.get("metaham.train.distributed")
    return distributed is not None and isinstance(exc, distributed.RankFailure)


# File-system refusals that a user's choice of path causes (not our bugs).
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EROFS,
                errno.ENOSPC, errno.EDQUOT}


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a failure the user caused, or ``None`` for anything else (a bug)."""
    if isinstance(exc, UserError):
        return str(exc)
    # An exception from a plugin's own code is the plugin author's to fix: name the file and line (--debug shows
    # the traceback). Through sys.modules: the registry is loaded only by the commands that use systems.
    registry = sys.modules.get("systems")
    report = registry.plugin_failure(exc) if registry is not None else None
    if report is not None:
        return report + " (run with --debug for the traceback)"
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS and exc.filename is not None:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{where}: {exc.strerror or exc}"
    if isinstance(exc, sqlite3.OperationalError) and ("readonly" in str(exc) or "unable to open" in str(exc)):
        return f"cannot write the database: {exc} (is its folder writable?)"
    return None
