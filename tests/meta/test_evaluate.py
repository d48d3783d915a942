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
    from metaham.meta import TaskUnits
    from metaham.meta.evaluate import _failed_trajectories, _rollouts
    from tasks import PhasePoints, Rollouts, Task

    model = HamiltonianGNN(hidden=8, layers=1)
    t = torch.linspace(0, 1, 11)

    def task():
        q, p = torch.randn(2, 11, 1, 2), torch.randn(2, 11, 1, 2)
        points = PhasePoints(q[0, :3], p[0, :3], q[0, :3], p[0, :3])
        return Task("mass_spring", {}, points, points, Rollouts(t, q, p))

    params = {name: value.detach() for name, value in model.named_parameters()}
    diverged = {name: value * float("nan") for name, value in params.items()}
    ones = torch.ones(3, dtype=torch.float64)
    q, p = _rollouts(model, [params, diverged, params], [task(), task(), task()], edge_index(1),
                     TaskUnits(ones, ones, ones))
    assert q.shape == (3, 2, 11, 1, 2) and _failed_trajectories(q) == 2 and _failed_trajectories(q[[0, 2]]) == 0
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


def _phase_task(system: str, support_scale: float, query_scale: float, t=None):
    from tasks import PhasePoints, Rollouts, Task

    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(2, 11, 1, 2, generator=g, dtype=torch.float64), torch.randn(2, 11, 1, 2, generator=g, dtype=torch.float64)
    support = PhasePoints(q[0, :4], p[0, :4], support_scale * q[1, :4], support_scale * p[1, :4])
    query = PhasePoints(q[0, 4:8], p[0, 4:8], query_scale * q[1, 4:8], query_scale * p[1, 4:8])
    t = torch.linspace(0, 1, 11, dtype=torch.float64) if t is None else t
    return Task(system, {}, support, query, Rollouts(t, q, p))


def _units(field, q=1.0, p=1.0):
    from metaham.meta import TaskUnits

    return TaskUnits(*(torch.tensor([v], dtype=torch.float64) for v in (q, p, field)))


def test_task_units_put_each_task_in_units_of_its_support_rms():
    from metaham.meta import task_units, to_meta_tasks

    tasks = [_phase_task("mass_spring", 1.0, 1.0), _phase_task("mass_spring", 30.0, 20.0), _phase_task("pendulum", 0.0, 1.0)]
    ones = torch.ones(3, dtype=torch.float64)
    assert all(torch.equal(u, ones) for u in task_units(tasks, "none"))
    units = task_units(tasks, "support_rms")
    assert torch.equal(units.q, ones) and torch.equal(units.p, ones)
    assert units.field[1] == pytest.approx(30 * float(units.field[0]), rel=1e-12)
    assert units.field[2] == 1.0  # an all-zero support set keeps the raw unit
    scaled = to_meta_tasks(tasks, units)
    for task, meta, s in zip(tasks[:2], scaled[:2], units.field[:2]):
        support = torch.cat([meta.support[2], meta.support[3]], dim=-1)
        assert support.pow(2).mean().sqrt() == pytest.approx(1.0, rel=1e-12)
        torch.testing.assert_close(meta.query[2] * s, task.query.dq, rtol=1e-14, atol=0)  # the support's unit
        assert meta.support[0] is task.support.q and meta.query[1] is task.query.p  # states are not rescaled
    plain = to_meta_tasks(tasks, task_units(tasks, "none"))
    assert all(m.support[2] is t.support.dq for m, t in zip(plain, tasks))
    with pytest.raises(ValueError, match="unknown task scale 'rms'"):
        task_units(tasks, "rms")


def test_state_units_scale_q_p_and_the_field_by_their_support_rms():
    from metaham.meta import task_units, to_meta_tasks

    task = _phase_task("mass_spring", 3.0, 3.0)
    (q_unit, p_unit, field), = zip(*task_units([task], "support_state"))
    assert float(q_unit) == pytest.approx(float(task.support.q.double().pow(2).mean().sqrt()), rel=1e-12)
    assert float(p_unit) == pytest.approx(float(task.support.p.double().pow(2).mean().sqrt()), rel=1e-12)
    meta = to_meta_tasks([task], _units(float(field), float(q_unit), float(p_unit)))[0]
    q, p, dq, dp = meta.support
    for tensor in (q, p, torch.cat([dq, dp], dim=-1)):  # every input and the targets: mean square 1
        assert float(tensor.double().pow(2).mean()) == pytest.approx(1.0, rel=1e-10)
    # By hand: q / a, p / b, dq / (a s), dp / (b s).
    torch.testing.assert_close(meta.query[0], task.query.q / float(q_unit), rtol=1e-14, atol=0)
    torch.testing.assert_close(meta.query[3], task.query.dp / float(p_unit * field), rtol=1e-14, atol=0)
    # Raw MSE from the halves: s^2 (a^2 mse_q + b^2 mse_p) / 2.
    halves = torch.tensor([[[0.5, 2.0]]], dtype=torch.float64)
    expected = 0.5 * float(field) ** 2 * (float(q_unit) ** 2 * 0.5 + float(p_unit) ** 2 * 2.0)
    assert float(_units(float(field), float(q_unit), float(p_unit)).raw_mse(halves)) == pytest.approx(expected)


def test_models_rolled_out_in_one_batch_match_their_rollouts_alone():
    """evaluate_adaptation rolls out every model's adapted weights in one batch: each row's trajectory is its own
    model's, to the fixed-point tolerance, whatever else shares the batch."""
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta import TaskUnits
    from metaham.meta.evaluate import _rollouts

    models = [HamiltonianGNN(hidden=8, layers=1).double() for _ in range(2)]
    first, second = ({name: value.detach() for name, value in m.named_parameters()} for m in models)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    tasks = [_phase_task("mass_spring", 1, 1, t) for _ in range(3)]
    units = TaskUnits(*(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) for _ in range(3)))
    q, p = _rollouts(models[0], [first, second, first], tasks, edge_index(1), units)
    assert not torch.allclose(q[0], q[1])  # two different fields
    for rows, params in (([0, 2], first), ([1], second)):
        alone_q, alone_p = _rollouts(models[1], [params] * len(rows), [tasks[r] for r in rows], edge_index(1),
                                     units.take(rows))
        torch.testing.assert_close(q[rows], alone_q, rtol=0, atol=1e-11)
        torch.testing.assert_close(p[rows], alone_p, rtol=0, atol=1e-11)


def test_a_scaled_rollout_is_the_unit_field_run_for_scaled_time():
    """A task's model field times s, on the time grid t, is the plain field on the grid s t: the implicit
    midpoint step x1 = x0 + h s f((x0 + x1) / 2) is the step of size s h of f."""
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta.evaluate import _rollouts

    torch.manual_seed(0)
    model = HamiltonianGNN(hidden=8, layers=1).double()
    params = {name: value.detach() for name, value in model.named_parameters()}
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    scaled_q, scaled_p = _rollouts(model, [params], [_phase_task("mass_spring", 1, 1, t)], edge_index(1),
                                      _units(2.5))
    q, p = _rollouts(model, [params], [_phase_task("mass_spring", 1, 1, 2.5 * t)], edge_index(1), _units(1.0))
    torch.testing.assert_close(scaled_q, q, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(scaled_p, p, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(scaled_q, _rollouts(model, [params], [_phase_task("mass_spring", 1, 1, t)], edge_index(1),
                                                  _units(1.0))[0])


def test_a_rollout_in_state_units_is_the_model_in_scaled_coordinates():
    """With units (a, b, s) the raw rollout from (q0, p0) is a b-scaled copy of the model's own rollout from
    (q0 / a, p0 / b) with field s f: the raw field (a s f_q, b s f_p)(q / a, p / b) is that flow in raw units."""
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta.evaluate import _rollouts

    torch.manual_seed(1)
    model = HamiltonianGNN(hidden=8, layers=1).double()
    params = {name: value.detach() for name, value in model.named_parameters()}
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    task = _phase_task("mass_spring", 1, 1, t)
    q, p = _rollouts(model, [params], [task], edge_index(1), _units(1.5, q=2.0, p=0.5))
    scaled = _phase_task("mass_spring", 1, 1, t)
    scaled.rollouts.q.div_(2.0), scaled.rollouts.p.div_(0.5)
    q_model, p_model = _rollouts(model, [params], [scaled], edge_index(1), _units(1.5))
    torch.testing.assert_close(q, 2.0 * q_model, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(p, 0.5 * p_model, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("units_kind", ["support_rms", "support_state"])
def test_a_run_in_task_units_reports_raw_mse(tmp_path, monkeypatch, units_kind):
    from metaham.hamiltonian import system_edge_index
    from metaham.meta import task_units
    from metaham.meta.config import initial_model
    from tasks.cache import derive_seed

    monkeypatch.setenv("METAHAM_CACHE", str(tmp_path / "cache"))
    config = load_meta_config(TINY, ["train.outer_steps=2", "train.validate_every=1", f"train.task_scale={units_kind}"])
    training.train(config, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.config["train"]["task_scale"] == units_kind
    # The outer loop trained in task units: the same run in raw units ends elsewhere from the same start.
    training.train(load_meta_config(TINY, ["train.outer_steps=2", "train.validate_every=1", "train.task_scale=none"]),
                   tmp_path / "raw", progress=False)
    raw_run = load_run(tmp_path / "raw")
    for kind in ("meta", "pretrained"):
        ours, theirs = run.checkpoints[kind]["model"], raw_run.checkpoints[kind]["model"]
        assert any(not torch.equal(ours[name], theirs[name]) for name in ours)
    report = evaluate_adaptation(run, "pendulum", shots=8, steps=2, n_tasks=3, seed=1, progress=False)
    assert report.info["task_scale"] == units_kind and "support RMS" in report.protocol
    # Step 0 of the random model by hand: its field at the state in task units, mapped to raw units (position
    # unit x field unit, momentum unit x field unit), against the raw targets.
    tasks = _fresh_tasks(run, "pendulum", 8, 3, 1, None, False)
    units = task_units(tasks, units_kind)
    assert not torch.allclose(units.field, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(units.p, torch.ones(3, dtype=torch.float64)) == (units_kind == "support_rms")
    model = initial_model(config, derive_seed("random_init", 1))
    graph = system_edge_index(systems.get("pendulum"))
    for i, task in enumerate(tasks):
        a, b, s = (float(u[i]) for u in units)
        dq, dp = model.vector_field(task.query.q / a, task.query.p / b, graph)
        raw = torch.cat([a * s * dq - task.query.dq, b * s * dp - task.query.dp], dim=-1).pow(2).mean()
        # float32 tasks: the evaluation forms the MSE in task units, then multiplies by the unit squared.
        assert float(report.results["random"].curves[i, 0]) == pytest.approx(float(raw.detach()), rel=1e-5)
    # Without the units the same model's step-0 error differs: the check above would catch an unscaled field.
    dq, dp = model.vector_field(tasks[0].query.q, tasks[0].query.p, graph)
    unscaled = torch.cat([dq - tasks[0].query.dq, dp - tasks[0].query.dp], dim=-1).pow(2).mean()
    assert float(report.results["random"].curves[0, 0]) != pytest.approx(float(unscaled.detach()), rel=1e-2)
