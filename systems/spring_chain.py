"""Spring chain: N particles in the plane joined in a line by springs with a rest length (2N DOF).

H(q, p) = sum_i |p_i|^2 / (2 m) + sum_{i=1}^{N-1} k (|q_{i+1} - q_i| - l0)^2 / 2
(the many-particle mass-spring of graph-network dynamics benchmarks, e.g. Sanchez-Gonzalez et al. 2019,
"Hamiltonian Graph Networks with ODE Integrators", and Thangamuthu et al. 2022, "Unravelling the performance of
physics-informed graph neural networks for dynamical systems").

dq_i/dt = p_i / m,  dp_i/dt = sum over springs e = (i, j) at i of -k (|d_e| - l0) (q_i - q_j) / |d_e|.

Translation invariant (``external_field = False``); ``edges`` are the chain neighbours (i, i + 1). The registered
``spring_chain`` has 3 particles; ``SpringChain(n)`` builds any other length.

Sampler: a total energy E = f k l0^2 / 2 with f ~ U[0.05, 0.3]. Particles start on a straight chain of spacing l0
in a random direction, each displaced uniformly within a disc of radius rho = sqrt(E / (4 (N - 1) k)) (so the
springs hold at most E / 2), centred on the origin; the rest of E is kinetic, with a random momentum direction of
zero total momentum. Every spring then satisfies |(|d| - l0)| <= sqrt(2 E / k) <= 0.55 l0 for all time, so no
spring ever collapses to zero length and the motion is smooth and bounded (relative to the centre of mass).
"""
from __future__ import annotations

import math

import torch

from . import register
from .base import Param, System, pair_operators, random_direction, sampling_frame, uniform


class SpringChain(System):
    """Spring chain: H = sum |p_i|^2/(2m) + sum_i k (|q_{i+1} - q_i| - l0)^2 / 2."""

    params = (
        Param("m", 1.0, 0.5, 2.0, "mass of each particle"),
        Param("k", 1.0, 0.5, 2.0, "spring constant"),
        Param("l0", 1.0, 0.5, 1.5, "rest length of each spring"),
    )
    separable = True
    external_field = False
    reference = "Sanchez-Gonzalez et al. (2019), Hamiltonian Graph Networks with ODE Integrators"
    energy_fraction = (0.05, 0.3)

    def __init__(self, n: int = 3, name: str | None = None) -> None:
        if n < 2:
            raise ValueError(f"SpringChain needs at least 2 particles, got {n}")
        self.name = name or f"spring_chain_{n}"
        self.n_particles = n
        self.dof = 2 * n
        self._operator_cache: dict = {}

    def edges(self) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.n_particles - 1)]

    def _operators(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._operator_cache:
            self._operator_cache[key] = pair_operators(self.edges(), self.n_particles, like)
        return self._operator_cache[key]

    def _stretch(self, q, params):
        d = q[..., :-1, :] - q[..., 1:, :]  # (*batch, N-1, dim), q_i - q_{i+1}
        length = torch.linalg.vector_norm(d, dim=-1)
        return d, length, length - params["l0"][..., None]

    def hamiltonian(self, q, p, params):
        _, _, stretch = self._stretch(q, params)
        kinetic = (p**2).sum((-1, -2)) / (2 * params["m"])
        return kinetic + params["k"] * (stretch**2).sum(-1) / 2

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """Per call: spring vectors d_e = q_i - q_{i+1}, their lengths and the forces back on the particles are
        small matrix products on the flattened coordinates (see :func:`systems.base.pair_operators`), with
        -k (|d| - l0) / |d| = k (l0 / |d| - 1)."""
        n_springs = self.n_particles - 1  # full shapes, not (..., 1): see per_coordinate
        k, l0 = params["k"], params["l0"]
        minus_k, k_l0 = (x[..., None].expand(*x.shape, n_springs).contiguous() for x in (-k, k * l0))
        velocity = self.per_coordinate(1 / params["m"])

        def f(q, p):
            diff, norm2, spread = self._operators(q)
            d = q.flatten(-2) @ diff  # (..., 2 E)
            coef = torch.addcmul(minus_k, k_l0, torch.rsqrt((d * d) @ norm2))  # k (l0 / |d| - 1)
            return p * velocity, ((coef @ spread) * d @ diff.mT).unflatten(-1, (-1, 2))

        return f

    def sample_initial_state(self, params, generator):
        """E = f k l0^2/2, f ~ U[0.05, 0.3]: straight chain plus small displacements, the rest of E kinetic."""
        params, like = sampling_frame(params)
        m, k, l0 = params["m"], params["k"], params["l0"]
        b, n = m.shape[0], self.n_particles
        energy = uniform(generator, (b,), *self.energy_fraction, torch.float64) * k * l0**2 / 2
        along = random_direction(generator, b)[:, None, :] * l0[:, None, None]
        q = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)[None, :, None] * along
        rho = torch.sqrt(energy / (4 * (n - 1) * k))
        radial = rho[:, None] * torch.sqrt(uniform(generator, (b, n), 0.0, 1.0, torch.float64))
        angle = uniform(generator, (b, n), 0.0, 2 * math.pi, torch.float64)
        q = q + radial[..., None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
        q = q - q.mean(1, keepdim=True)
        potential = self.hamiltonian(q, torch.zeros_like(q), params)
        direction = torch.randn((b, n, 2), generator=generator, dtype=torch.float64)
        direction = direction - direction.mean(1, keepdim=True)  # equal masses: zero total momentum
        direction = direction / torch.linalg.vector_norm(direction, dim=(-1, -2), keepdim=True)
        p = direction * torch.sqrt(2 * m * (energy - potential).clamp_min(0))[:, None, None]
        return q.to(like), p.to(like)


register(name="spring_chain", factory=lambda: SpringChain(3, name="spring_chain"))
