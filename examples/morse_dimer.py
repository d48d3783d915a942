"""A user-defined system as a plugin: two atoms bound by a Morse potential, in the plane.

    metaham systems --plugin examples/morse_dimer.py morse_dimer
    metaham simulate --plugin examples/morse_dimer.py --system morse_dimer --plot morse.png

H(q, p) = (|p_1|^2 + |p_2|^2) / (2 m) + D (1 - exp(-a (r - r0)))^2,   r = |q_1 - q_2|
dq_i/dt = p_i / m,  dp_1/dt = -V'(r) (q_1 - q_2) / r = -dp_2/dt,  V'(r) = 2 a D e (1 - e),  e = exp(-a (r - r0)).

Unlike the paper's systems this law depends only on the distance between the particles: it is invariant under
rotations and translations of the plane (``external_field = False``), the case an equivariant backbone is built
for. Every sampled state has energy below the dissociation energy D (in the centre-of-mass frame), so every
orbit is bounded.
"""
import torch

import systems
from systems.base import Param, System, random_direction, sampling_frame, uniform


@systems.register
class MorseDimer(System):
    """Two particles in the plane with a Morse bond: H = sum |p_i|^2/(2m) + D (1 - exp(-a (r - r0)))^2."""

    name = "morse_dimer"
    n_particles = 2
    dof = 4
    params = (
        Param("m", 1.0, 0.5, 2.0, "mass of each particle"),
        Param("D", 1.0, 0.5, 2.0, "dissociation energy (well depth)"),
        Param("a", 1.0, 0.5, 2.0, "inverse width of the well"),
        Param("r0", 1.0, 0.8, 1.5, "bond length"),
    )
    separable = True  # H = T(p) + V(q): leapfrog applies
    external_field = False  # V depends on |q_1 - q_2| only
    reference = "Morse, Phys. Rev. 34, 57 (1929)"

    def hamiltonian(self, q, p, params):
        m, depth, a, r0 = (params[k] for k in ("m", "D", "a", "r0"))
        r = torch.linalg.vector_norm(q[..., 0, :] - q[..., 1, :], dim=-1)
        return (p**2).sum((-1, -2)) / (2 * m) + depth * (1 - torch.exp(-a * (r - r0))) ** 2

    def vector_field(self, q, p, params):
        m, depth, a, r0 = (params[k] for k in ("m", "D", "a", "r0"))
        d = q[..., 0, :] - q[..., 1, :]
        r = torch.linalg.vector_norm(d, dim=-1)
        e = torch.exp(-a * (r - r0))
        force_on_1 = -(2 * a * depth * e * (1 - e) / r)[..., None] * d
        return p / m[..., None, None], torch.stack([force_on_1, -force_on_1], dim=-2)

    def sample_initial_state(self, params, generator):
        """Centre of mass in [-1, 1]^2 at rest; bond along a random direction with r in r0 + [-0.3, 0.6] / a
        (potential <= 0.2 D); relative kinetic energy U[0, 0.3 D] along a random direction: total < D."""
        params, like = sampling_frame(params)
        m, depth, a, r0 = (params[k] for k in ("m", "D", "a", "r0"))
        n = m.shape[0]
        centre = uniform(generator, (n, 2), -1.0, 1.0, torch.float64)
        r = r0 + uniform(generator, (n,), -0.3, 0.6, torch.float64) / a
        half = 0.5 * r[:, None] * random_direction(generator, n)
        kinetic = depth * uniform(generator, (n,), 0.0, 0.3, torch.float64)
        # Equal and opposite momenta (total zero): kinetic energy 2 |p_1|^2 / (2 m) = |p_1|^2 / m.
        p1 = torch.sqrt(kinetic * m)[:, None] * random_direction(generator, n)
        q = torch.stack([centre + half, centre - half], dim=1)
        return q.to(like), torch.stack([p1, -p1], dim=1).to(like)
