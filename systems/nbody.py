"""Gravitational N-body in the plane, any N; ``two_body`` and ``three_body`` are registered presets.

H(q, p) = sum_i |p_i|^2 / (2 m_i) - sum_{i<j} G m_i m_j / |q_i - q_j|
(Newtonian gravity; the two- and three-body tasks of Greydanus et al. 2019, "Hamiltonian Neural Networks",
sec. 4.3 and appendix).

dq_i/dt = p_i / m_i,  dp_i/dt = -sum_{j != i} G m_i m_j (q_i - q_j) / |q_i - q_j|^3.

Parameters: G and one mass per particle (m1, m2, ...). H depends only on differences q_i - q_j, so the system
is translation invariant (``external_field = False``); every pair interacts (``edges`` = all pairs).

Sampler (near-circular orbits, zero total momentum, centre of mass at the origin): the bodies sit on a regular
N-gon of radius r ~ U[radius_range] at a random rotation, shifted so that the centre of mass is at the origin;
each body gets the tangential speed of a circular orbit for the radial part of the net force it feels,
v_i = sqrt(F_i,radial |q_i| / m_i), all turning the same (random) way, times a noise factor; then the centre-of-mass
velocity is removed. For two bodies (any masses), three bodies (any masses: Lagrange's equilateral solution) and
equal masses on any N-gon this is an exact circular solution before the noise. Presets follow HNN:
two_body r ~ U[0.5, 1.5] with speed factor 1 + 0.05 N(0, 1) (clipped at 3 sigma); three_body r ~ U[0.9, 1.2]
with speed factor U[0.8, 1.2], per body.
"""
from __future__ import annotations

import math

import torch

from . import register
from .base import Param, System, edge_incidence, sampling_frame, uniform


class NBody(System):
    """Gravitational N-body: H = sum |p_i|^2/(2 m_i) - sum_{i<j} G m_i m_j / |q_i - q_j|."""

    separable = True
    external_field = False
    reference = "Newtonian gravity; Greydanus, Dzamba, Yosinski (2019), Hamiltonian Neural Networks, sec. 4.3"

    def __init__(
        self,
        n: int = 2,
        name: str | None = None,
        radius_range: tuple[float, float] = (0.5, 1.5),
        speed_noise: float = 0.05,
        noise: str = "normal",
        screen_horizon: float | None = None,
    ) -> None:
        """``n`` bodies; ``noise`` is ``"normal"`` (factor 1 + speed_noise N(0,1), clipped at 3 sigma) or
        ``"uniform"`` (factor U[1 - speed_noise, 1 + speed_noise]) on each body's circular speed.
        ``screen_horizon``: redraw initial states whose orbit has a close encounter or an escape before this
        time (see the module docstring); ``None`` skips the check (two bodies never need it)."""
        if n < 2:
            raise ValueError(f"NBody needs at least 2 bodies, got {n}")
        if noise not in ("normal", "uniform"):
            raise ValueError(f"noise must be 'normal' or 'uniform', got {noise!r}")
        self.name = name or f"nbody_{n}"
        self.n_particles = n
        self.dof = 2 * n
        self.params = (Param("G", 1.0, 0.5, 2.0, "gravitational constant"),) + tuple(
            Param(f"m{i + 1}", 1.0, 0.5, 1.5, f"mass of body {i + 1}") for i in range(n)
        )
        self.radius_range = radius_range
        self.speed_noise = speed_noise
        self.noise = noise
        self.screen_horizon = screen_horizon
        self._pair_cache: dict = {}

    def masses(self, params) -> torch.Tensor:
        """Masses stacked along a last axis: ``(*param_batch, n)``."""
        return torch.stack([params[f"m{i + 1}"] for i in range(self.n_particles)], dim=-1)

    def _pairs(self, like: torch.Tensor):
        """Index tensors ``i, j`` of the pairs i < j and their signed incidence matrix ``(n, P)``, built once per
        device and dtype (the vector field runs thousands of times per batch)."""
        key = (like.device, like.dtype)
        if key not in self._pair_cache:
            edges = self.edges()
            i, j = (torch.tensor(idx, device=like.device) for idx in zip(*edges))
            self._pair_cache[key] = (i, j, edge_incidence(edges, self.n_particles, like))
        return self._pair_cache[key]

    def _pair_terms(self, q, params):
        # index_select rather than q[..., i, :], and components rather than .sum(-1): both several times
        # faster on CPU for these small trailing axes.
        i, j, _ = self._pairs(q)
        m = self.masses(params)
        diff = q.index_select(-2, i) - q.index_select(-2, j)  # (*batch, P, dim), q_i - q_j
        dist2 = diff[..., 0] ** 2 + diff[..., 1] ** 2
        gmm = params["G"][..., None] * m.index_select(-1, i) * m.index_select(-1, j)  # (*batch, P)
        return m, diff, dist2, gmm

    def hamiltonian(self, q, p, params):
        m, _, dist2, gmm = self._pair_terms(q, params)
        kinetic = ((p**2).sum(-1) / (2 * m)).sum(-1)
        return kinetic - (gmm / torch.sqrt(dist2)).sum(-1)

    def vector_field(self, q, p, params):
        m, diff, dist2, gmm = self._pair_terms(q, params)
        pull = -(gmm * dist2**-1.5)[..., None] * diff  # force on i from j; j feels the opposite
        dp = torch.einsum("ne,...ed->...nd", self._pairs(q)[2], pull)
        return p / m[..., None], dp

    def _pair_distances(self, q):
        """``|q_i - q_j|`` for the pairs i < j, shape ``(*batch, P)``."""
        i, j, _ = self._pairs(q)
        diff = q.index_select(-2, i) - q.index_select(-2, j)
        return torch.sqrt(diff[..., 0] ** 2 + diff[..., 1] ** 2)

    def sample_initial_state(self, params, generator):
        """Regular N-gon of radius r ~ U[radius_range], circular speeds times noise, zero total momentum;
        with ``screen_horizon``, rows whose orbit fails the screen are redrawn (batched, in rounds)."""
        params, like = sampling_frame(params)
        q, p = self._draw(params, generator)
        if self.screen_horizon:
            ok = self._screen(q, p, params)
            for _ in range(self._MAX_ROUNDS):
                if bool(ok.all()):
                    break
                # Redraw the failed rows, several candidates each: a round costs the same per-step overhead
                # whatever its batch, so one wide round beats many narrow ones.
                rows = (~ok).nonzero()[:, 0]
                k = self._CANDIDATES
                sub = {name: v[rows].repeat_interleave(k) for name, v in params.items()}
                q_c, p_c = self._draw(sub, generator)
                passed = self._screen(q_c, p_c, sub).view(len(rows), k)
                found = passed.any(1)
                pick = (torch.arange(len(rows)) * k + passed.to(torch.uint8).argmax(1))[found]
                q[rows[found]], p[rows[found]] = q_c[pick], p_c[pick]
                ok[rows[found]] = True
            else:
                raise RuntimeError(f"{self.name}: no initial state passed the orbit screen in {self._MAX_ROUNDS} rounds")
        return q.to(like), p.to(like)

    # Screen: reject close encounters (a pair closer than MIN_RATIO x the initial smallest separation) and escapes
    # (a pair farther than MAX_RATIO x the initial largest separation) before ``screen_horizon``.
    _MIN_RATIO, _MAX_RATIO, _SCREEN_STEP, _MAX_ROUNDS, _CANDIDATES = 0.25, 3.0, 0.01, 20, 8

    def _screen(self, q, p, params) -> torch.Tensor:
        # A coarse leapfrog is enough to detect a close encounter or an escape; it lives here rather than in
        # metaham.integrate because systems/ must not import the layers above it.
        m = self.masses(params)[..., None]
        dist = self._pair_distances(q)
        closest, farthest = self._MIN_RATIO * dist.amin(-1), self._MAX_RATIO * dist.amax(-1)
        lowest, highest = dist.amin(-1), dist.amax(-1)
        h = self._SCREEN_STEP
        force = self.vector_field(q, p, params)[1]
        for _ in range(math.ceil(self.screen_horizon / h)):
            p = p + 0.5 * h * force
            q = q + h * p / m
            force = self.vector_field(q, p, params)[1]
            p = p + 0.5 * h * force
            dist = self._pair_distances(q)
            lowest, highest = torch.minimum(lowest, dist.amin(-1)), torch.maximum(highest, dist.amax(-1))
        return (lowest >= closest) & (highest <= farthest)

    def _draw(self, params, generator):
        m = self.masses(params)  # (B, n)
        b, n = m.shape
        radius = uniform(generator, (b, 1), *self.radius_range, torch.float64)
        angle = uniform(generator, (b, 1), 0.0, 2 * math.pi, torch.float64) + 2 * math.pi * torch.arange(n) / n
        q = radius[..., None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
        q = q - (m[..., None] * q).sum(1, keepdim=True) / m.sum(1)[:, None, None]
        _, force = self.vector_field(q, torch.zeros_like(q), params)
        dist = torch.linalg.vector_norm(q, dim=-1)
        inward = -(force * q).sum(-1) / dist
        speed = torch.sqrt(inward.clamp_min(0) * dist / m)
        turn = torch.where(uniform(generator, (b, 1), 0.0, 1.0, torch.float64) < 0.5, -1.0, 1.0).to(torch.float64)
        tangent = turn[..., None] * torch.stack([-q[..., 1], q[..., 0]], dim=-1) / dist[..., None]
        if self.noise == "normal":
            z = torch.randn((b, n), generator=generator, dtype=torch.float64).clamp(-3, 3)
            factor = 1 + self.speed_noise * z
        else:
            factor = uniform(generator, (b, n), 1 - self.speed_noise, 1 + self.speed_noise, torch.float64)
        v = (speed * factor)[..., None] * tangent
        v = v - (m[..., None] * v).sum(1, keepdim=True) / m.sum(1)[:, None, None]
        return q, m[..., None] * v


register(name="two_body", factory=lambda: NBody(2, name="two_body", radius_range=(0.5, 1.5), speed_noise=0.05))
register(
    name="three_body",
    factory=lambda: NBody(
        3, name="three_body", radius_range=(0.9, 1.2), speed_noise=0.2, noise="uniform", screen_horizon=10.0
    ),
)
