"""Physical systems and their registry.

>>> import systems
>>> sys = systems.get("pendulum")
>>> sorted(systems.names())[:3]
['henon_heiles', 'magnetic_mirror', 'mass_spring']

A new system is one module that subclasses :class:`systems.base.System` and decorates it with
:func:`register`. Built-in systems live in this package; a user's own file is loaded with :func:`load_plugin`
(``--plugin path.py`` on the command line). See docs/plugins.md ("Adding a system").
"""
from __future__ import annotations

import importlib
import importlib.util
import sys as _sys
from pathlib import Path
from typing import Callable

from metaham.errors import PluginError, UserError

from .base import Param, System

_REGISTRY: dict[str, Callable[[], System]] = {}
_BUILTIN_MODULES = ("mass_spring", "pendulum", "henon_heiles", "magnetic_mirror", "nbody", "spring_chain")
_loaded_builtins = False
_PLUGIN_FILES: dict[str, str] = {}  # resolved path -> the path as given, of every plugin loaded so far


class UnknownSystemError(UserError, KeyError):
    """Raised for a system name that is not registered; its message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class DuplicateSystemError(UserError, ValueError):
    """A second system registered under a taken name without ``override=True``."""


def register(cls=None, *, name: str | None = None, factory: Callable[[], System] | None = None, override: bool = False):
    """Register a :class:`System` subclass (as a class decorator) or a named factory (a preset).

    ``@register`` uses ``cls.name``; ``register(name="two_body", factory=lambda: NBody(2))`` adds a preset.
    A name already taken (e.g. a built-in's) is a :class:`DuplicateSystemError` unless the newcomer asks to
    replace it with ``@register(override=True)``: a plugin must not silently change what ``pendulum`` means.
    Loading the same plugin file again replaces its own entries.
    """
    if factory is not None:
        if not name:
            raise ValueError("register(factory=...) needs a name")
        return _add(name, factory, override)

    def wrap(c):
        key = name or getattr(c, "name", None)
        if not key:
            raise ValueError(f"{c.__name__} has no `name`; set the class attribute or pass register(name=...)")
        if not (isinstance(c, type) and issubclass(c, System)):
            raise TypeError(f"{c!r} is not a subclass of systems.System")
        return _add(key, c, override)

    return wrap(cls) if cls is not None else wrap


def _add(key: str, entry: Callable[[], System], override: bool) -> Callable[[], System]:
    taken = _REGISTRY.get(key)
    same_source = taken is not None and getattr(taken, "__module__", None) == getattr(entry, "__module__", "")
    if taken is not None and taken is not entry and not (override or same_source):
        origin = getattr(taken, "__module__", "?")
        owner = "a built-in system" if origin.startswith(f"{__name__}.") else f"registered by {origin}"
        raise DuplicateSystemError(
            f"system name {key!r} is already taken ({owner}); choose another name, or register with "
            "@systems.register(override=True) to replace it on purpose"
        )
    _REGISTRY[key] = entry
    return entry


def _load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{mod}")


def names() -> list[str]:
    """Names of every registered system (built-ins and loaded plugins), sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> System:
    """A fresh instance of the system registered as ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownSystemError(f"unknown system {name!r}; known systems: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def load_plugin(path: str | Path) -> list[str]:
    """Import a user's Python file that registers systems; return the names it added or replaced.

    Any failure -- a missing file, an exception while the file runs, a name clash, no system registered -- is a
    :class:`~metaham.errors.PluginError` naming the file (and the line, for an exception in the file), and
    leaves the registry as it was.
    """
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"plugin {path}: no such file")
    _load_builtins()
    before = dict(_REGISTRY)
    mod_name = f"metaham_plugin_{path.stem}_{abs(hash(path.resolve())) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    _sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        _REGISTRY.clear()
        _REGISTRY.update(before)
        _sys.modules.pop(mod_name, None)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: not the plugin's error to report
        raise PluginError(f"plugin {path}{_line_in(exc, path)}: {type(exc).__name__}: {exc}") from exc
    added = [k for k, v in _REGISTRY.items() if before.get(k) is not v]
    if not added:
        raise PluginError(f"plugin {path}: registered no system (decorate a System subclass with @systems.register)")
    _PLUGIN_FILES[str(path.resolve())] = str(path)
    return added


def plugin_failure(exc: BaseException) -> str | None:
    """The one-line report of an exception raised by a loaded plugin's own code (its ``vector_field``, say, while
    a task pool is simulated): ``"plugin FILE, line N: Type: message"``, from the deepest frame in a plugin file
    of the exception or of one it was raised from; None when no plugin code is involved."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for resolved, given in _PLUGIN_FILES.items():
            line = _frame_line(exc, Path(resolved))
            if line:
                return f"plugin {given}{line}: {type(exc).__name__}: {exc}"
        exc = exc.__cause__ or exc.__context__
    return None


def _line_in(exc: BaseException, path: Path) -> str:
    """``", line N"`` of an exception raised while ``path`` is imported (a SyntaxError has its own line)."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f", line {exc.lineno}"
    return _frame_line(exc, path)


def _frame_line(exc: BaseException, path: Path) -> str:
    """``", line N"`` of the deepest frame of ``exc``'s traceback inside ``path``; empty when there is none."""
    line, tb, target = "", exc.__traceback__, str(path.resolve())
    while tb is not None:
        if str(Path(tb.tb_frame.f_code.co_filename).resolve()) == target:
            line = f", line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


__all__ = [
    "DuplicateSystemError", "Param", "System", "UnknownSystemError", "register", "names", "get", "load_plugin",
    "plugin_failure",
]
