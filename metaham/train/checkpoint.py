"""Checkpoints as plain dicts, written atomically and loaded with ``weights_only=True``.

Atomic (:mod:`metaham.atomic`): an interrupted write never leaves a half-written checkpoint where a good one
was. Plain: tensors, numbers, strings, lists
and dicts only, so that loading never unpickles arbitrary objects.

Building the state is kept apart from reading and writing it: :func:`capture_state` gathers the state dicts
of a run's stateful parts (model, optimizer, LR schedule, sparsity scheduler: anything with ``state_dict``)
and the random generators of torch, numpy and Python; :func:`restore_state` puts them back, so a resumed
run draws the same numbers as one that never stopped.
"""
from __future__ import annotations

import io
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from metaham.atomic import atomic_write_bytes
from metaham.errors import UserError


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Save a plain dict (tensors on any device are moved to CPU) atomically with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(obj), buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: truncated, foreign, or holding objects a plain checkpoint never
    holds (refused, not unpickled). The message names the file."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing file is a ``FileNotFoundError``, any
    other problem a :class:`CheckpointError`, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects that a metaham checkpoint never holds (not unpickled)"
        ) from exc
    except Exception as exc:  # torch raises several types for truncated or foreign files
        # torch's messages run to paragraphs; the first sentence says what failed.
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable metaham checkpoint, truncated or foreign ({first_line})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a metaham checkpoint (expected a dict, found {type(obj).__name__})")
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Stateful(Protocol):
    """Anything a checkpoint can hold: modules, optimizers, LR schedulers, the sparsity scheduler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def capture_state(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """``{name: part.state_dict()}`` for every part, plus ``"rng"``: the generators' states (:func:`rng_state`)."""
    return {**{name: part.state_dict() for name, part in parts.items()}, "rng": rng_state()}


def restore_state(state: Mapping[str, Any], parts: Mapping[str, Stateful]) -> None:
    """Load each part's state dict from ``state`` and set the random generators as they were."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """The states of torch's (CPU, and CUDA where present), numpy's and Python's global generators, as plain
    values that load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any] | torch.Tensor) -> None:
    """Restore :func:`rng_state`'s generators. A bare tensor (checkpoints written before numpy and Python
    were included) restores torch's CPU generator alone."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state.cpu())
        return
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
