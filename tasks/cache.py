"""The on-disk cache of simulated pools, and the stable hashing it (and every seed derivation) rests on.

A pool file is a plain dict written atomically with :func:`metaham.train.save_checkpoint` and read back with
``weights_only=True``. Its name carries the system and a SHA-256 key of everything that determines its
content (package data version, the system's source and description, parameter ranges, the simulation part
of the :class:`~tasks.config.TaskConfig`, the seed); the key is also stored inside, so a file is used only
when it matches exactly. Delete the folder at any time to force re-simulation.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from metaham.train.checkpoint import load_checkpoint, save_checkpoint

# Bump when the way pools are simulated or stored changes, so that old cache files are not reused.
DATA_VERSION = 1


def default_cache_dir() -> Path:
    """``$METAHAM_CACHE/tasks`` if set, else ``~/.cache/metaham/tasks``."""
    root = os.environ.get("METAHAM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "metaham") / "tasks"


def digest(obj: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable value (keys sorted, so dict order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed determined by ``parts`` (stable across processes and platforms, unlike ``hash``)."""
    return int(digest(list(parts))[:15], 16)


def pool_path(cache_dir: Path, system: str, key: str) -> Path:
    return cache_dir / f"{system}-{key[:20]}.pt"


def load_pool(path: Path, key: str) -> dict[str, Any] | None:
    """The cached pool at ``path`` if it exists and carries ``key``; None otherwise (a damaged file is
    reported and then ignored, so it gets re-simulated and overwritten)."""
    if not path.is_file():
        return None
    try:
        data = load_checkpoint(path)
    except ValueError as exc:
        warnings.warn(f"ignoring unreadable task cache file ({exc}); re-simulating", stacklevel=3)
        return None
    return data if data.get("key") == key else None


def save_pool(path: Path, data: dict[str, Any]) -> None:
    save_checkpoint(data, path)


def cache_files(cache_dir: Path | None = None, systems: list[str] | None = None) -> list[Path]:
    """The pool files under ``cache_dir`` (default :func:`default_cache_dir`), optionally of some systems only,
    sorted by name. Only files named as :func:`pool_path` names them are listed, so a cache folder shared with
    other files never loses those."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    files = [f for f in cache_dir.glob("*-*.pt") if f.is_file() and len(f.stem.rsplit("-", 1)[-1]) == 20]
    if systems is not None:
        files = [f for f in files if file_system(f) in systems]
    return sorted(files)


def file_system(path: Path) -> str:
    """The system a pool file belongs to, read from its name."""
    return path.stem.rsplit("-", 1)[0]
