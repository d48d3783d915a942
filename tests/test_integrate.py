"""Integrators: exact solutions, convergence orders, symplectic behaviour, batching, bad input."""
import math

import numpy as np
import pytest
import torch

import systems
from metaham.integrate import METHODS, odeint_hamiltonian, simulate


def _oscillator(q, p):
    return p, -q


def _exact(t, q0=1.0, p0=0.0):
    return q0 * torch.cos(t) + p0 * torch.sin(t), p0 * torch.cos(t) - q0 * torch.sin(t)


def _start(q0=1.0, p0=0.0):
    return torch.tensor([[[q0, 0.0]]], dtype=torch.float64), torch.tensor([[[p0, 0.0]]], dtype=torch.float64)


@pytest.mark.parametrize("method", ["dopri8", "dop853"])
def test_harmonic_oscillator_matches_its_exact_solution_over_10_periods(method):
    q0, p0 = _start()
    t = torch.linspace(0, 20 * math.pi, 201, dtype=torch.float64)
    q, p = odeint_hamiltonian(_oscillator, q0, p0, t, method, rtol=1e-10, atol=1e-10)
    qe, pe = _exact(t)
    err = max(float((q[:, 0, 0, 0] - qe).abs().max()), float((p[:, 0, 0, 0] - pe).abs().max()))
    assert err <= 1e-8, f"{method}: max error {err:.2e}"
    assert q.shape == (201, 1, 1, 2) and torch.equal(q[0], q0)


@pytest.mark.parametrize("method, order", [("leapfrog", 2), ("implicit_midpoint", 2), ("rk4", 4)])
def test_fixed_step_methods_converge_at_their_order(method, order):
    q0, p0 = _start(0.3, 1.0)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)  # uneven save times: sub-steps land on them
    qe, pe = _exact(t, 0.3, 1.0)
    errors = []
    for step in (0.1, 0.05):
        q, p = odeint_hamiltonian(_oscillator, q0, p0, t, method, step=step)
        errors.append(max(float((q[:, 0, 0, 0] - qe).abs().max()), float((p[:, 0, 0, 0] - pe).abs().max())))
    observed = math.log2(errors[0] / errors[1])
    assert abs(observed - order) < 0.3, f"{method}: observed order {observed:.2f}"


@pytest.mark.slow  # 1e5 steps of each method: the cost is per-step Python overhead
def test_leapfrog_energy_error_stays_bounded_while_rk4_drifts():
    """Pendulum, dt = 0.1, 1e5 steps (t up to 1e4): leapfrog's energy error oscillates at a fixed level,
    RK4's grows steadily (it is smaller early on, so compare each method with itself)."""

    def pendulum(q, p):
        return p, -torch.sin(q)

    q0 = torch.tensor([[1.0]], dtype=torch.float64)
    p0 = torch.zeros_like(q0)
    t = torch.linspace(0, 1e4, 1001, dtype=torch.float64)  # 100 steps of 0.1 per save interval

    def energy_error(method):
        q, p = odeint_hamiltonian(pendulum, q0, p0, t, method, step=0.1)
        energy = p[:, 0, 0] ** 2 / 2 + 1 - torch.cos(q[:, 0, 0])
        rel = (energy - energy[0]).abs() / energy[0]
        return float(rel[1:101].max()), float(rel[-100:].max())  # first and last tenth

    leap_early, leap_late = energy_error("leapfrog")
    rk4_early, rk4_late = energy_error("rk4")
    assert leap_late <= 1.5 * leap_early  # bounded
    assert rk4_late >= 5 * rk4_early  # grows
    assert rk4_late / rk4_early > 3 * leap_late / leap_early


def test_implicit_midpoint_conserves_a_non_separable_quadratic_hamiltonian():
    # H = (q^2 + p^2 + q p) / 2: implicit midpoint conserves quadratic invariants exactly; leapfrog does not apply.
    def field(q, p):
        return p + q / 2, -(q + p / 2)

    q0, p0 = _start(1.0, 0.5)
    t = torch.linspace(0, 50, 501, dtype=torch.float64)
    q, p = odeint_hamiltonian(field, q0, p0, t, "implicit_midpoint", step=0.1)
    h = (q**2 + p**2 + q * p)[..., 0].squeeze(-1) / 2
    assert float((h - h[0]).abs().max()) < 1e-12
    q_rk, p_rk = odeint_hamiltonian(field, q0, p0, t, "rk4", step=0.1)
    h_rk = (q_rk**2 + p_rk**2 + q_rk * p_rk)[..., 0].squeeze(-1) / 2
    assert float((h_rk - h_rk[0]).abs().max()) > 1e-9  # the check can fail: a non-symplectic method drifts


def test_dop853_matches_scipy_solve_ivp_dop853():
    from scipy.integrate import solve_ivp

    system = systems.get("pendulum")
    g = torch.Generator().manual_seed(1)
    params = system.sample_params(6, g)
    q0, p0 = system.sample_initial_state(params, g)
    t = torch.linspace(0, 10, 50, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-12, atol=1e-12)
    for b in range(6):
        m, l, grav = (float(params[k][b]) for k in ("m", "l", "g"))
        sol = solve_ivp(
            lambda _t, y: [y[1] / (m * l * l), -m * grav * l * np.sin(y[0])],
            (0, 10), [float(q0[b, 0, 0]), float(p0[b, 0, 0])], method="DOP853", t_eval=t.numpy(),
            rtol=1e-13, atol=1e-13,
        )
        np.testing.assert_allclose(q[:, b, 0, 0].numpy(), sol.y[0], atol=1e-9)
        np.testing.assert_allclose(p[:, b, 0, 0].numpy(), sol.y[1], atol=1e-9)


def test_dop853_takes_scipys_steps_for_every_row():
    """At a loose tolerance (errors ~1e-7 against the truth) each row still agrees with scipy's DOP853 at the same
    tolerance to ~1e-12: the same initial step, error norm, step control and dense output, row by row."""
    from scipy.integrate import solve_ivp

    system = systems.get("henon_heiles")
    g = torch.Generator().manual_seed(3)
    params = system.sample_params(4, g)
    q0, p0 = system.sample_initial_state(params, g)
    t = torch.linspace(0, 10, 40, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-7, atol=1e-7)
    for b in range(4):
        field = system.field({k: v[b : b + 1] for k, v in params.items()})

        def rhs(_t, y, field=field):
            dq, dp = field(*torch.from_numpy(y).view(2, 1, 1, 2).unbind(0))
            return np.concatenate([dq.numpy().ravel(), dp.numpy().ravel()])

        y0 = np.concatenate([q0[b].numpy().ravel(), p0[b].numpy().ravel()])
        sol = solve_ivp(rhs, (0, 10), y0, method="DOP853", t_eval=t.numpy(), rtol=1e-7, atol=1e-7)
        ours = torch.cat([q[:, b].flatten(1), p[:, b].flatten(1)], 1).numpy()
        np.testing.assert_allclose(ours, sol.y.T, atol=1e-11, rtol=0)


def test_dop853_rows_are_independent_and_finished_rows_leave_the_batch():
    """Per-trajectory step sizes: a batch gives what each trajectory gives alone, with or without dropping
    finished rows (simulate passes rows_field; a 2-D batch takes the generic path)."""
    system = systems.get("magnetic_mirror")
    g = torch.Generator().manual_seed(2)
    params = system.sample_params(6, g)
    q0, p0 = system.sample_initial_state(params, g)
    t = torch.linspace(0, 3, 40, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "dop853", rtol=1e-10, atol=1e-10)
    for b in (0, 3):
        row = {k: v[b : b + 1] for k, v in params.items()}
        q1, p1 = simulate(system, row, q0[b : b + 1], p0[b : b + 1], t, "dop853", rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(q[:, b : b + 1], q1, atol=1e-12, rtol=0)
    grid = {k: v.view(2, 3) for k, v in params.items()}
    q2, _ = odeint_hamiltonian(
        lambda a, c: system.vector_field(a, c, grid), q0.view(2, 3, 1, 2), p0.view(2, 3, 1, 2), t, "dop853",
        rtol=1e-10, atol=1e-10,
    )
    torch.testing.assert_close(q2.reshape(q.shape), q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_float32_runs_and_keeps_its_dtype(method):
    q0, p0 = _start(1.0, 0.0)
    q0, p0 = q0.float(), p0.float()
    t = torch.linspace(0, 1, 11)
    q, p = odeint_hamiltonian(_oscillator, q0, p0, t, method, step=0.01, rtol=1e-6, atol=1e-6)
    assert q.dtype == torch.float32
    qe, _ = _exact(t.double())
    assert float((q[:, 0, 0, 0].double() - qe).abs().max()) < 1e-4


def test_simulate_batches_thousands_of_trajectories_with_their_own_parameters():
    system = systems.get("mass_spring")
    g = torch.Generator().manual_seed(0)
    params = system.sample_params(2000, g)
    q0, p0 = system.sample_initial_state(params, g)
    t = torch.linspace(0, 3, 31, dtype=torch.float64)
    q, p = simulate(system, params, q0, p0, t, "rk4", step=0.01)
    omega = torch.sqrt(params["k"] / params["m"])
    phase = omega * t[:, None]
    exact = q0[:, 0, 0] * torch.cos(phase) + p0[:, 0, 0] / (params["m"] * omega) * torch.sin(phase)
    assert float((q[:, :, 0, 0] - exact).abs().max()) < 1e-8
    assert torch.all(q[..., 1] == 0)  # the surplus coordinate stays zero


def test_bad_input_is_rejected_with_a_clear_message():
    q0, p0 = _start()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown integrator 'euler'"):
        odeint_hamiltonian(_oscillator, q0, p0, t, "euler")
    with pytest.raises(ValueError, match="strictly increasing"):
        odeint_hamiltonian(_oscillator, q0, p0, t.flip(0), "leapfrog")
    with pytest.raises(ValueError, match="step must be > 0"):
        odeint_hamiltonian(_oscillator, q0, p0, t, "leapfrog", step=0.0)
    with pytest.raises(RuntimeError, match="did not converge"):
        odeint_hamiltonian(_oscillator, q0, p0, t, "implicit_midpoint", step=5.0, max_fixed_point_iters=5)
    with pytest.raises(ValueError, match="failed_trajectories must be 'raise' or 'nan'"):
        odeint_hamiltonian(_oscillator, q0, p0, t, "implicit_midpoint", failed_trajectories="skip")

    class NonSeparable(systems.System):
        name, separable = "non_separable", False

        def vector_field(self, q, p, params):
            return p * q, -p * p / 2

    with pytest.raises(ValueError, match="leapfrog needs a separable Hamiltonian"):
        simulate(NonSeparable(), {}, q0, p0, t, "leapfrog")


def test_dop853_dense_output_power_basis_equals_hairers_nested_form():
    from metaham.integrate import _dense_power_basis

    rng = np.random.default_rng(0)
    y0, y1, hk0, hk12, *hdk = rng.normal(size=8)
    f0 = y1 - y0
    terms = [f0, hk0 - f0, 2 * f0 - hk0 - hk12, *hdk]
    coeffs = _dense_power_basis() @ np.array([y0, y1, hk0, hk12, *hdk])
    for x in (0.0, 0.3, 0.77, 1.0):
        nested = 0.0
        for i, term in enumerate(reversed(terms)):  # scipy's Dop853DenseOutput loop
            nested = (nested + term) * (x if i % 2 == 0 else 1 - x)
        assert np.polyval(coeffs[::-1], x) == pytest.approx(y0 + nested, abs=1e-13)
    assert np.polyval(coeffs[::-1], 1.0) == pytest.approx(y1, abs=1e-13)  # the interpolant ends on the step


def test_dop853_interpolant_from_stages_equals_the_record_route():
    """The per-iteration coefficients y0 e_0 + h M K equal the power basis applied to the record
    (y0, y0 + h b K, h k_0, h k_12, h D K): y0 enters only as the constant term."""
    from scipy.integrate._ivp import dop853_coefficients as tab

    from metaham.integrate import _dense_power_basis, _interpolant_from_stages

    rng = np.random.default_rng(1)
    y0, h = rng.normal(), 0.37
    k = rng.normal(size=tab.N_STAGES_EXTENDED)
    record = np.array([y0, y0 + h * tab.B @ k[: tab.N_STAGES], h * k[0], h * k[tab.N_STAGES], *(h * tab.D @ k)])
    from_stages = h * _interpolant_from_stages(tab) @ k
    from_stages[0] += y0
    np.testing.assert_allclose(from_stages, _dense_power_basis() @ record, rtol=0, atol=1e-12)


def test_dop853_saves_every_time_of_rows_with_very_different_step_sizes(monkeypatch):
    """Oscillators whose frequencies span 100x: slow rows hold many save times per step, fast rows none in most
    steps (the save pass drops those), and writing the saves after every step (a tiny record budget) gives the
    same result as writing them once."""
    from metaham.integrate import _Dop853

    omega = torch.logspace(-1, 1, 5, dtype=torch.float64)
    q0 = torch.zeros(5, 1, 2, dtype=torch.float64)
    q0[:, 0, 0] = 1.0
    p0 = torch.zeros_like(q0)
    t = torch.linspace(0, 5, 51, dtype=torch.float64)
    w = omega[:, None, None]

    def field(q, p):
        return p, -(w**2) * q

    q, p = odeint_hamiltonian(field, q0, p0, t, "dop853", rtol=1e-11, atol=1e-11)
    exact = torch.cos(omega[None] * t[:, None])
    assert float((q[:, :, 0, 0] - exact).abs().max()) < 1e-8
    assert float((p[:, :, 0, 0] + omega * torch.sin(omega[None] * t[:, None])).abs().max()) < 1e-7
    monkeypatch.setattr(_Dop853, "_RECORD_BUDGET", 1)
    q1, p1 = odeint_hamiltonian(field, q0, p0, t, "dop853", rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(q1, q, atol=1e-14, rtol=0)
    torch.testing.assert_close(p1, p, atol=1e-14, rtol=0)


def test_dop853_reports_a_non_finite_state():
    q0, p0 = _start(1.0, 0.0)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="non-finite"):
        odeint_hamiltonian(lambda q, p: (p, q * float("nan")), q0, p0, t, "dop853")


def test_simulate_uses_a_plugin_systems_vector_field_through_the_default_field():
    class Oscillator(systems.System):  # defines vector_field only, as the README's plugin example does
        name, dof = "plugin_oscillator", 2
        params = (systems.Param("k", 1.0, 0.5, 2.0),)

        def vector_field(self, q, p, params):
            return p, -params["k"][:, None, None] * q

    k = torch.tensor([1.0, 4.0], dtype=torch.float64)
    q0 = torch.ones(2, 1, 2, dtype=torch.float64)
    t = torch.linspace(0, 5, 21, dtype=torch.float64)
    q, _ = simulate(Oscillator(), {"k": k}, q0, torch.zeros_like(q0), t, "dop853", rtol=1e-11, atol=1e-11)
    exact = torch.cos(torch.sqrt(k)[None] * t[:, None])
    assert float((q[..., 0, 0] - exact).abs().max()) < 1e-8


def test_implicit_midpoint_guess_from_earlier_slopes_saves_calls_not_accuracy():
    """From the third step on, the first guess of a step extrapolates the two previous midpoint slopes. A
    one-step call per save interval restarts from explicit Euler guesses every step: same solution (to the
    fixed-point tolerance, 1e-13), more calls of the field."""
    calls = [0]

    def pendulum(q, p):
        calls[0] += 1
        return p, -torch.sin(q)

    q0 = torch.tensor([[[1.0, 0.3]], [[2.5, -0.4]]], dtype=torch.float64)
    p0 = torch.zeros_like(q0)
    t = torch.linspace(0, 10, 101, dtype=torch.float64)
    q, p = odeint_hamiltonian(pendulum, q0, p0, t, "implicit_midpoint")
    extrapolated, calls[0] = calls[0], 0
    qs, ps = [q0], [p0]
    for interval in zip(t[:-1], t[1:]):
        q_step, p_step = odeint_hamiltonian(pendulum, qs[-1], ps[-1], torch.stack(interval), "implicit_midpoint")
        qs.append(q_step[-1])
        ps.append(p_step[-1])
    torch.testing.assert_close(q, torch.stack(qs), rtol=0, atol=1e-11)
    torch.testing.assert_close(p, torch.stack(ps), rtol=0, atol=1e-11)
    assert extrapolated < 0.9 * calls[0], f"{extrapolated} calls against {calls[0]} from Euler guesses"


@pytest.mark.parametrize("stiff_omega, max_iters", [(1e6, 100), (3.0, 100), (1.5, 60)])
def test_implicit_midpoint_fails_only_the_trajectories_that_do_not_converge(stiff_omega, max_iters):
    # Oscillators of frequency omega per trajectory, steps of 1: the fixed-point iteration contracts by
    # omega / 2 per iteration, so omega = 1e6 runs away to non-finite states, omega = 3 never settles within
    # 100 iterations, and omega = 1.5 needs ~100 (0.75 per iteration) where 0.8 needs ~35 and 0.5 fewer.
    omega = torch.tensor([0.5, stiff_omega, 0.8], dtype=torch.float64).view(3, 1, 1)

    def field(q, p):  # all three trajectories, or the two that converge
        w = omega if len(q) == 3 else omega[[0, 2]]
        return w * p, -w * q

    q0 = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]], [[0.2, 0.3]]], dtype=torch.float64)
    p0 = torch.zeros_like(q0)
    t = torch.linspace(0, 5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not converge"):
        odeint_hamiltonian(field, q0, p0, t, "implicit_midpoint", max_fixed_point_iters=max_iters)
    q, p = odeint_hamiltonian(field, q0, p0, t, "implicit_midpoint", max_fixed_point_iters=max_iters,
                              failed_trajectories="nan")
    assert torch.isnan(q[1:, 1]).all() and torch.isnan(p[1:, 1]).all() and torch.equal(q[0], q0)
    alone_q, alone_p = odeint_hamiltonian(field, q0[[0, 2]], p0[[0, 2]], t, "implicit_midpoint",
                                          max_fixed_point_iters=max_iters)
    torch.testing.assert_close(q[:, [0, 2]], alone_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(p[:, [0, 2]], alone_p, rtol=0, atol=1e-12)
    # Implicit midpoint conserves the oscillators' energy: the survivors are the real solution, not frozen.
    energy = 0.5 * (q[:, [0, 2]] ** 2 + p[:, [0, 2]] ** 2).sum((-1, -2))
    torch.testing.assert_close(energy, energy[:1].expand_as(energy), rtol=1e-10, atol=0)
    assert not torch.allclose(q[-1, [0, 2]], q0[[0, 2]])


def test_implicit_midpoint_fails_a_runaway_iteration_early_and_keeps_a_slow_one():
    # Oscillators of frequency omega, one step of 1: the iteration's change shrinks by omega / 2 per iteration.
    # omega = 3 never settles: it fails after 20 iterations, where the budget of 100 would hold the batch to
    # 100 calls. omega = 1.4 (0.7 per iteration) needs ~80 of the 100: on course all along, so it converges.
    calls = [0]

    def field(omega):
        w = torch.tensor(omega, dtype=torch.float64).view(-1, 1, 1)

        def f(q, p):
            calls[0] += 1
            return w * p, -w * q

        return f

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    q0 = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]], dtype=torch.float64)
    p0 = torch.zeros_like(q0)
    q, _ = odeint_hamiltonian(field([0.5, 3.0]), q0, p0, t, "implicit_midpoint", failed_trajectories="nan")
    assert torch.isnan(q[1, 1]).all() and torch.isfinite(q[1, 0]).all()
    assert calls[0] <= 25, f"{calls[0]} calls of the field for one step"
    with pytest.raises(RuntimeError, match="did not converge .* after 20 iterations"):
        odeint_hamiltonian(field([0.5, 3.0]), q0, p0, t, "implicit_midpoint")
    calls[0] = 0
    q, p = odeint_hamiltonian(field([1.4]), q0[:1], p0[:1], t, "implicit_midpoint")
    assert 60 < calls[0] <= 101
    exact = torch.tensor([[1 - 0.7**2, -1.4]], dtype=torch.float64) / (1 + 0.7**2)  # the midpoint map, solved
    torch.testing.assert_close(torch.cat([q[1, 0], p[1, 0]]).view(2, 2)[:, 0], exact[0], rtol=0, atol=1e-12)
