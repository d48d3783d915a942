"""Dynamics metrics against hand-computed values and exact rollouts; the adaptation comparison on a tiny run."""
from pathlib import Path

import pytest
import torch

import systems
from metaham.integrate import simulate
from metaham.meta import training
from metaham.meta.config import load_meta_config, task_config
from metaham.meta.evaluate import AdaptationReport, ModelResult, _fresh_tasks, evaluate_adaptation, load_run
from metaham.meta.metrics import energy_relative_error, geometric_mean, rollout_relative_error

TINY = Path(__file__).with_name("tiny_meta_train.yaml")


def _state(*values):
    """One particle's (q, p) from (qx, qy, px, py), each (1, 2)."""
    qx, qy, px, py = values
    return torch.tensor([[qx, qy]], dtype=torch.float64), torch.tensor([[px, py]], dtype=torch.float64)


def test_rollout_relative_error_by_hand():
    # Three time points; t = 0 differs on purpose to show it is skipped (rollouts share their initial state).
    truth = [_state(9, 9, 9, 9), _state(1, 0, 0, 0), _state(0, 3, 4, 0)]
    pred = [_state(0, 0, 0, 0), _state(2, 0, 0, 0), _state(0, 3, 4, 0)]
    q, p = (torch.stack([s[i] for s in truth])[None] for i in (0, 1))  # (1, T=3, n=1, 2)
    q_hat, p_hat = (torch.stack([s[i] for s in pred])[None] for i in (0, 1))
    # t=1: |z - z_hat| = 1, |z| = 1, |z_hat| = 2 -> 1/3; t=2: identical -> 0; mean over t = 1/6.
    error = rollout_relative_error(q, p, q_hat, p_hat)
    assert error.shape == (1,)
    assert float(error) == pytest.approx(1 / 6, rel=1e-12)
    # A rollout that left the finite numbers counts as the worst error, 1.
    nan = torch.full_like(q_hat, float("nan"))
    assert float(rollout_relative_error(q, p, nan, nan)) == 1.0


def test_energy_relative_error_by_hand_and_zero_for_the_true_rollout():
    energy = torch.tensor([[2.0, 3.0, 1.0]], dtype=torch.float64)
    # |3-2|/(2+3) = 0.2 and |1-2|/(2+1) = 1/3, averaged over the two steps after t = 0.
    assert float(energy_relative_error(energy)) == pytest.approx((0.2 + 1 / 3) / 2, rel=1e-12)

    pendulum = systems.get("pendulum")
    generator = torch.Generator().manual_seed(0)
    params = pendulum.sample_params(4, generator)
    q0, p0 = pendulum.sample_initial_state(params, generator)
    t = torch.linspace(0, 4, 21, dtype=torch.float64)
    q, p = simulate(pendulum, params, q0, p0, t, "dopri8", rtol=1e-10, atol=1e-10)
    true_energy = pendulum.hamiltonian(q.transpose(0, 1), p.transpose(0, 1), {k: v[:, None] for k, v in params.items()})
    errors = energy_relative_error(true_energy)
    assert errors.shape == (4,)
    assert float(errors.max()) < 1e-9
    # The true rollout against itself has zero rollout error.
    assert float(rollout_relative_error(q.transpose(0, 1), p.transpose(0, 1), q.transpose(0, 1), p.transpose(0, 1)).max()) == 0


def test_geometric_mean():
    assert geometric_mean(torch.tensor([1e-2, 1e-4], dtype=torch.float64)) == pytest.approx(1e-3, rel=1e-12)
    assert geometric_mean(torch.tensor([0.0, 1.0]), floor=1e-4) == pytest.approx(1e-2, rel=1e-12)
    with pytest.raises(ValueError):
        geometric_mean(torch.tensor([]))


def test_adaptation_comparison_on_a_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("METAHAM_CACHE", str(tmp_path / "cache"))
    config = load_meta_config(TINY, ["train.outer_steps=2", "train.validate_every=0"])
    training.train(config, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    report = evaluate_adaptation(run, "pendulum", shots=8, steps=6, n_tasks=2, seed=1, progress=False)
    result = report.to_dict()
    assert report.eval_steps == [0, 1, 5, 6]
    assert set(result["models"]) == {"meta", "pretrained", "random"}
    assert result["held_out"] is True and result["tasks"] == 2 and result["adapt_lr"] == 0.3
    for name, model in result["models"].items():
        curve = model["vf_mse_curve"]
        assert len(curve) == 7 and model["vf_mse"]["6"] == pytest.approx(curve[6])
        assert 0 <= model["rollout_rel_err"] <= 1 and 0 <= model["energy_rel_err"] <= 1
        assert report.results[name].rollout_errors.shape == (2, 1)
    # Evaluation tasks are fresh parameter draws, even for a training system: none is in the training pool.
    training_pool = run.split.train_distribution(task_config(config), seed=config["data_seed"]).sample(18, seed=0)
    seen = {(t.system, float(t.params["m"]), float(t.params["k"])) for t in training_pool if t.system == "mass_spring"}
    assert len(seen) == 6
    fresh = _fresh_tasks(run, "mass_spring", 8, 3, 0, None, False)
    assert not seen & {(t.system, float(t.params["m"]), float(t.params["k"])) for t in fresh}


def test_adapt_tasks_equals_adapting_one_task_at_a_time():
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta import MetaTask, adapt
    from metaham.meta.adapt import adapt_tasks

    torch.manual_seed(0)
    model = HamiltonianGNN(hidden=8, layers=1).double()

    def task(n, k):
        points = lambda: (torch.randn(k, n, 2, dtype=torch.float64), torch.randn(k, n, 2, dtype=torch.float64),  # noqa: E731
                          torch.randn(k, n, 2, dtype=torch.float64), torch.randn(k, n, 2, dtype=torch.float64))
        return MetaTask(points(), points(), edge_index(n))

    tasks = [task(1, 6), task(2, 6), task(1, 6), task(1, 4)]  # three shape groups, one of two tasks
    rates = {name: 0.05 * (1 + i) for i, (name, _) in enumerate(model.named_parameters())}
    together = adapt_tasks(model, tasks, steps=3, lr=rates, eval_at=[0, 3])
    for t, result in zip(tasks, together):
        alone = adapt(model, t.support, t.query, t.graph, steps=3, lr=rates, eval_at=[0, 3])
        assert result.steps == alone.steps
        assert result.query_loss == pytest.approx(alone.query_loss, rel=1e-10)
        for name, value in alone.params.items():
            torch.testing.assert_close(result.params[name], value, rtol=1e-10, atol=1e-12)


def test_a_model_whose_adaptation_diverged_spoils_only_its_own_rollouts():
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta.evaluate import _rollouts
    from tasks import PhasePoints, Rollouts, Task

    model = HamiltonianGNN(hidden=8, layers=1)
    t = torch.linspace(0, 1, 11)

    def task():
        q, p = torch.randn(2, 11, 1, 2), torch.randn(2, 11, 1, 2)
        points = PhasePoints(q[0, :3], p[0, :3], q[0, :3], p[0, :3])
        return Task("mass_spring", {}, points, points, Rollouts(t, q, p))

    params = {name: value.detach() for name, value in model.named_parameters()}
    diverged = {name: value * float("nan") for name, value in params.items()}
    q, p, count = _rollouts(model, [params, diverged, params], [task(), task(), task()], edge_index(1))
    assert q.shape == (3, 2, 11, 1, 2) and count == 2
    assert torch.isfinite(q[[0, 2]]).all() and torch.isnan(q[1]).all()
    rollouts = task().rollouts
    errors = rollout_relative_error(rollouts.q[None].expand(3, -1, -1, -1, -1), rollouts.p[None].expand(3, -1, -1, -1, -1), q, p)
    assert torch.all(errors[1] == 1) and torch.all(errors[[0, 2]] < 1)


def test_normalised_mse_divides_each_task_by_the_power_of_its_own_targets():
    curves = torch.tensor([[4.0, 2.0], [40.0, 20.0]], dtype=torch.float64)  # two tasks, 10x apart in scale
    power = torch.tensor([2.0, 20.0], dtype=torch.float64)
    result = ModelResult(curves, torch.ones(2, 1), torch.ones(2, 1), 0, (torch.zeros(3, 1, 2), torch.zeros(3, 1, 2)))
    report = AdaptationReport("pendulum", 5, 1, 0, 0.1, 0, "", {}, {"meta": result},
                              truth=(torch.zeros(3), torch.zeros(3, 1, 2), torch.zeros(3, 1, 2)), query_power=power)
    models = report.to_dict()["models"]["meta"]
    assert models["vf_mse"] == {"0": 22.0, "1": 11.0}  # the raw mean is dominated by the large task
    assert models["vf_nmse"] == {"0": 2.0, "1": 1.0} == models["vf_nmse_median"]  # both tasks count alike
