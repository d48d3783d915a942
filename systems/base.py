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
from typing import Callable, ClassVar, Mapping

import torch
from torch import Tensor

Params = Mapping[str, Tensor]
Field = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


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

    def field(self, params: Params) -> Field:
        """The vector field with ``params`` bound: ``f(q, p) -> (dq/dt, dp/dt)``, what integrators call (thousands
        of times per batch, where each tensor operation costs a fixed few microseconds). The default calls
        :meth:`vector_field`; a system may override ``field`` to do the parameter-only arithmetic once, and then
        define ``vector_field(q, p, params)`` as ``self.field(params)(q, p)``."""
        return lambda q, p: self.vector_field(q, p, params)

    def per_coordinate(self, x: Tensor) -> Tensor:
        """A per-row quantity ``x`` of shape ``param_batch`` as a contiguous ``(*param_batch, n_particles, dim)``
        tensor. For fields: multiplying ``(B, n, dim)`` by ``(B, 1, 1)`` broadcasts along the short inner axes,
        which torch runs ~2-4x slower than an elementwise product of equal shapes."""
        return x[..., None, None].expand(*x.shape, self.n_particles, self.dim).contiguous()

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


def surplus_axis(params: Params) -> Tensor:
    """The unit vector ``(1, 0)`` along the live coordinate of a 1-DOF system, with the dtype and device of its
    parameters: a 1-DOF field is ``(x * axis, y * axis)``, one product each, with the surplus component exactly 0."""
    like = next(iter(params.values()))
    return torch.tensor((1.0, 0.0), dtype=like.dtype, device=like.device)


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


def pair_operators(edges: list[tuple[int, int]], n: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense operators for pair interactions on flattened 2-D coordinates ``(..., 2 n)`` (x, y per particle):

    * ``diff`` ``(2 n, 2 E)``: ``q.flatten(-2) @ diff`` gives ``d_e = q_i - q_j`` of each edge ``e = (i, j)``,
      as ``(..., 2 E)`` (x, y per edge); its transpose takes pair forces ``f_e`` (acting ``+f_e`` on ``i`` and
      ``-f_e`` on ``j``) to per-particle forces: ``f @ diff.T``, ``(..., 2 n)``;
    * ``norm2`` ``(2 E, E)``: ``(d * d) @ norm2`` gives ``|d_e|^2``;
    * ``spread`` ``(E, 2 E)``: ``s @ spread`` repeats a per-edge scalar for x and y.

    Small matrix products rather than indexing, transposes or reductions over the short x-y axis: one fast
    kernel each, batched over any leading shape (torch's reductions and transposes over axes of length 2-3 cost
    ~10x more per element), and friendly to ``torch.func``.
    """
    incidence = edge_incidence(edges, n, like)
    eye = torch.eye(2, dtype=like.dtype, device=like.device)
    diff = torch.kron(incidence, eye)
    spread = torch.kron(torch.eye(len(edges), dtype=like.dtype, device=like.device), eye.new_ones(1, 2))
    return diff, spread.T.contiguous(), spread
