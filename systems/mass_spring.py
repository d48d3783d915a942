"""Ideal mass-spring (1-DOF harmonic oscillator).

H(q, p) = p^2 / (2 m) + k q^2 / 2  (Greydanus et al. 2019, "Hamiltonian Neural Networks", sec. 4.1).

Coordinates: the oscillator lives in x; y is the surplus coordinate (always 0). Initial states are drawn
by energy, E ~ U[0.2, 1] as in HNN, at a uniform phase angle, so every orbit is a bounded ellipse.
"""
from __future__ import annotations

import math

import torch

from . import register
from .base import Param, System, sampling_frame, surplus_axis, surplus_pad, uniform


@register
class MassSpring(System):
    """Ideal mass-spring: H = p^2/(2m) + k q^2/2 (1-DOF, surplus y)."""

    name = "mass_spring"
    n_particles = 1
    dof = 1
    params = (
        Param("m", 1.0, 0.5, 2.0, "mass"),
        Param("k", 1.0, 0.5, 2.0, "spring constant"),
    )
    separable = True
    external_field = True
    reference = "Greydanus, Dzamba, Yosinski (2019), Hamiltonian Neural Networks, sec. 4.1"
    energy_range = (0.2, 1.0)

    def hamiltonian(self, q, p, params):
        m, k = params["m"], params["k"]
        return p[..., 0, 0] ** 2 / (2 * m) + k * q[..., 0, 0] ** 2 / 2

    def vector_field(self, q, p, params):
        return self.field(params)(q, p)

    def field(self, params):
        """dq/dt = p / m, dp/dt = -k q on the live coordinate, 0 on the surplus one (two products per call)."""
        axis = surplus_axis(params)
        velocity = axis / params["m"][..., None, None]
        spring = axis * -params["k"][..., None, None]
        return lambda q, p: (p * velocity, q * spring)

    def sample_initial_state(self, params, generator):
        """E ~ U[0.2, 1], phase ~ U[0, 2 pi): q = sqrt(2E/k) cos(phase), p = sqrt(2Em) sin(phase)."""
        params, like = sampling_frame(params)
        m, k = params["m"], params["k"]
        n = m.shape[0]
        energy = uniform(generator, (n,), *self.energy_range, torch.float64)
        phase = uniform(generator, (n,), 0.0, 2 * math.pi, torch.float64)
        q = surplus_pad(torch.sqrt(2 * energy / k) * torch.cos(phase))
        p = surplus_pad(torch.sqrt(2 * energy * m) * torch.sin(phase))
        return q.to(like), p.to(like)
