"""A user-defined system as a plugin: two harmonic oscillators coupled by a quartic term (a 2-DOF law).

    metaham systems --plugin examples/coupled_quartic.py coupled_quartic
    metaham simulate --plugin examples/coupled_quartic.py --system coupled_quartic --plot quartic.png

H(q, p) = |p|^2 / (2 m) + k (x^2 + y^2) / 2 + lam x^2 y^2,
dq/dt = p / m,  dp_x/dt = -k x - 2 lam x y^2,  dp_y/dt = -k y - 2 lam x^2 y.

The Pullen-Edmonds oscillator: regular at low energy, mostly chaotic as lam E / k^2 grows. Like Henon-Heiles it
is one particle in a 2-D polynomial well, but its well has the square's symmetry where Henon-Heiles has the
triangle's, and every orbit is bounded (lam > 0), so no energy has an escape channel.
"""
import torch

import systems
from systems.base import Param, System, random_direction, sample_in_well, sampling_frame, uniform


@systems.register
class CoupledQuartic(System):
    """Pullen-Edmonds oscillator: H = |p|^2/(2m) + k |q|^2/2 + lam x^2 y^2 (one particle, 2-DOF)."""

    name = "coupled_quartic"
    n_particles = 1
    dof = 2
    params = (
        Param("m", 1.0, 0.5, 2.0, "mass"),
        Param("k", 1.0, 0.5, 2.0, "stiffness of both oscillators"),
        Param("lam", 1.0, 0.5, 2.0, "quartic coupling"),
    )
    separable = True  # H = T(p) + V(q): leapfrog applies
    external_field = True  # H depends on the absolute position q (the well's centre and axes)
    reference = "Pullen and Edmonds (1981), J. Phys. A 14, L477; Carnegie and Percival (1984), J. Phys. A 17, 801"

    def potential(self, q, params):
        """V(x, y) = k (x^2 + y^2) / 2 + lam x^2 y^2, shape ``batch``."""
        x, y = q[..., 0, 0], q[..., 0, 1]
        return params["k"] * (x**2 + y**2) / 2 + params["lam"] * x**2 * y**2

    def hamiltonian(self, q, p, params):
        return (p[..., 0, :] ** 2).sum(-1) / (2 * params["m"]) + self.potential(q, params)

    def vector_field(self, q, p, params):
        m, k, lam = params["m"][..., None], params["k"][..., None], params["lam"][..., None]
        x, y = q[..., 0, 0:1], q[..., 0, 1:2]
        # The coupling's force on x grows with y^2 and on y with x^2: (2 lam x y^2, 2 lam x^2 y).
        force = -k * q[..., 0, :] - 2 * lam * torch.cat([x * y**2, x**2 * y], dim=-1)
        return p / m[..., None], force[..., None, :]

    def sample_initial_state(self, params, generator):
        """E ~ U[0.1, 1]; q uniform in {V < E}; p isotropic with |p| = sqrt(2 m (E - V(q)))."""
        params, like = sampling_frame(params)  # CPU float64 draws: the same states for any dtype or device
        m, k = params["m"], params["k"]
        n = m.shape[0]
        energy = uniform(generator, (n,), 0.1, 1.0, torch.float64)
        # V >= k |q|^2 / 2, so the well {V < E} lies in the square |x|, |y| <= sqrt(2 E / k).
        reach = torch.sqrt(2 * energy / k)[:, None, None].expand(n, 1, 2)
        q = sample_in_well(lambda x: self.potential(x, params), energy, -reach, reach, generator)
        speed = torch.sqrt(2 * m * (energy - self.potential(q, params)).clamp_min(0))
        p = (speed[:, None] * random_direction(generator, n))[:, None, :]
        return q.to(like), p.to(like)
