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

from .base import Param, System

_REGISTRY: dict[str, Callable[[], System]] = {}
_BUILTIN_MODULES = ("mass_spring", "pendulum", "henon_heiles", "magnetic_mirror", "nbody", "spring_chain")
_loaded_builtins = False


class UnknownSystemError(KeyError):
    """Raised for a system name that is not registered; its message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(cls=None, *, name: str | None = None, factory: Callable[[], System] | None = None):
    """Register a :class:`System` subclass (as a class decorator) or a named factory (a preset).

    ``@register`` uses ``cls.name``; ``register(name="two_body", factory=lambda: NBody(2))`` adds a preset.
    Registering a name twice replaces the earlier entry (so a plugin can override a built-in on purpose).
    """
    if factory is not None:
        if not name:
            raise ValueError("register(factory=...) needs a name")
        _REGISTRY[name] = factory
        return factory

    def wrap(c):
        key = name or getattr(c, "name", None)
        if not key:
            raise ValueError(f"{c.__name__} has no `name`; set the class attribute or pass register(name=...)")
        if not (isinstance(c, type) and issubclass(c, System)):
            raise TypeError(f"{c!r} is not a subclass of systems.System")
        _REGISTRY[key] = c
        return c

    return wrap(cls) if cls is not None else wrap


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
    """Import a user's Python file that registers systems; return the names it added or replaced."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plugin file not found: {path}")
    _load_builtins()
    before = dict(_REGISTRY)
    mod_name = f"metaham_plugin_{path.stem}_{abs(hash(path.resolve())) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    _sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    added = [k for k, v in _REGISTRY.items() if before.get(k) is not v]
    if not added:
        raise ValueError(f"plugin {path} registered no system (decorate a System subclass with @systems.register)")
    return added


__all__ = ["Param", "System", "UnknownSystemError", "register", "names", "get", "load_plugin"]
