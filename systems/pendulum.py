"""Ideal pendulum (1-DOF), librating orbits only.

H(q, p) = p^2 / (2 m l^2) + m g l (1 - cos q),  q the angle from the downward vertical, p = m l^2 dq/dt
(Greydanus et al. 2019, "Hamiltonian Neural Networks", sec. 4.1, which uses g = 3, m = l = 1).

dq/dt = p / (m l^2),  dp/dt = -m g l sin q.

Coordinates: the angle lives in x; y is the surplus coordinate (always 0).

Sampler: the energy is a fraction f ~ U[0.1, 0.8] of the separatrix energy E_sep = 2 m g l, so every orbit
librates (no rotation over the top) with amplitude q_max = arccos(1 - E / (m g l)) <= 2.21 rad. The initial
angle is uniform in [-q_max, q_max] and the sign of p is random, |p| = sqrt(2 m l^2 (E - V(q))): a random point
on the orbit of energy E (uniform in angle, not in time).
"""
from __future__ import annotations

import torch

from . import register
from .base import Param, System, sampling_frame, surplus_axis, surplus_pad, uniform


@register
class Pendulum(System):
    """Ideal pendulum: H = p^2/(2 m l^2) + m g l (1 - cos q) (1-DOF, surplus y)."""

    name = "pendulum"
    n_particles = 1
    dof = 1
    params = (
        Param("m", 1.0, 0.5, 2.0, "bob mass"),
        Param("l", 1.0, 0.5, 2.0, "rod length"),
        Param("g", 3.0, 1.0, 10.0, "gravitational acceleration (HNN uses 3)"),
    )
    separable = True
    external_field = True
    reference = "Greydanus, Dzamba, Yosinski (2019), Hamiltonian Neural Networks, sec. 4.1"
    separatrix_fraction = (0.1, 0.8)

    def hamiltonian(self, q, p, params):
        m, l, g = params["m"], params["l"], params["g"]
        return p[..., 0, 0] ** 2 / (2 * m * l**2) + m * g * l * (1 - torch.cos(q[..., 0, 0]))

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """dq/dt = p / (m l^2), dp/dt = -m g l sin q on the live coordinate, 0 on the surplus one."""
        m, l, g = params["m"], params["l"], params["g"]
        axis = surplus_axis(params)
        velocity = axis / (m * l**2)[..., None, None]
        torque = axis * (-m * g * l)[..., None, None]
        return lambda q, p: (p * velocity, torch.sin(q) * torque)

    def sample_initial_state(self, params, generator):
        """E = f * 2 m g l with f ~ U[0.1, 0.8]; angle uniform between the turning points; random sign of p."""
        params, like = sampling_frame(params)
        m, l, g = params["m"], params["l"], params["g"]
        n = m.shape[0]
        energy = uniform(generator, (n,), *self.separatrix_fraction, torch.float64) * 2 * m * g * l
        amplitude = torch.arccos(1 - energy / (m * g * l))
        angle = amplitude * uniform(generator, (n,), -1.0, 1.0, torch.float64)
        kinetic = (energy - m * g * l * (1 - torch.cos(angle))).clamp_min(0)
        sign = torch.where(uniform(generator, (n,), 0.0, 1.0, torch.float64) < 0.5, -1.0, 1.0).to(torch.float64)
        momentum = sign * torch.sqrt(2 * m * l**2 * kinetic)
        return surplus_pad(angle).to(like), surplus_pad(momentum).to(like)
