"""YAML configs validated against a schema of defaults.

A schema is a nested dict of default values; its types are the allowed types (an int default also accepts
nothing but ints, a float default accepts ints and floats, ``None`` accepts anything). Unknown keys and wrong
types are :class:`ConfigError` that name the key and the file. ``--set a.b=value`` overrides are parsed as
YAML scalars (``--set train.lr=1e-3``, ``--set split.test=[pendulum]``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml


# Where every run directory keeps its resolved config.
CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A config file or override that does not match the schema; the message names the key."""


def load_config(
    schema: Mapping[str, Any], path: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Defaults from ``schema``, updated by the YAML file at ``path``, then by ``key=value`` ``overrides``."""
    config = copy.deepcopy(dict(schema))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
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
