"""What every subcommand shares: usage errors (exit 2), output (summary + one JSON line), plugins, devices.

A subcommand module in ``metaham/cli/`` defines ``HELP`` (one line), ``EXAMPLES`` (text shown in --help),
``add_arguments(parser)`` and ``run(args) -> int``. ``run`` prints its human summary and ends with
:func:`emit`. The CLI holds no science: it parses, calls into the package, prints.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterable

import numpy as np

from metaham.errors import UserError


class UsageError(UserError):
    """Bad input from the user: printed as ``metaham COMMAND: error: ...`` with exit code 2."""


def emit(args: argparse.Namespace, summary: str, result: dict[str, Any]) -> int:
    """Print the human summary, then (with ``--json``) the result as one JSON object on the last line."""
    if summary:
        print(summary.rstrip("\n"), flush=True)
    if getattr(args, "json", False):
        print(json.dumps(jsonable(result), allow_nan=True), flush=True)
    return 0


def jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and paths into plain JSON values (NaN/inf become null)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> str:
    """A plain-text table with aligned columns (floats in 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    header = [str(h) for h in header]
    body = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="PATH.py",
        help="a Python file that registers extra systems (repeatable)",
    )


def load_plugins(paths: list[str]) -> None:
    """Load ``--plugin`` files; a broken one is a :class:`~metaham.errors.PluginError` naming the file."""
    import systems

    for path in paths or []:
        systems.load_plugin(path)


def get_system(name: str):
    """The registered system ``name`` or a usage error that lists the known systems."""
    import systems

    try:
        return systems.get(name)
    except systems.UnknownSystemError as exc:
        raise UsageError(str(exc)) from exc


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)"
    )


def resolve_device(spec: str):
    """The device of ``--device`` (:func:`metaham.train.device.resolve_device`); a bad or unavailable one is a
    usage error."""
    from metaham.train import ConfigError
    from metaham.train.device import resolve_device as engine_device

    try:
        return engine_device(spec)
    except ConfigError as exc:
        raise UsageError(f"--{exc}") from None


def parse_key_values(items: list[str], flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed item is a usage error naming it."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def positive(kind=float, allow_zero: bool = False):
    """An argparse type: a number > 0 (or >= 0), rejecting NaN and inf, with a message naming the value."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be finite")
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>= 0' if allow_zero else '> 0'}")
        return value

    convert.__name__ = kind.__name__
    return convert


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)
