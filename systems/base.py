"""The contract every physical system fulfils.

A system is a Hamiltonian H(q, p; theta) over ``n_particles`` particles in ``dim`` = 2 spatial dimensions,
with physical parameters theta, an initial-state sampler that yields bounded orbits, and the exact vector
field (dq/dt, dp/dt) = (dH/dp, -dH/dq).

Shapes (used by every system, integrator and task):

* ``q``, ``p``: ``(*batch, n_particles, dim)``, float32 or float64.
* ``params``: a dict ``name -> tensor`` whose shapes broadcast against ``batch`` (usually ``(B,)`` for ``q`` of
  shape ``(B, n, dim)``, or ``(B, 1)`` against a trajectory ``(B, T, n, dim)``).
* ``hamiltonian`` returns ``batch``; ``vector_field`` returns two tensors shaped like ``q``.

One-degree-of-freedom systems (mass-spring, pendulum) live in the first coordinate of their single particle;
the second coordinate is a *surplus coordinate*: H does not depend on it and the samplers set it (and its
momentum) to zero, so it stays zero along every trajectory. This is how the paper puts 1-DOF systems on the
same 2-D particle graph as the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

Params = Mapping[str, Tensor]


@dataclass(frozen=True)
class Param:
    """A physical parameter: its default, the range tasks sample it from, and whether it must be positive."""

    name: str
    default: float
    low: float
    high: float
    doc: str = ""
    positive: bool = True

    def __post_init__(self) -> None:
        if not self.low <= self.default <= self.high:
            raise ValueError(f"parameter {self.name!r}: default {self.default} outside [{self.low}, {self.high}]")


class System:
    """Base class of a physical system. Subclass it, set the class attributes, implement the three methods.

    Class attributes: ``name`` (registry key), ``n_particles``, ``dim`` (2), ``dof`` (true degrees of
    freedom), ``params`` (a tuple of :class:`Param`), ``separable`` (H = T(p) + V(q): leapfrog applies),
    ``external_field`` (H depends on absolute positions, so it is not translation invariant),
    ``reference`` (where the formula comes from).
    """

    name: ClassVar[str]
    n_particles: ClassVar[int] = 1
    dim: ClassVar[int] = 2
    dof: ClassVar[int] = 2
    params: ClassVar[tuple[Param, ...]] = ()
    separable: ClassVar[bool] = True
    external_field: ClassVar[bool] = True
    reference: ClassVar[str] = ""

    # -- physics ---------------------------------------------------------------------------------------------
    def hamiltonian(self, q: Tensor, p: Tensor, params: Params) -> Tensor:
        """H(q, p; params), shape ``batch``."""
        raise NotImplementedError

    def vector_field(self, q: Tensor, p: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """Exact (dq/dt, dp/dt) = (dH/dp, -dH/dq), each shaped like ``q``."""
        raise NotImplementedError

    def sample_initial_state(self, params: Params, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One initial state per parameter row: ``params`` tensors of shape ``(B,)`` -> ``q, p`` of shape
        ``(B, n_particles, dim)``, on bounded orbits."""
        raise NotImplementedError

    # -- graph -----------------------------------------------------------------------------------------------
    def edges(self) -> list[tuple[int, int]]:
        """Undirected pairs (i, j), i < j, of interacting particles. Default: all pairs."""
        n = self.n_particles
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    # -- parameters ------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"system {self.name!r} has no parameter {name!r}; its parameters: {', '.join(self.param_names) or 'none'}")

    def check_params(self, values: Mapping[str, float]) -> None:
        """Raise ``ValueError`` naming the first unknown, non-finite or non-positive parameter."""
        for key, value in values.items():
            if key not in self.param_names:
                raise ValueError(
                    f"unknown parameter {key!r} for system {self.name!r}; its parameters: {', '.join(self.param_names) or 'none'}"
                )
            if not math.isfinite(float(value)):
                raise ValueError(f"parameter {key!r} of system {self.name!r} must be finite, got {value}")
            if self.param(key).positive and float(value) <= 0:
                raise ValueError(f"parameter {key!r} of system {self.name!r} must be > 0, got {value}")

    def default_params(self, n: int, dtype: torch.dtype = torch.float64, **overrides: float) -> dict[str, Tensor]:
        """``n`` copies of the default parameters, with ``overrides`` applied (validated)."""
        self.check_params(overrides)
        return {
            p.name: torch.full((n,), float(overrides.get(p.name, p.default)), dtype=dtype) for p in self.params
        }

    def sample_params(
        self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64, **fixed: float
    ) -> dict[str, Tensor]:
        """``n`` parameter draws, each uniform in its sampling range; names in ``fixed`` are held at that value."""
        self.check_params(fixed)
        out = {}
        for p in self.params:
            if p.name in fixed:
                out[p.name] = torch.full((n,), float(fixed[p.name]), dtype=dtype)
            else:
                u = torch.rand(n, generator=generator, dtype=torch.float64)
                out[p.name] = (p.low + (p.high - p.low) * u).to(dtype)
        return out

    def describe(self) -> dict:
        """A JSON-ready description (what ``metaham systems`` prints)."""
        return {
            "name": self.name,
            "particles": self.n_particles,
            "dim": self.dim,
            "dof": self.dof,
            "separable": self.separable,
            "external_field": self.external_field,
            "edges": [list(e) for e in self.edges()],
            "params": [
                {"name": p.name, "default": p.default, "low": p.low, "high": p.high, "doc": p.doc} for p in self.params
            ],
            "reference": self.reference,
            "summary": (self.__doc__ or "").strip().splitlines()[0] if self.__doc__ else "",
        }


def uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, dtype: torch.dtype) -> Tensor:
    """Uniform samples in [low, high) drawn in float64 (reproducible across dtypes), cast to ``dtype``."""
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)
