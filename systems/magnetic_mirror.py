"""Magnetic mirror: a charged particle in an axisymmetric mirror field, reduced to the meridional plane (2 DOF).

Field: B_z = B0 (1 + (z/L)^2), B_r = -B0 r z / L^2, from the vector potential A_theta = B0 r (1 + (z/L)^2) / 2
(exactly divergence-free; the paraxial mirror of e.g. F. F. Chen, "Introduction to Plasma Physics", sec. 2.3.3).
In cylindrical coordinates theta is cyclic, so the canonical angular momentum p_theta = m r^2 dtheta/dt + e r A_theta
is conserved and the motion in (r, z) has the Hamiltonian (Goldstein, "Classical Mechanics", sec. 8.1)

    H(r, z, p_r, p_z) = (p_r^2 + p_z^2) / (2 m) + (p_theta - e r A_theta)^2 / (2 m r^2)
                      = (p_r^2 + p_z^2) / (2 m) + u^2 / (2 m),   u = p_theta / r - eB0 r g(z) / 2,  g = 1 + z^2/L^2.

dq/dt = p / m,  dp_r/dt = (u / m) (p_theta / r^2 + eB0 g / 2),  dp_z/dt = (u / m) eB0 r z / L^2.

Coordinates: x = r (distance from the axis, > 0), y = z (along the axis). Parameters: m, eB0 (charge times
B0, > 0), L (mirror length), p_theta.

Why p_theta < 0 (opposite in sign to eB0): then u^2 = (|p_theta| / r + eB0 r g / 2)^2 >= 2 |p_theta| eB0 g(z), so
the effective potential V = u^2 / (2m) >= |p_theta| eB0 (1 + z^2/L^2) / m grows without bound in z and in r and
diverges at r -> 0: every orbit is bounded by energy conservation alone (these are the axis-encircling orbits).
With the same sign, V has a zero-energy valley r^2 = 2 p_theta / (eB0 g(z)) reaching to |z| -> infinity and
confinement rests only on the approximate adiabatic invariant (particles in the loss cone escape), which a
sampler cannot guarantee. ``check_params`` therefore rejects p_theta >= 0.

The system is separable (V depends on q only), so leapfrog applies.

Sampler: E = V_min (1 + f), f ~ U[0.1, 1], V_min = |p_theta| eB0 / m the bottom of the well at
r0 = sqrt(2 |p_theta| / eB0), z = 0; the position is uniform over {V < E} (rejection from the box that bounds
it: |z| <= L sqrt(E / V_min - 1), r between the roots of eB0 r^2 / 2 - sqrt(2 m E) r + |p_theta| = 0), the
momentum has a uniform direction and |p| = sqrt(2 m (E - V)). The cap f <= 1 keeps the inner turning point
r >= 0.41 r0 away from the 1/r^2 wall, so the fastest local frequency stays below ~16 (0.99-quantile ~11) over
the default parameter ranges and dt = 0.01 resolves every orbit.
"""
from __future__ import annotations

from typing import Mapping

import torch

from . import register
from .base import Param, System, random_direction, sample_in_well, sampling_frame, uniform


@register
class MagneticMirror(System):
    """Charged particle in a magnetic mirror, meridional plane: H = |p|^2/(2m) + (p_theta/r - eB0 r g(z)/2)^2/(2m)."""

    name = "magnetic_mirror"
    n_particles = 1
    dof = 2
    params = (
        Param("m", 1.0, 0.5, 2.0, "particle mass"),
        Param("eB0", 1.0, 0.5, 2.0, "charge times the field on the mid-plane"),
        Param("L", 2.0, 1.0, 3.0, "mirror length: B doubles at |z| = L"),
        Param(
            "p_theta", -1.0, -2.0, -0.5, "canonical angular momentum (< 0: axis-encircling, bounded)", positive=False
        ),
    )
    separable = True
    external_field = True
    reference = "Chen, Introduction to Plasma Physics, sec. 2.3.3; Goldstein, Classical Mechanics, sec. 8.1"
    energy_excess = (0.1, 1.0)

    def check_params(self, values: Mapping[str, float]) -> None:
        super().check_params(values)
        if "p_theta" in values and float(values["p_theta"]) >= 0:
            raise ValueError(
                f"parameter 'p_theta' of system 'magnetic_mirror' must be < 0 (opposite in sign to eB0, so that "
                f"the orbit is bounded), got {values['p_theta']}"
            )

    @staticmethod
    def _u(q, params):
        r, z = q[..., 0, 0], q[..., 0, 1]
        g = 1 + (z / params["L"]) ** 2
        return params["p_theta"] / r - params["eB0"] * r * g / 2

    def potential(self, q, params):
        """V(r, z) = (p_theta / r - eB0 r (1 + z^2/L^2) / 2)^2 / (2 m), shape ``batch``."""
        return self._u(q, params) ** 2 / (2 * params["m"])

    def hamiltonian(self, q, p, params):
        return (p[..., 0, :] ** 2).sum(-1) / (2 * params["m"]) + self.potential(q, params)

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """With a = p_theta / r and b = eB0 g(z) / 2 = eB0 / 2 + (eB0 / (2 L^2)) z^2: u = a - b r,
        dp_r/dt = (u / m) (a / r + b), dp_z/dt = (u / m) (eB0 / L^2) r z. Written for few tensor operations per
        call (they dominate the cost of batched integration); the parameter-only factors are made once here."""
        m, eb0, length, p_theta = params["m"], params["eB0"], params["L"], params["p_theta"]
        half, curvature = eb0 / 2, eb0 / (2 * length**2)
        # Per-row factors shaped (..., 1) like r and z below, and (..., 1, 2) like dp: equal shapes run fastest.
        factors = torch.stack([1 / m, eb0 / (length**2 * m)], dim=-1)[..., None, :]  # for (u (a/r + b), u r z)
        half, curvature, p_theta = half[..., None], curvature[..., None], p_theta[..., None]
        velocity = self.per_coordinate(1 / m)

        def f(q, p):
            r, z = q.unbind(-1)  # (..., 1) each
            inv_r = r.reciprocal()
            a = p_theta * inv_r
            b = torch.addcmul(half, curvature, z * z)
            u = torch.addcmul(a, b, r, value=-1)
            dp = torch.stack([torch.addcmul(b, a, inv_r) * u, u * r * z], dim=-1) * factors
            return p * velocity, dp

        return f

    def sample_initial_state(self, params, generator):
        """E = V_min (1 + f), f ~ U[0.1, 1]; q uniform in {V < E}; p isotropic with |p| = sqrt(2 m (E - V))."""
        params, like = sampling_frame(params)
        m, eb0, length, a = params["m"], params["eB0"], params["L"], -params["p_theta"]
        n = m.shape[0]
        v_min = a * eb0 / m
        energy = v_min * (1 + uniform(generator, (n,), *self.energy_excess, torch.float64))
        s = torch.sqrt(2 * m * energy)
        root = torch.sqrt((s**2 - 2 * a * eb0).clamp_min(0))
        r_lo, r_hi = (s - root) / eb0, (s + root) / eb0
        z_max = length * torch.sqrt(energy / v_min - 1)
        low = torch.stack([r_lo, -z_max], dim=-1)[:, None, :]
        high = torch.stack([r_hi, z_max], dim=-1)[:, None, :]
        q = sample_in_well(lambda x: self.potential(x, params), energy, low, high, generator)
        speed = torch.sqrt(2 * m * (energy - self.potential(q, params)).clamp_min(0))
        p = (speed[:, None] * random_direction(generator, n))[:, None, :]
        return q.to(like), p.to(like)
