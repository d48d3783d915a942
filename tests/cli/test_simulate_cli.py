"""`metaham simulate`: outputs (summary, JSON, .npz, plot), plugins, and usage errors with exit code 2."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metaham.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _json(capsys):
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_simulate_writes_npz_plot_and_json(tmp_path, capsys):
    out, plot = tmp_path / "sub" / "pendulum.npz", tmp_path / "pendulum.png"
    code = main(["simulate", "--system", "pendulum", "--param", "g=9.8", "--n-traj", "5", "--t-end", "4",
                 "--n-points", "50", "--out", str(out), "--plot", str(plot), "--json"])
    assert code == 0
    result, text = _json(capsys)
    assert "simulated 5 trajectories of pendulum: leapfrog" in text
    assert result["system"] == "pendulum" and result["n_traj"] == 5 and result["integrator"] == "leapfrog"
    assert result["params"]["g"] == 9.8
    data = np.load(out)
    assert data["t"].shape == (50,) and data["q"].shape == (5, 50, 1, 2) and data["energy"].shape == (5, 50)
    assert np.all(data["param_g"] == 9.8) and str(data["system"]) == "pendulum"
    # The reported drift is max over trajectories and time of |H(t) - H(0)| / |H(0)|, recomputed here from q, p.
    m, l, g = 1.0, 1.0, 9.8
    energy = data["p"][..., 0, 0] ** 2 / (2 * m * l * l) + m * g * l * (1 - np.cos(data["q"][..., 0, 0]))
    np.testing.assert_allclose(energy, data["energy"], rtol=1e-12)
    drift = np.abs(energy - energy[:, :1]) / np.abs(energy[:, :1])
    assert result["energy_rel_drift_max"] == pytest.approx(drift.max(), rel=1e-9)
    assert 0 < result["energy_rel_drift_max"] < 1e-3  # leapfrog at dt = 0.01
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_adaptive_integrator_and_sampled_parameters(capsys):
    assert main(["simulate", "--system", "two_body", "--sample-params", "--n-traj", "4", "--integrator", "dop853",
                 "--t-end", "3", "--json"]) == 0
    result, _ = _json(capsys)
    assert result["integrator"] == "dop853" and result["energy_rel_drift_max"] < 1e-8
    assert len(set(result["params"]["G"])) == 4  # drawn per trajectory


def test_duffing_example_plugin_simulates(capsys):
    assert main(["simulate", "--plugin", str(EXAMPLES / "duffing.py"), "--system", "duffing", "--n-traj", "3",
                 "--t-end", "2", "--json"]) == 0
    result, _ = _json(capsys)
    assert result["system"] == "duffing" and result["energy_rel_drift_max"] < 1e-4


def test_duffing_example_vector_field_is_its_symplectic_gradient():
    import systems

    systems.load_plugin(EXAMPLES / "duffing.py")
    duffing = systems.get("duffing")
    g = torch.Generator().manual_seed(0)
    params = duffing.sample_params(8, g)
    q, p = duffing.sample_initial_state(params, g)
    q.requires_grad_(True)
    p.requires_grad_(True)
    grad_q, grad_p = torch.autograd.grad(duffing.hamiltonian(q, p, params).sum(), (q, p))
    dq, dp = duffing.vector_field(q, p, params)
    torch.testing.assert_close(dq, grad_p)
    torch.testing.assert_close(dp, -grad_q)


def test_non_separable_plugin_uses_implicit_midpoint_and_refuses_leapfrog(tmp_path, capsys):
    plugin = tmp_path / "rotor.py"
    plugin.write_text(textwrap.dedent('''
        import torch
        import systems
        from systems.base import Param, System

        @systems.register
        class Quadratic(System):
            """H = (q^2 + p^2 + c q p) / 2 per coordinate: not separable."""
            name = "quadratic_coupled"
            params = (Param("c", 0.5, 0.1, 1.0, "coupling"),)
            separable = False

            def hamiltonian(self, q, p, params):
                c = params["c"][..., None, None]
                return ((q**2 + p**2 + c * q * p) / 2).sum((-1, -2))

            def vector_field(self, q, p, params):
                c = params["c"][..., None, None]
                return p + c * q / 2, -(q + c * p / 2)

            def sample_initial_state(self, params, generator):
                n = params["c"].shape[0]
                q = torch.rand((n, 1, 2), generator=generator, dtype=torch.float64).to(params["c"])
                return q, torch.zeros_like(q)
    '''))
    assert main(["simulate", "--plugin", str(plugin), "--system", "quadratic_coupled", "--n-traj", "2",
                 "--t-end", "1", "--json"]) == 0
    result, _ = _json(capsys)
    assert result["integrator"] == "implicit_midpoint" and result["energy_rel_drift_max"] < 1e-10
    assert main(["simulate", "--plugin", str(plugin), "--system", "quadratic_coupled", "--integrator", "leapfrog"]) == 2
    assert "needs a separable Hamiltonian" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--system", "pendulumm"], "unknown system 'pendulumm'; known systems: "),
        (["--system", "pendulum", "--param", "mass=2"], "unknown parameter 'mass'"),
        (["--system", "pendulum", "--param", "m=-1"], "'m' of system 'pendulum' must be > 0, got -1"),
        (["--system", "pendulum", "--param", "g=nan"], "'g' of system 'pendulum' must be finite"),
        (["--system", "pendulum", "--param", "g=fast"], "--param g=fast: 'fast' is not a number"),
        (["--system", "pendulum", "--param", "g"], "--param 'g': expected key=value"),
        (["--system", "magnetic_mirror", "--param", "p_theta=1"], "'p_theta' of system 'magnetic_mirror' must be < 0"),
        (["--system", "pendulum", "--n-points", "1"], "--n-points must be >= 2"),
    ],
)
def test_bad_input_exits_2_naming_the_offender(args, message, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown system" in message:
        assert "henon_heiles" in err and "two_body" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [("--dt", "0", "'0' must be > 0"), ("--dt", "-0.1", "'-0.1' must be > 0"), ("--t-end", "0", "'0' must be > 0"),
     ("--t-end", "nan", "'nan' must be finite"), ("--n-traj", "0", "'0' must be > 0"),
     ("--integrator", "euler", "invalid choice: 'euler'")],
)
def test_bad_numbers_exit_2_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--system", "pendulum", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err
