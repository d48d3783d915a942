"""``metaham config``: the configs shipped with metaham, to read, copy and edit.

The repository's ``configs/`` folder is installed with the package, so every default a command uses can be
seen from any install: ``list`` names them with their first comment line, ``show NAME`` prints one exactly as
shipped (comments included), ready to redirect into a file, edit and pass back with ``--config``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from metaham.errors import UsageError
from metaham.text import table

from ._common import add_json_flag, emit

HELP = "list the shipped configs and splits, or print one to copy and edit"
EXAMPLES = """
  metaham config list                           every shipped run config and split
  metaham config show qh9 > my_qh9.yaml         copy the QH9 defaults, edit, then:
  metaham qh9 train --config my_qh9.yaml --data qh9.db --out runs/mine
  metaham config show splits/leave_pendulum     a named meta-train/meta-test split
"""
ACTIONS = ("list", "show")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="list: the shipped configs; show: print one as YAML")
    parser.add_argument("name", nargs="?", help="with show: a name from `metaham config list` (e.g. qh9)")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from metaham.train.config import ConfigError, shipped_config, shipped_config_names, shipped_configs_dir

    if args.action == "list":
        if args.name:
            raise UsageError(f"list takes no name (got {args.name!r}); use `metaham config show {args.name}`")
        names = shipped_config_names()
        rows = [[name, _split_of(shipped_config(name)), _summary(shipped_config(name).read_text())] for name in names]
        summary = (
            f"shipped configs (in {shipped_configs_dir()}):\n"
            + table(rows, ["name", "split", "what it is"])
            + "\n\nrun configs take --config NAME; splits are named in a config's `split:` key."
            "\n`metaham config show NAME > my.yaml` copies one to edit."
        )
        return emit(args, summary, {"directory": str(shipped_configs_dir()), "configs": names})
    if not args.name:
        raise UsageError(f"show needs a NAME; shipped configs: {', '.join(shipped_config_names())}")
    try:
        path = shipped_config(args.name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    text = path.read_text()
    # The YAML goes to stdout untouched, so that `show NAME > my.yaml` is a valid config.
    return emit(args, text, {"name": args.name, "path": str(path), "yaml": text})


def _split_of(path: Path) -> str:
    """The split a meta-training config names (``-`` for other configs)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return str(data.get("split") or "-") if isinstance(data.get("split"), (str, type(None))) else "(inline)"


def _summary(text: str, width: int = 100) -> str:
    """A config's description: its ``description:`` key, else the first sentence of its leading comment."""
    for line in text.splitlines():
        if line.startswith("description:"):
            return line.partition(":")[2].strip()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = " ".join(comment).split(". ")[0].split(": ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."
