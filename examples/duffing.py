"""A user-defined system as a plugin: the undamped, unforced Duffing oscillator.

    metaham systems --plugin examples/duffing.py duffing
    metaham simulate --plugin examples/duffing.py --system duffing --plot duffing.png

H(q, p) = p^2 / (2 m) + alpha q^2 / 2 + beta q^4 / 4   (alpha, beta > 0: a hardening spring, every orbit bounded)
dq/dt = p / m,  dp/dt = -alpha q - beta q^3.

One degree of freedom: the oscillator lives in x, y is the surplus coordinate (kept at 0).
"""
import torch

import systems
from systems.base import Param, System, sampling_frame, surplus_pad, uniform


@systems.register
class Duffing(System):
    """Duffing oscillator: H = p^2/(2m) + alpha q^2/2 + beta q^4/4 (1-DOF, surplus y)."""

    name = "duffing"
    n_particles = 1
    dof = 1
    params = (
        Param("m", 1.0, 0.5, 2.0, "mass"),
        Param("alpha", 1.0, 0.5, 2.0, "linear stiffness"),
        Param("beta", 1.0, 0.1, 2.0, "cubic stiffness"),
    )
    separable = True  # H = T(p) + V(q): leapfrog applies
    external_field = True  # H depends on the absolute position q
    reference = "Duffing (1918); e.g. Strogatz, Nonlinear Dynamics and Chaos, sec. 7.6"

    def hamiltonian(self, q, p, params):
        m, alpha, beta = params["m"], params["alpha"], params["beta"]
        x, px = q[..., 0, 0], p[..., 0, 0]
        return px**2 / (2 * m) + alpha * x**2 / 2 + beta * x**4 / 4

    def vector_field(self, q, p, params):
        m, alpha, beta = params["m"], params["alpha"], params["beta"]
        x, px = q[..., 0, 0], p[..., 0, 0]
        return surplus_pad(px / m), surplus_pad(-alpha * x - beta * x**3)

    def sample_initial_state(self, params, generator):
        """E ~ U[0.1, 1]; q uniform between the turning points; p = +-sqrt(2 m (E - V(q)))."""
        params, like = sampling_frame(params)  # CPU float64 draws: the same states for any dtype or device
        m, alpha, beta = params["m"], params["alpha"], params["beta"]
        n = m.shape[0]
        energy = uniform(generator, (n,), 0.1, 1.0, torch.float64)
        q_max = torch.sqrt((torch.sqrt(alpha**2 + 4 * beta * energy) - alpha) / beta)
        x = q_max * uniform(generator, (n,), -1.0, 1.0, torch.float64)
        kinetic = (energy - alpha * x**2 / 2 - beta * x**4 / 4).clamp_min(0)
        sign = torch.where(uniform(generator, (n,), 0.0, 1.0, torch.float64) < 0.5, -1.0, 1.0).to(torch.float64)
        return surplus_pad(x).to(like), surplus_pad(sign * torch.sqrt(2 * m * kinetic)).to(like)
