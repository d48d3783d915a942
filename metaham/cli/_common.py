"""What every subcommand shares: output (summary + one JSON line) and ``key=value`` flags. Option types and
flags that the benchmarks use too are in :mod:`metaham.options`, tables in :mod:`metaham.text`, the usage error
(exit 2) in :mod:`metaham.errors`.

A subcommand module in ``metaham/cli/`` defines ``HELP`` (one line), ``EXAMPLES`` (text shown in --help),
``add_arguments(parser)`` and ``run(args) -> int``. ``run`` prints its human summary and ends with
:func:`emit`. The CLI holds no science: it parses, calls into the package, prints.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from metaham.errors import UsageError


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


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (by default they go to stderr when it is a terminal)")


def progress_setting(args: argparse.Namespace) -> bool | None:
    """What ``--no-progress`` means to the library calls: False hides the bars, None shows them on a terminal."""
    return False if args.no_progress else None


def parse_key_values(items: list[str], flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed item is a usage error naming it."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out

