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
_BUILTIN = {"gcn": "metaham.hamiltonian.gcn", "sparse_equivariant": "metaham.hamiltonian.equivariant"}


def register_backbone(name: str):
    """Class decorator: make a backbone available to ``HamiltonianGNN(backbone=name)``."""

    def wrap(cls):
        _BACKBONES[name] = cls
        return cls

    return wrap


def backbone_names() -> list[str]:
    """Names of every available backbone, sorted."""
    return sorted(set(_BACKBONES) | set(_BUILTIN))


def build_backbone(name: str, hidden: int, layers: int, **options) -> nn.Module:
    """A fresh backbone; ``ValueError`` naming the known backbones for an unknown ``name``."""
    if name not in _BACKBONES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BACKBONES:
        raise InvalidValueError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}")
    return _BACKBONES[name](hidden=hidden, layers=layers, **options)
