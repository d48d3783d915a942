"""Command-line options that the CLI and the benchmarks share: argparse types and flags, and their resolution
into values (a device, registered systems), each failure a :class:`~metaham.errors.UsageError`.

It sits below both ``metaham.cli`` and ``metaham.bench`` (every benchmark declares its own flags), so that no
benchmark imports the CLI.
"""
from __future__ import annotations

import argparse
import math

from metaham.errors import UsageError


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    """``--plugin PATH.py`` (repeatable): files that register extra systems; load them with :func:`load_plugins`."""
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
    """``--device`` (default ``auto``); turn it into a device with :func:`resolve_device`."""
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
