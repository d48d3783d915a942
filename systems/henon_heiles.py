"""Henon-Heiles: one particle in a cubic (three-fold symmetric) potential well, 2 DOF, chaotic at high energy.

H(x, y, px, py) = (px^2 + py^2) / 2 + (x^2 + y^2) / 2 + lam (x^2 y - y^3 / 3)
(Henon and Heiles 1964, "The applicability of the third integral of motion", Astron. J. 69, 73; lam = 1
there. lam > 0 scales the well: x -> x / lam maps it to the lam = 1 well with energies times lam^2.)

dq/dt = p,  dpx/dt = -x - 2 lam x y,  dpy/dt = -y - lam (x^2 - y^2).

The well is the triangle bounded by V = 1 / (6 lam^2) (the escape energy); its corners are saddles at distance
1 / lam from the origin and beyond them the potential falls away. Orbits with E < 1 / (6 lam^2) that start
inside the triangle stay there forever.

Sampler: E = f / (6 lam^2) with f ~ U[0.1, 0.8] (a margin below escape); the position is uniform over the part
of the disc of radius 1 / lam where V < E (that part lies inside the triangle: outside it, within the disc,
V > 1 / (6 lam^2)); the momentum has a uniform direction and |p| = sqrt(2 (E - V)).
"""
from __future__ import annotations

import torch

from . import register
from .base import Param, System, random_direction, sample_in_well, sampling_frame, uniform


@register
class HenonHeiles(System):
    """Henon-Heiles: H = |p|^2/2 + |q|^2/2 + lam (x^2 y - y^3/3), bounded below E = 1/(6 lam^2)."""

    name = "henon_heiles"
    n_particles = 1
    dof = 2
    params = (Param("lam", 1.0, 0.5, 1.5, "strength of the cubic coupling"),)
    separable = True
    external_field = True
    reference = "Henon and Heiles (1964), Astron. J. 69, 73"
    escape_fraction = (0.1, 0.8)

    @staticmethod
    def potential(q, lam):
        """V(x, y) = (x^2 + y^2)/2 + lam (x^2 y - y^3/3), shape ``batch``."""
        x, y = q[..., 0, 0], q[..., 0, 1]
        return (x**2 + y**2) / 2 + lam * (x**2 * y - y**3 / 3)

    def hamiltonian(self, q, p, params):
        return (p[..., 0, :] ** 2).sum(-1) / 2 + self.potential(q, params["lam"])

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """dq/dt = p, dp/dt = -(x + 2 lam x y, y + lam (x^2 - y^2)), in few tensor operations per call."""
        lam = params["lam"][..., None]  # shaped (..., 1) like x and y below
        lam2 = 2 * lam

        def f(q, p):
            x, y = q.unbind(-1)  # (..., 1) each
            x2_y2 = torch.addcmul(x * x, y, y, value=-1)
            return p, -torch.stack([torch.addcmul(x, lam2, x * y), torch.addcmul(y, lam, x2_y2)], dim=-1)

        return f

    def sample_initial_state(self, params, generator):
        """E = f/(6 lam^2), f ~ U[0.1, 0.8]; q uniform in {V < E} inside the well; p isotropic, |p| = sqrt(2(E-V))."""
        params, like = sampling_frame(params)
        lam = params["lam"]
        n = lam.shape[0]
        energy = uniform(generator, (n,), *self.escape_fraction, torch.float64) / (6 * lam**2)
        # Draw in the square around the disc of radius 1/lam and keep points inside the disc with V < E.
        radius = (1 / lam)[:, None, None]

        def inside(q):
            in_disc = (q**2).sum(-1)[..., 0] < radius[:, 0, 0] ** 2
            return torch.where(in_disc, self.potential(q, lam), torch.inf)

        q = sample_in_well(inside, energy, -radius.expand(n, 1, 2), radius.expand(n, 1, 2), generator)
        speed = torch.sqrt(2 * (energy - self.potential(q, lam)).clamp_min(0))
        p = (speed[:, None] * random_direction(generator, n))[:, None, :]
        return q.to(like), p.to(like)
