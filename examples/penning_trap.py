"""A user-defined system as a plugin: a charged particle in a uniform magnetic field and a harmonic trap.

    metaham systems --plugin examples/penning_trap.py penning_trap
    metaham simulate --plugin examples/penning_trap.py --system penning_trap --plot trap.png

The radial motion of an ion in a Penning-type trap (charge absorbed into B), in the symmetric gauge
A(q) = (B / 2) (-y, x):

H(q, p) = |p - A(q)|^2 / (2 m) + k |q|^2 / 2,   v = (p - A(q)) / m = dq/dt,
dp_x/dt = (B / 2) v_y - k x,   dp_y/dt = -(B / 2) v_x - k y.

Unlike the paper's systems, H couples q and p (``separable = False``: p is the canonical, not the kinetic,
momentum), and the orbits are epicycles: two circular motions at the frequencies
w_+- = (w_c / 2) (sqrt(1 + 4 w_0^2 / w_c^2) +- 1), w_c = B / m, w_0^2 = k / m. Every orbit is bounded (k > 0).
"""
import torch

import systems
from systems.base import Param, System, random_direction, sampling_frame, uniform


@systems.register
class PenningTrap(System):
    """Charged particle in a uniform field B z and a harmonic trap: H = |p - A(q)|^2/(2m) + k |q|^2/2."""

    name = "penning_trap"
    n_particles = 1
    dof = 2
    params = (
        Param("m", 1.0, 0.5, 2.0, "mass"),
        Param("B", 1.0, 0.5, 2.0, "magnetic field (times the charge)"),
        Param("k", 1.0, 0.5, 2.0, "trap stiffness"),
    )
    separable = False
    external_field = True  # H depends on the absolute position (the trap centre and the gauge origin)
    reference = "Brown and Gabrielse (1986), Geonium theory, Rev. Mod. Phys. 58, 233 (radial motion)"

    def hamiltonian(self, q, p, params):
        m, k = params["m"], params["k"]
        x = q[..., 0, :]
        kinetic = p[..., 0, :] - self._potential_vector(x, params)
        return (kinetic**2).sum(-1) / (2 * m) + k * (x**2).sum(-1) / 2

    def vector_field(self, q, p, params):
        m, field, k = params["m"], params["B"], params["k"]
        x = q[..., 0, :]
        velocity = (p[..., 0, :] - self._potential_vector(x, params)) / m[..., None]
        half = (field / 2)[..., None]
        # dp/dt = -dH/dq = (dA/dq)^T v - k q; with A = (B/2)(-y, x): ((B/2) v_y, -(B/2) v_x) - k q.
        force = half * torch.stack([velocity[..., 1], -velocity[..., 0]], dim=-1) - k[..., None] * x
        return velocity[..., None, :], force[..., None, :]

    @staticmethod
    def _potential_vector(x, params):
        half = (params["B"] / 2)[..., None]
        return half * torch.stack([-x[..., 1], x[..., 0]], dim=-1)

    def sample_initial_state(self, params, generator):
        """E ~ U[0.1, 1]; q uniform in the disk k |q|^2 / 2 < E; velocity of a random direction with the rest
        of the energy; p = m v + A(q) (the canonical momentum)."""
        params, like = sampling_frame(params)  # CPU float64 draws: the same states for any dtype or device
        m, k = params["m"], params["k"]
        n = m.shape[0]
        energy = uniform(generator, (n,), 0.1, 1.0, torch.float64)
        radius = torch.sqrt(2 * energy / k) * torch.sqrt(uniform(generator, (n,), 0.0, 1.0, torch.float64))
        x = radius[:, None] * random_direction(generator, n)
        speed = torch.sqrt((2 * (energy - k * radius**2 / 2) / m).clamp_min(0))
        velocity = speed[:, None] * random_direction(generator, n)
        p = m[:, None] * velocity + self._potential_vector(x, params)
        return x[:, None, :].to(like), p[:, None, :].to(like)
