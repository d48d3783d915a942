"""Meta-train / meta-test splits of the systems, named in YAML under ``configs/splits/`` (shipped with metaham).

Three kinds (the keys each YAML file takes):

* ``leave_one_out`` -- ``systems`` (a list) and ``held_out`` (one of them): meta-train on the others,
  meta-test on the held-out system (the paper's cross-domain setting).
* ``explicit`` -- ``train_systems`` and ``test_systems`` (lists).
* ``parametric`` -- one ``system`` and ``train_ranges`` / ``test_ranges``, each parameter name -> ``[low, high]``
  (same law, new parameters); parameters not named keep the system's own range.

Every file may also set ``name`` (default: the file name) and ``description``. Mistakes are
:class:`~metaham.train.config.ConfigError` that name the file and key; unknown systems list the known ones.

>>> from tasks import load_split, TaskConfig
>>> split = load_split("leave_pendulum")
>>> split.train_systems, split.test_systems
(('mass_spring', 'henon_heiles', 'magnetic_mirror'), ('pendulum',))
>>> train = split.train_distribution(TaskConfig(), seed=0)   # a TaskDistribution
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import systems as _systems
from metaham.train.config import ConfigError, read_yaml, shipped_configs_dir

from .cache import derive_seed
from .config import TaskConfig
from .distribution import TaskDistribution
from .pool import resolve_ranges

KINDS = {
    "leave_one_out": ("systems", "held_out"),
    "explicit": ("train_systems", "test_systems"),
    "parametric": ("system", "train_ranges", "test_ranges"),
}
_COMMON = ("name", "kind", "description")

SystemRanges = dict[str, dict[str, tuple[float, float]]]


@dataclass(frozen=True)
class Split:
    """Which systems (and parameter ranges) tasks are meta-trained and meta-tested on.

    ``train_ranges`` / ``test_ranges``: system -> parameter -> ``(low, high)``, only where they differ from
    the system's own ranges (parametric splits).
    """

    name: str
    kind: str
    train_systems: tuple[str, ...]
    test_systems: tuple[str, ...]
    train_ranges: SystemRanges = field(default_factory=dict)
    test_ranges: SystemRanges = field(default_factory=dict)
    description: str = ""

    def train_distribution(self, config: TaskConfig | None = None, *, seed: int = 0, **kwargs: Any) -> TaskDistribution:
        """The meta-training :class:`TaskDistribution` (``kwargs``: ``cache_dir``, ``cache``, ``progress``)."""
        return TaskDistribution(self.train_systems, config, seed=seed, param_ranges=self.train_ranges, **kwargs)

    def test_distribution(self, config: TaskConfig | None = None, *, seed: int = 0, **kwargs: Any) -> TaskDistribution:
        """The meta-test :class:`TaskDistribution`. Its pools use a seed derived from ``seed``, so even a
        system on both sides gets fresh parameter draws and trajectories."""
        return TaskDistribution(
            self.test_systems, config, seed=derive_seed("test", seed), param_ranges=self.test_ranges, **kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready record of the resolved split (what a checkpoint stores)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "train_systems": list(self.train_systems),
            "test_systems": list(self.test_systems),
            "train_ranges": {s: {k: list(v) for k, v in r.items()} for s, r in self.train_ranges.items()},
            "test_ranges": {s: {k: list(v) for k, v in r.items()} for s, r in self.test_ranges.items()},
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "split", default_name: str = "") -> "Split":
        """Validate a split written in the YAML schema above; errors name ``source`` and the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping, found {type(data).__name__}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{source}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        allowed = _COMMON + KINDS[kind]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"{source}: unknown key {key!r} for a {kind} split (allowed: {', '.join(allowed)})")
        for key in KINDS[kind]:
            if key not in data:
                raise ConfigError(f"{source}: a {kind} split needs the key {key!r}")
        name = _string(data.get("name", default_name), "name", source)
        if not name:
            raise ConfigError(f"{source}: key 'name' is missing")
        description = _string(data.get("description", ""), "description", source)
        train_ranges: SystemRanges = {}
        test_ranges: SystemRanges = {}
        if kind == "leave_one_out":
            pool = _system_list(data["systems"], "systems", source)
            held_out = _system_name(data["held_out"], "held_out", source)
            if held_out not in pool:
                raise ConfigError(f"{source}: key 'held_out': {held_out!r} is not in 'systems' {list(pool)}")
            if len(pool) < 2:
                raise ConfigError(f"{source}: key 'systems': leave-one-out needs at least two systems")
            train, test = tuple(s for s in pool if s != held_out), (held_out,)
        elif kind == "explicit":
            train = _system_list(data["train_systems"], "train_systems", source)
            test = _system_list(data["test_systems"], "test_systems", source)
        else:
            system = _system_name(data["system"], "system", source)
            train, test = (system,), (system,)
            train_ranges = {system: _ranges(system, data["train_ranges"], "train_ranges", source)}
            test_ranges = {system: _ranges(system, data["test_ranges"], "test_ranges", source)}
        return cls(name, kind, train, test, train_ranges, test_ranges, description)


def splits_dir() -> Path:
    """The folder of the shipped splits (``configs/splits/`` of the repository, installed with metaham)."""
    return shipped_configs_dir() / "splits"


def split_names() -> list[str]:
    """Names of the shipped splits."""
    return sorted(p.stem for p in splits_dir().glob("*.yaml"))


def load_split(name_or_path: str | Path) -> Split:
    """A split by name (``configs/splits/<name>.yaml``) or from a YAML file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = splits_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown split {str(name_or_path)!r}; named splits: {', '.join(split_names()) or 'none'} "
                f"(in {splits_dir()}), or give the path of a YAML file"
            )
    if not path.is_file():
        raise ConfigError(f"split file not found: {path}")
    data = read_yaml(path)
    return Split.from_dict(data or {}, source=str(path), default_name=path.stem)


# -- validation helpers ------------------------------------------------------------------------------------
def _string(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: key {key!r} must be a string, got {value!r}")
    return value


def _system_name(value: Any, key: str, source: str) -> str:
    name = _string(value, key, source)
    known = _systems.names()
    if name not in known:
        raise ConfigError(f"{source}: key {key!r}: unknown system {name!r}; known systems: {', '.join(known)}")
    return name


def _system_list(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: key {key!r} must be a non-empty list of system names, got {value!r}")
    names = tuple(_system_name(v, key, source) for v in value)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: key {key!r} lists {', '.join(duplicates)} twice")
    return names


def _ranges(system: str, value: Any, key: str, source: str) -> dict[str, tuple[float, float]]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{source}: key {key!r} must map parameter names to [low, high], got {value!r}")
    physics = _systems.get(system)
    out = {}
    for param, bounds in value.items():
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise ConfigError(f"{source}: key '{key}.{param}' must be [low, high], got {bounds!r}")
        try:
            resolve_ranges(physics, {param: bounds})
        except ValueError as exc:
            raise ConfigError(f"{source}: key '{key}.{param}': {exc}") from None
        out[str(param)] = (float(bounds[0]), float(bounds[1]))
    return out
