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

Orbit screen (three_body, ``screen_horizon=10``): Lagrange's triangle is unstable, and with that noise about 13%
of draws bring two bodies closer than 0.1 within t = 10 (40% closer than 0.2) and some eject a body: orbits
that are neither bounded nor resolvable at a fixed step. Each candidate is therefore integrated with a coarse
leapfrog (dt = 0.01) up to the horizon, and rejected when a pair comes closer than 0.25 x the initial smallest
separation or moves farther than 3 x the initial largest; rejected rows are redrawn. Nothing is promised after
the horizon (the paper's trajectories end at t = 10). Two bodies need no screen: with E < 0 every orbit is a
bounded ellipse, and the clipped noise keeps E < 0.
"""
from __future__ import annotations

import math

import torch

from . import register
from .base import Param, System, edge_incidence, pair_operators, sampling_frame, uniform


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
        """Index tensors ``i, j`` of the pairs i < j, their signed incidence matrix ``C`` (n, P) and ``-C^T``,
        built once per device and dtype (the vector field runs thousands of times per batch)."""
        key = (like.device, like.dtype)
        if key not in self._pair_cache:
            edges = self.edges()
            i, j = (torch.tensor(idx, device=like.device) for idx in zip(*edges))
            incidence = edge_incidence(edges, self.n_particles, like)
            self._pair_cache[key] = (i, j, incidence, (-incidence.T).contiguous())
        return self._pair_cache[key]

    def _pair_terms(self, q, params):
        """Masses ``(*batch, n)``, pair differences ``dx, dy`` (x_i - x_j, ``(*batch, P)``), squared distances and
        G m_i m_j. The differences are one matrix product with the incidence matrix: fewer tensor operations
        than gathering, which is what batched integration pays for."""
        i, j, incidence, _ = self._pairs(q)
        m = self.masses(params)
        dx, dy = q[..., 0] @ incidence, q[..., 1] @ incidence
        gmm = params["G"][..., None] * m.index_select(-1, i) * m.index_select(-1, j)
        return m, dx, dy, dx * dx + dy * dy, gmm

    def hamiltonian(self, q, p, params):
        m, _, _, dist2, gmm = self._pair_terms(q, params)
        kinetic = ((p**2).sum(-1) / (2 * m)).sum(-1)
        return kinetic - (gmm * torch.rsqrt(dist2)).sum(-1)

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """Masses, G m_i m_j and 1/m once; per call a handful of small matrix products on the flattened
        coordinates (see :func:`systems.base.pair_operators`): few and cheap tensor operations, which is what
        batched integration pays for."""
        m = self.masses(params)
        i, j, _, _ = self._pairs(m)
        minus_gmm = -params["G"][..., None] * m.index_select(-1, i) * m.index_select(-1, j)
        velocity = (1 / m)[..., None].expand(*m.shape, self.dim).contiguous()  # full shape: see per_coordinate

        def f(q, p):
            diff, norm2, spread = self._operators(q)
            d = q.flatten(-2) @ diff  # (..., 2 P): q_i - q_j per pair
            dist2 = (d * d) @ norm2
            weight = minus_gmm * torch.rsqrt(dist2) / dist2  # -G m_i m_j / |q_i - q_j|^3
            return p * velocity, ((weight @ spread) * d @ diff.mT).unflatten(-1, (-1, 2))

        return f

    def _operators(self, like: torch.Tensor):
        key = ("operators", like.device, like.dtype)
        if key not in self._pair_cache:
            self._pair_cache[key] = pair_operators(self.edges(), self.n_particles, like)
        return self._pair_cache[key]

    def sample_initial_state(self, params, generator):
        """Regular N-gon of radius r ~ U[radius_range], circular speeds times noise, zero total momentum;
        with ``screen_horizon``, each row takes the first of several candidates that passes the screen."""
        params, like = sampling_frame(params)
        if not self.screen_horizon:
            q, p = self._draw(params, generator)
            return q.to(like), p.to(like)
        n_rows = next(iter(params.values())).shape[0]
        q = torch.empty(n_rows, self.n_particles, self.dim, dtype=torch.float64)
        p = torch.empty_like(q)
        missing = torch.arange(n_rows)
        for _ in range(self._MAX_ROUNDS):
            # Several candidates per missing row in one batch: a screening round costs about the same per-step
            # overhead whatever its batch, so few wide rounds beat many narrow ones.
            k = max(2, min(self._CANDIDATES, self._ROUND_ROWS // max(1, missing.numel())))
            sub = {name: v[missing].repeat_interleave(k) for name, v in params.items()}
            q_c, p_c = self._draw(sub, generator)
            passed = self._screen(q_c, p_c, sub).view(missing.numel(), k)
            found = passed.any(1)
            pick = (torch.arange(missing.numel()) * k + passed.to(torch.uint8).argmax(1))[found]
            q[missing[found]], p[missing[found]] = q_c[pick], p_c[pick]
            missing = missing[~found]
            if not missing.numel():
                return q.to(like), p.to(like)
        raise RuntimeError(f"{self.name}: no initial state passed the orbit screen in {self._MAX_ROUNDS} rounds")

    # Screen: reject close encounters (a pair closer than MIN_RATIO x the initial smallest separation) and escapes
    # (a pair farther than MAX_RATIO x the initial largest separation) before ``screen_horizon``.
    _MIN_RATIO, _MAX_RATIO, _SCREEN_STEP = 0.25, 3.0, 0.01
    _MAX_ROUNDS, _CANDIDATES, _ROUND_ROWS = 20, 8, 4096

    def _screen(self, q, p, params) -> torch.Tensor:
        # A coarse leapfrog is enough to detect a close encounter or an escape. It is written out here (rather
        # than calling metaham.integrate, which systems/ must not import) so that each step computes the pair
        # differences once, for the force and the distances alike.
        _, _, incidence, back = self._pairs(q)
        m, dx, dy, dist2, gmm = self._pair_terms(q, params)
        inv_m = (1 / m)[..., None]
        closest, farthest = (self._MIN_RATIO**2) * dist2.amin(-1), (self._MAX_RATIO**2) * dist2.amax(-1)
        lowest, highest = dist2.amin(-1), dist2.amax(-1)
        h = self._SCREEN_STEP
        force = self.vector_field(q, p, params)[1]
        for _ in range(math.ceil(self.screen_horizon / h)):
            p = p + (0.5 * h) * force
            q = q + h * p * inv_m
            dx, dy = q[..., 0] @ incidence, q[..., 1] @ incidence
            dist2 = dx * dx + dy * dy
            w = gmm * torch.rsqrt(dist2) / dist2
            force = torch.stack([(w * dx) @ back, (w * dy) @ back], dim=-1)
            p = p + (0.5 * h) * force
            lowest, highest = torch.minimum(lowest, dist2.amin(-1)), torch.maximum(highest, dist2.amax(-1))
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
