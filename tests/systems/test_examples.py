"""The plugin examples in examples/: each loads, and its physics is checked like a built-in system's."""
from pathlib import Path

import pytest
import torch

import systems
from metaham.integrate import simulate

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


@pytest.fixture(params=EXAMPLES, ids=[p.stem for p in EXAMPLES])
def example(request, monkeypatch):
    """The system an example file registers (into a copy of the registry)."""
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    (name,) = systems.load_plugin(request.param)
    return systems.get(name)


def _draw(system, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = system.sample_params(n, g)
    q, p = system.sample_initial_state(params, g)
    return params, q, p


def test_vector_field_is_the_symplectic_gradient_of_H(example):
    params, q, p = _draw(example)
    q.requires_grad_(True)
    p.requires_grad_(True)
    grad_q, grad_p = torch.autograd.grad(example.hamiltonian(q, p, params).sum(), (q, p))
    dq, dp = example.vector_field(q, p, params)
    torch.testing.assert_close(dq, grad_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp, -grad_q, rtol=1e-12, atol=1e-12)


def test_orbits_are_bounded_and_conserve_energy(example):
    params, q0, p0 = _draw(example)
    t = torch.linspace(0.0, 20.0, 201, dtype=torch.float64)
    q, p = simulate(example, params, q0, p0, t, "dop853", rtol=1e-11, atol=1e-11)
    energy = example.hamiltonian(q, p, {k: v[None] for k, v in params.items()})
    drift = ((energy - energy[:1]).abs() / energy[:1].abs().clamp_min(1e-12)).max()
    assert drift < 1e-7
    assert q.abs().max() < 100  # bounded: nothing escapes in 20 time units


def test_invariances_it_declares(example):
    """A law that declares no external field is invariant under rotations and translations of the plane."""
    if example.external_field:
        pytest.skip("depends on absolute positions by design")
    params, q, p = _draw(example)
    angle = torch.tensor(0.7, dtype=torch.float64)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    shift = torch.tensor([0.3, -1.1], dtype=torch.float64)
    H = example.hamiltonian(q, p, params)
    torch.testing.assert_close(example.hamiltonian(q @ rotation.T + shift, p @ rotation.T, params), H)
    dq, dp = example.vector_field(q @ rotation.T + shift, p @ rotation.T, params)
    dq0, dp0 = example.vector_field(q, p, params)
    torch.testing.assert_close(dq, dq0 @ rotation.T)
    torch.testing.assert_close(dp, dp0 @ rotation.T)


def test_morse_dimer_starts_below_dissociation(monkeypatch):
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    (name,) = systems.load_plugin(EXAMPLES[0].parent / "morse_dimer.py")
    system = systems.get(name)
    params, q, p = _draw(system, n=256)
    assert bool((system.hamiltonian(q, p, params) < params["D"]).all())  # bound: below the dissociation energy
    torch.testing.assert_close(p.sum(1), torch.zeros(256, 2, dtype=torch.float64))  # centre of mass at rest


def test_penning_trap_energy_range_and_angular_momentum(monkeypatch):
    """Sampled energies lie in [0.1, 1]; the field is rotation symmetric about the origin in the symmetric gauge,
    so the canonical angular momentum x p_y - y p_x is conserved along every orbit."""
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    (name,) = systems.load_plugin(EXAMPLES[0].parent / "penning_trap.py")
    system = systems.get(name)
    params, q0, p0 = _draw(system, n=64)
    energy = system.hamiltonian(q0, p0, params)
    assert bool(((energy >= 0.1 - 1e-12) & (energy <= 1 + 1e-12)).all())
    t = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-11, atol=1e-11)
    momentum = q[..., 0, 0] * p[..., 0, 1] - q[..., 0, 1] * p[..., 0, 0]
    assert float((momentum - momentum[:1]).abs().max()) < 1e-8
    assert float((q[-1] - q0).abs().max()) > 1e-2  # it moved
