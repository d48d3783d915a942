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


# -- helpers shared by the systems' samplers and vector fields -------------------------------------------------
def uniform(
    generator: torch.Generator, shape: tuple[int, ...], low: float | Tensor, high: float | Tensor, dtype: torch.dtype
) -> Tensor:
    """Uniform samples in [low, high) drawn in float64 (reproducible across dtypes), cast to ``dtype``.
    ``low`` and ``high`` may be tensors that broadcast against ``shape``."""
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)


def sampling_frame(params: Params) -> tuple[dict[str, Tensor], Tensor]:
    """The parameters as CPU float64 tensors, plus a tensor whose dtype and device the samples go back to.

    Samplers draw on the CPU in float64 (``torch.Generator`` is a CPU object), so a seed gives the same initial
    states for float32 and float64, on any device; they return ``q.to(like), p.to(like)``.
    """
    like = next(iter(params.values())) if params else torch.zeros(())
    return {k: torch.as_tensor(v).detach().to("cpu", torch.float64) for k, v in params.items()}, like


def surplus_pad(x: Tensor) -> Tensor:
    """A 1-DOF quantity ``x`` of shape ``batch`` as one particle's 2-D vector ``(x, 0)``: ``(*batch, 1, 2)``.

    The second coordinate is the surplus coordinate of the module docstring.
    """
    return torch.nn.functional.pad(x[..., None], (0, 1))[..., None, :]


def random_direction(generator: torch.Generator, n: int) -> Tensor:
    """``n`` unit vectors in the plane with uniformly distributed angle, float64, shape ``(n, 2)``."""
    angle = uniform(generator, (n,), 0.0, 2 * math.pi, torch.float64)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def sample_in_well(
    potential,
    energy: Tensor,
    low: Tensor,
    high: Tensor,
    generator: torch.Generator,
    max_rounds: int = 1000,
) -> Tensor:
    """Positions uniform over the part of a box where ``potential(q) < energy``, by rejection (float64).

    Args:
        potential: ``V(q)`` for ``q`` of shape ``(B, n, dim)``, returning ``(B,)`` (row i uses row i's parameters).
        energy: ``(B,)`` energy of each row.
        low, high: corners of the box to draw from, broadcastable to ``(B, n, dim)``; the box must contain the
            allowed region the caller wants (e.g. the bounded well, not an escape channel).

    Returns:
        ``q`` of shape ``(B, n, dim)`` with ``potential(q) < energy`` in every row. Rounds redraw every row and
        keep the rows that are still missing, so the cost is batched, not a loop over rows.
    """
    low, high = torch.broadcast_tensors(low, high)
    q = torch.empty_like(low)
    missing = torch.ones(low.shape[0], dtype=torch.bool)
    for _ in range(max_rounds):
        candidate = uniform(generator, tuple(low.shape), low, high, torch.float64)
        accept = missing & (potential(candidate) < energy)
        q[accept] = candidate[accept]
        missing &= ~accept
        if not bool(missing.any()):
            return q
    raise RuntimeError(f"sample_in_well: {int(missing.sum())} rows found no point below their energy; check the box")


def edge_incidence(edges: list[tuple[int, int]], n: int, like: Tensor) -> Tensor:
    """Signed incidence matrix ``C`` of shape ``(n, E)``: ``C[i, e] = +1``, ``C[j, e] = -1`` for edge ``e = (i, j)``.

    A pair force ``f_e`` (acting on ``i``, and ``-f_e`` on ``j``) becomes per-particle forces ``C @ f``; one
    einsum, batched and friendly to ``torch.func`` (no in-place scatter).
    """
    c = torch.zeros(n, len(edges), dtype=like.dtype, device=like.device)
    for e, (i, j) in enumerate(edges):
        c[i, e] = 1.0
        c[j, e] = -1.0
    return c
