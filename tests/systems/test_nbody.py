"""Kepler two-body checks: the circular-orbit period and the conserved quantities."""
import math

import torch

import systems
from metaham.integrate import simulate


def _circular(m1, m2, g, a):
    """Two bodies on a circular orbit of separation a about their centre of mass at the origin."""
    total = m1 + m2
    speed = math.sqrt(g * total / a)  # relative speed
    q = torch.tensor([[[m2 / total * a, 0.0], [-m1 / total * a, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[0.0, m2 / total * speed], [0.0, -m1 / total * speed]]], dtype=torch.float64)
    p = v * torch.tensor([m1, m2], dtype=torch.float64)[None, :, None]
    params = {k: torch.tensor([x], dtype=torch.float64) for k, x in (("G", g), ("m1", m1), ("m2", m2))}
    return params, q, p


def _invariants(system, q, p, params):
    energy = system.hamiltonian(q, p, params)
    momentum = p.sum(-2)
    angular = (q[..., 0] * p[..., 1] - q[..., 1] * p[..., 0]).sum(-1)
    return energy, momentum, angular


def test_circular_orbit_period_is_keplers():
    system = systems.get("two_body")
    m1, m2, g, a = 0.7, 1.3, 1.5, 1.2
    params, q0, p0 = _circular(m1, m2, g, a)
    period = 2 * math.pi * math.sqrt(a**3 / (g * (m1 + m2)))
    t = torch.tensor([0.0, period / 2, period], dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-12, atol=1e-12)
    # After one Kepler period the orbit closes; a period off by a relative 1e-6 would leave a gap of
    # 2 pi a 1e-6 along the orbit.
    gap = float((q[-1] - q0).abs().max())
    assert gap <= 2 * math.pi * a * 1e-6 * 0.5
    torch.testing.assert_close(q[1], -q0 * torch.ones_like(q0), atol=1e-8, rtol=0)  # half way round: opposite
    torch.testing.assert_close(p[-1], p0, atol=1e-8, rtol=0)
    # A 1% different period does not close the orbit: the check above can fail.
    q_wrong, _ = simulate(system, params, q0, p0, t * 1.01, "dop853", rtol=1e-12, atol=1e-12)
    assert float((q_wrong[-1] - q0).abs().max()) > 1e-3


def test_energy_momentum_and_angular_momentum_are_conserved():
    system = systems.get("two_body")
    g = torch.Generator().manual_seed(0)
    params = system.sample_params(32, g)
    q0, p0 = system.sample_initial_state(params, g)  # eccentric orbits: circular speed times noise
    t = torch.linspace(0, 10, 51, dtype=torch.float64)
    e0, mom0, ang0 = _invariants(system, q0, p0, params)
    torch.testing.assert_close(mom0, torch.zeros_like(mom0), atol=1e-12, rtol=0)
    for method, step, tol in (("dop853", None, 1e-9), ("leapfrog", 0.005, 1e-4)):
        q, p = simulate(system, params, q0, p0, t, method, step=step, rtol=1e-11, atol=1e-11)
        energy, momentum, angular = _invariants(system, q, p, params)
        assert float(((energy - e0) / e0).abs().max()) < tol, method
        # Pairwise central forces: total momentum and angular momentum are conserved by the flow, and exactly
        # (to rounding) by leapfrog, whose kicks and drifts each conserve them.
        assert float((momentum - mom0).abs().max()) < 1e-10, method
        assert float(((angular - ang0) / ang0).abs().max()) < (1e-9 if method == "dop853" else 1e-11), method
