"""YAML configs validated against a schema of defaults.

A schema is a nested dict of default values; its types are the allowed types (an int default also accepts
nothing but ints, a float default accepts ints and floats, ``None`` accepts anything). Unknown keys and wrong
types are :class:`ConfigError` that name the key and the file. ``--set a.b=value`` overrides are parsed as
YAML scalars (``--set train.lr=1e-3``, ``--set split.test=[pendulum]``).

Wherever a config file is expected, the name of a *shipped* config works too (``qh9``, ``meta_train_leave_pendulum``,
``splits/leave_pendulum``): the repository's ``configs/`` folder is installed as the package ``metaham.configs``,
so a wheel install finds its defaults from any working directory. A file on disk wins over a shipped name.

>>> shipped_config("qh9").name
'qh9.yaml'
>>> "splits/leave_pendulum" in shipped_config_names()
True
"""
from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from metaham.errors import UserError


# Where every run directory keeps its resolved config.
CONFIG_FILE = "config.yaml"


class ConfigError(UserError, ValueError):
    """A config file or override that does not match the schema; the message names the key."""


def shipped_configs_dir() -> Path:
    """The folder of the configs shipped with metaham (the repository's ``configs/``, wherever it is installed)."""
    # A regular package (configs/__init__.py) on the file system: files() is a real directory in wheel and
    # editable installs alike.
    return Path(str(importlib.resources.files("metaham.configs")))


def shipped_config_names() -> list[str]:
    """Names of the shipped configs: run configs (``qh9``, ``meta_train``, ...), then ``splits/<name>``."""
    root = shipped_configs_dir()
    runs = sorted(p.stem for p in root.glob("*.yaml"))
    splits = sorted(f"splits/{p.stem}" for p in (root / "splits").glob("*.yaml"))
    return runs + splits


def shipped_config(name: str) -> Path:
    """The shipped config called ``name`` (with or without ``.yaml``); :class:`ConfigError` lists the names."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem in shipped_config_names():
        return shipped_configs_dir() / f"{stem}.yaml"
    raise ConfigError(f"no shipped config named {name!r}; shipped configs: {', '.join(shipped_config_names())}")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """An existing file at ``name_or_path``, else the shipped config of that name; :class:`ConfigError` otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    # Only a bare name (no folder, other than splits/) may mean a shipped config: "configs/qh9.yaml" run from
    # another directory still finds the packaged copy, but "/data/my.yaml" that does not exist is an error.
    parent = path.parent.as_posix()
    candidate = f"splits/{stem}" if parent.endswith("splits") else stem
    if parent in (".", "configs", "splits", "configs/splits") and candidate in shipped_config_names():
        return shipped_configs_dir() / f"{candidate}.yaml"
    raise ConfigError(
        f"config file not found: {name_or_path} (a path, or a shipped config: {', '.join(shipped_config_names())})"
    )


def read_yaml(path: Path) -> Any:
    """The parsed YAML file ``path``; a file that is not UTF-8 YAML is a :class:`ConfigError` naming the file
    and, for a syntax error, the line and column, on one line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from exc


def load_config(
    schema: Mapping[str, Any], path: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Defaults from ``schema``, updated by the YAML file at ``path`` (a file, or a shipped config's name), then
    by ``key=value`` ``overrides``."""
    config = copy.deepcopy(dict(schema))
    if path is not None:
        path = resolve_config_path(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
        _merge(config, schema, data, prefix="", source=str(path))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(config, schema, nested, prefix="", source="--set")
    return config


def _merge(config: dict, schema: Mapping, data: Mapping, prefix: str, source: str) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(f"{prefix}{k}" for k in schema)
            raise ConfigError(f"{source}: unknown key {name!r} (known keys here: {known})")
        default = schema[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key {name!r} must be a mapping, got {value!r}")
            _merge(config[key], default, value, prefix=f"{name}.", source=source)
        else:
            config[key] = _check_type(name, default, value, source)


def _check_type(name: str, default: Any, value: Any, source: str) -> Any:
    if default is None or value is None and default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: key {name!r} must be {type(default).__name__} (like the default {default!r}), got {value!r}"
        )
    return value


def load_saved_config(run_dir: str | Path, schema: Mapping[str, Any], validate, kind: str) -> dict[str, Any]:
    """The config a run saved as ``RUN_DIR/config.yaml``, re-validated by ``validate(config, source=...)``;
    ``kind`` names the command that makes such run directories (for the error message)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found; is {run_dir} a {kind} run directory?")
    config = load_config(schema, path)
    validate(config, source=str(path))
    return config
