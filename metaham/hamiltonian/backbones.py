"""The registry of backbones of :class:`~metaham.hamiltonian.HamiltonianGNN`.

A backbone turns a particle state into invariant features that the energy read-out sums into H. The contract:

* constructor ``Backbone(hidden: int, layers: int, **options)``;
* ``forward(q, p, edge_index) -> (node, edge)`` with ``q, p`` of shape ``(..., n, 2)``, ``edge_index`` of
  shape ``(2, E)`` (see :mod:`metaham.hamiltonian.graph`), ``node`` of shape ``(..., n, hidden)`` and
  ``edge`` of shape ``(..., E, hidden)``, or ``None`` when ``E == 0``;
* smooth in ``q`` and ``p`` (MAML through a Hamiltonian network differentiates three times), and written
  with plain tensor operations so that ``torch.func.grad`` and ``vmap`` trace it.

Register a new one with ``@register_backbone("name")`` in a module listed in ``_BUILTIN`` (imported on
first use) or in any module the user imports first.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from metaham.errors import InvalidValueError

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# name -> module that registers it; imported lazily so that importing the model stays cheap.
_BUILTIN = {"gcn": "metaham.hamiltonian.gcn", "equivariant": "metaham.hamiltonian.equivariant"}
# Former names -> current ones: still accepted, so that configs and checkpoints written before a rename load.
# ``sparse_equivariant`` (until 2026-12-08) named gates that the backbone leaves off (docs/meta-learning.md).
RENAMED = {"sparse_equivariant": "equivariant"}


def register_backbone(name: str):
    """Class decorator: make a backbone available to ``HamiltonianGNN(backbone=name)``."""

    def wrap(cls):
        _BACKBONES[name] = cls
        return cls

    return wrap


def backbone_names() -> list[str]:
    """Names of every available backbone, sorted (former names in :data:`RENAMED` are accepted too)."""
    return sorted(set(_BACKBONES) | set(_BUILTIN))


def current_name(name: str) -> str:
    """``name``, or the current name of a renamed backbone."""
    return RENAMED.get(name, name)


def build_backbone(name: str, hidden: int, layers: int, **options) -> nn.Module:
    """A fresh backbone; ``ValueError`` naming the known backbones for an unknown ``name``."""
    name = current_name(name)
    if name not in _BACKBONES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BACKBONES:
        raise InvalidValueError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}")
    return _BACKBONES[name](hidden=hidden, layers=layers, **options)
