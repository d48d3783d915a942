"""Checkpoints as plain dicts, written atomically and loaded with ``weights_only=True``.

Atomic (:mod:`metaham.atomic`): an interrupted write never leaves a half-written checkpoint where a good one
was. Plain: tensors, numbers, strings, lists
and dicts only, so that loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from metaham.atomic import atomic_write_bytes


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Save a plain dict (tensors on any device are moved to CPU) atomically with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(obj), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable metaham checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a metaham checkpoint (expected a dict, found {type(obj).__name__})")
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
