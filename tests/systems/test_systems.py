"""Every registered system: analytic vector field = symplectic gradient of H, dtypes, batching, samplers."""
import functools
import math

import pytest
import torch

import systems
from metaham.integrate import simulate
from systems.nbody import NBody
from systems.spring_chain import SpringChain

BUILTIN = ["henon_heiles", "magnetic_mirror", "mass_spring", "pendulum", "spring_chain", "three_body", "two_body"]
EXTRA = {"nbody_4": lambda: NBody(4), "spring_chain_5": lambda: SpringChain(5)}  # any N, not registered


def _make(name):
    return EXTRA[name]() if name in EXTRA else systems.get(name)


@functools.lru_cache(maxsize=None)
def _cached_draw(name, n, seed, dtype):
    system = _make(name)
    g = torch.Generator().manual_seed(seed)
    params = system.sample_params(n, g, dtype=dtype)
    q, p = system.sample_initial_state(params, g)
    return params, q, p


def _draw(system, n, seed=0, dtype=torch.float64):
    """Parameters and initial states (cached: the three-body sampler screens orbits, which takes a while)."""
    params, q, p = _cached_draw(system.name, n, seed, dtype)
    return {k: v.clone() for k, v in params.items()}, q.clone(), p.clone()


def test_registry_lists_every_builtin_system():
    assert set(BUILTIN) <= set(systems.names())
    with pytest.raises(systems.UnknownSystemError, match="known systems: .*pendulum"):
        systems.get("no_such_system")


@pytest.mark.parametrize("name", BUILTIN + list(EXTRA))
def test_vector_field_is_the_finite_difference_symplectic_gradient(name):
    system = _make(name)
    params, q, p = _draw(system, 16)
    dq, dp = system.vector_field(q, p, params)
    eps = 1e-6
    for which, target, sign in (("p", dq, 1.0), ("q", dp, -1.0)):
        for i in range(q.shape[1]):
            for d in range(q.shape[2]):
                bump = torch.zeros_like(q)
                bump[:, i, d] = eps
                if which == "p":
                    diff = system.hamiltonian(q, p + bump, params) - system.hamiltonian(q, p - bump, params)
                else:
                    diff = system.hamiltonian(q + bump, p, params) - system.hamiltonian(q - bump, p, params)
                fd = sign * diff / (2 * eps)
                torch.testing.assert_close(target[:, i, d], fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", BUILTIN + list(EXTRA))
def test_vector_field_matches_autograd_exactly(name):
    system = _make(name)
    params, q, p = _draw(system, 16)
    q.requires_grad_(True)
    p.requires_grad_(True)
    grad_q, grad_p = torch.autograd.grad(system.hamiltonian(q, p, params).sum(), (q, p))
    dq, dp = system.vector_field(q, p, params)
    torch.testing.assert_close(dq, grad_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp, -grad_q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", BUILTIN)
def test_float32_follows_float64_and_keeps_its_dtype(name):
    system = systems.get(name)
    p64, q64, m64 = _draw(system, 16, dtype=torch.float64)
    p32, q32, m32 = _draw(system, 16, dtype=torch.float32)
    assert q32.dtype == m32.dtype == torch.float32 and q64.dtype == torch.float64
    # The samplers draw in float64, so both dtypes start from the same states.
    torch.testing.assert_close(q32.double(), q64, rtol=1e-6, atol=1e-6)
    h32, h64 = system.hamiltonian(q32, m32, p32), system.hamiltonian(q64, m64, p64)
    assert h32.dtype == torch.float32 and h32.shape == (16,)
    torch.testing.assert_close(h32.double(), h64, rtol=1e-4, atol=1e-5)
    f32, f64 = system.vector_field(q32, m32, p32), system.vector_field(q64, m64, p64)
    for a, b in zip(f32, f64):
        assert a.dtype == torch.float32 and a.shape == q32.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BUILTIN)
def test_batched_over_trajectories_and_parameter_draws(name):
    """Params (B, 1) against states (B, T, n, dim) give what each row gives alone."""
    system = systems.get(name)
    params, q, p = _draw(system, 16)
    params, q, p = {k: v[:4] for k, v in params.items()}, q[:4], p[:4]
    qs = torch.stack([q, 0.9 * q, 1.1 * q], dim=1)  # (B, T=3, n, dim)
    ps = torch.stack([p, -p, 0.5 * p], dim=1)
    column = {k: v[:, None] for k, v in params.items()}
    h = system.hamiltonian(qs, ps, column)
    dq, dp = system.vector_field(qs, ps, column)
    assert h.shape == (4, 3) and dq.shape == qs.shape and dp.shape == qs.shape
    for b in range(4):
        row = {k: v[b : b + 1] for k, v in params.items()}
        for j in range(3):
            torch.testing.assert_close(h[b, j : j + 1], system.hamiltonian(qs[b, j : j + 1], ps[b, j : j + 1], row))
            alone = system.vector_field(qs[b, j : j + 1], ps[b, j : j + 1], row)[1]
            torch.testing.assert_close(dp[b, j : j + 1], alone)


@pytest.mark.parametrize("name", BUILTIN)
def test_sampler_is_reproducible_and_respects_the_parameters(name):
    system = systems.get(name)
    a = _draw(system, 16)
    g = torch.Generator().manual_seed(0)  # a fresh draw with the same seed gives the same states
    b_params = system.sample_params(16, g)
    b = (b_params, *system.sample_initial_state(b_params, g))
    c = _draw(system, 16, seed=1)
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])
    q, p = a[1], a[2]
    assert q.shape == p.shape == (16, system.n_particles, system.dim)
    assert torch.isfinite(q).all() and torch.isfinite(p).all()
    if system.dof == 1:  # surplus coordinate: zero, and H ignores it
        assert torch.all(q[..., 1] == 0) and torch.all(p[..., 1] == 0)


def _trajectories(name, t_end=10.0):
    system = systems.get(name)
    params, q0, p0 = _draw(system, 16, seed=1)
    t = torch.linspace(0, t_end, 201, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-10, atol=1e-10)
    energy = system.hamiltonian(q, p, params)
    assert ((energy - energy[0]).abs() / energy[0].abs()).max() < 1e-7  # well resolved, conserved
    return system, params, q, p, energy


def test_pendulum_librates_below_the_separatrix():
    system, params, q, p, energy = _trajectories("pendulum")
    separatrix = 2 * params["m"] * params["g"] * params["l"]
    assert torch.all(energy[0] <= 0.8 * separatrix + 1e-12) and torch.all(energy[0] >= 0.1 * separatrix - 1e-12)
    assert q[..., 0, 0].abs().max() < math.pi  # never over the top


def test_henon_heiles_stays_in_the_well_below_escape_energy():
    system, params, q, p, energy = _trajectories("henon_heiles")
    lam = params["lam"]
    assert torch.all(energy[0] < 0.8 / (6 * lam**2) + 1e-12)
    radius = (q[..., 0, :] ** 2).sum(-1).sqrt()
    assert torch.all(radius < 1 / lam)  # inside the triangle whose corners lie at 1/lam


def test_magnetic_mirror_orbits_are_bounded_and_off_axis():
    system, params, q, p, energy = _trajectories("magnetic_mirror")
    r, z = q[..., 0, 0], q[..., 0, 1]
    assert r.min() > 0.1
    z_max = params["L"] * torch.sqrt(energy[0] / (-params["p_theta"] * params["eB0"] / params["m"]) - 1)
    assert torch.all(z.abs().amax(0) <= z_max + 1e-9)  # the bound the effective potential promises
    # The bottom of the well: V(r0, 0) = 0 is impossible for p_theta < 0; its minimum is |p_theta| eB0 / m.
    row = {k: v[:1] for k, v in params.items()}
    r0 = torch.sqrt(2 * -row["p_theta"] / row["eB0"])
    bottom = system.potential(torch.stack([r0, torch.zeros_like(r0)], -1)[:, None, :], row)
    torch.testing.assert_close(bottom, -row["p_theta"] * row["eB0"] / row["m"])
    with pytest.raises(ValueError, match="p_theta"):
        system.check_params({"p_theta": 0.5})


def test_three_body_screen_keeps_bodies_apart_and_bound():
    system, params, q, p, energy = _trajectories("three_body")
    assert torch.all(energy[0] < 0)
    i, j = torch.triu_indices(3, 3, 1)
    dist = (q[:, :, i] - q[:, :, j]).norm(dim=-1)  # (T, B, pairs)
    assert torch.all(dist.amin((0, 2)) >= 0.2 * dist[0].amin(-1))  # no close encounter
    assert torch.all(dist.amax((0, 2)) <= 3.5 * dist[0].amax(-1))  # no escape
    masses = system.masses(params)
    torch.testing.assert_close(p.sum(2), torch.zeros_like(p.sum(2)), atol=1e-9, rtol=0)  # zero total momentum
    com = (masses[None, :, :, None] * q).sum(2) / masses.sum(1)[None, :, None]
    torch.testing.assert_close(com, torch.zeros_like(com), atol=1e-9, rtol=0)


def test_spring_chain_springs_never_collapse():
    system, params, q, p, energy = _trajectories("spring_chain")
    assert system.edges() == [(0, 1), (1, 2)]
    length = (q[:, :, 1:] - q[:, :, :-1]).norm(dim=-1)
    assert torch.all(length >= 0.45 * params["l0"][None, :, None] - 1e-9)
    assert torch.all(energy[0] <= 0.3 * params["k"] * params["l0"] ** 2 / 2 + 1e-12)


def test_parameters_are_validated_with_the_offending_name():
    system = systems.get("pendulum")
    with pytest.raises(ValueError, match="unknown parameter 'mass'"):
        system.default_params(2, mass=1.0)
    with pytest.raises(ValueError, match="'m' .* must be > 0"):
        system.default_params(2, m=-1.0)
    with pytest.raises(ValueError, match="'g' .* must be finite"):
        system.sample_params(2, torch.Generator(), g=float("nan"))
    assert systems.get("two_body").param_names == ("G", "m1", "m2")
