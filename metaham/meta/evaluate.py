"""Few-shot adaptation to a system: the meta-trained, pre-trained and randomly initialised models compared.

The protocol (Song and Jeong, ICLR 2024, with the adaptation optimizer measured to matter, see
``metaham.meta.adapt``):

1. ``n_tasks`` fresh tasks of the system: new parameter draws and trajectories, simulated from a pool seed
   that no training pool uses (the split's meta-test parameter ranges apply to a parametric split).
2. Each model (``meta``, ``pretrained``: the run's checkpoints; ``random``: a fresh initialisation of the same
   architecture) is adapted on each task's K support points with ``steps`` steps of full-batch SGD at the
   inner-loop learning rate the run was meta-trained with (the run's training loss drives the updates),
   safeguarded by default (``backtrack``, see :mod:`metaham.meta.adapt`): a step that would raise the support
   loss is halved until it does not, so no task diverges, while every descending step is plain SGD's.
   The vector-field MSE on the task's query points is recorded after every step.
3. The adapted Hamiltonian of each task is rolled out from the task's held-out initial states with the
   implicit midpoint rule (symplectic for the non-separable learned H), one step per saved time of the
   ground-truth rollout, and compared with it: rollout error ``|z - z_hat| / (|z| + |z_hat|)`` and the error of
   the TRUE energy along the predicted rollout (:mod:`metaham.meta.metrics`), each averaged over time and
   aggregated with a geometric mean over all trajectories.

>>> from metaham.meta.evaluate import evaluate_adaptation, load_run
>>> run = load_run("runs/leave_pendulum")                              # doctest: +SKIP
>>> report = evaluate_adaptation(run, "pendulum", shots=50, steps=50)  # doctest: +SKIP
>>> report.to_dict()["models"]["meta"]["vf_mse"]["10"]                 # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

import systems
from metaham.hamiltonian import HamiltonianGNN, system_edge_index
from metaham.integrate import odeint_hamiltonian
from metaham.text import bar_disabled
from metaham.train import load_checkpoint
from tasks import Split, Task, TaskConfig, TaskDistribution
from tasks.cache import derive_seed

from .adapt import BACKTRACK, adapt_tasks
from .batching import TaskUnits, task_units, to_meta_tasks
from .losses import field_mse_halves
from .metrics import energy_relative_error, geometric_mean, rollout_relative_error
from .config import CHECKPOINT_FORMAT, LEARNERS, build_model, initial_model, resolve_split, saved_config, task_config, task_loss

MODELS = ("meta", "pretrained", "random")
REPORT_STEPS = (0, 1, 5, 10)
ROLLOUT_METHOD = "implicit_midpoint"


@dataclass
class TrainedRun:
    """A meta-train run directory: its config, split and the checkpoints of its learners."""

    run_dir: Path
    config: dict[str, Any]
    split: Split
    checkpoints: dict[str, dict[str, Any]]

    def model(self, kind: str) -> HamiltonianGNN:
        """The trained model of learner ``kind`` (``meta`` or ``pretrained``), in the tasks' dtype."""
        state = self.checkpoints[kind]
        model = build_model(state["config"]["model"]).to(task_config(self.config).torch_dtype)
        model.load_state_dict(state["model"])
        return model.eval()  # a sparse gate saved in its random phase then uses its kept paths, not a fresh draw


def load_run(run_dir: str | Path) -> TrainedRun:
    """Read a run directory written by :func:`metaham.meta.training.train`.

    Raises ``FileNotFoundError`` (no such directory, no ``meta.pt``) or ``ValueError`` (a foreign file).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not (run_dir / "meta.pt").is_file():  # before the config, whose keys would not say what went wrong
        qh9 = (run_dir / "last.pt").is_file()
        hint = " (it holds a `metaham qh9 train` run: score that with `metaham qh9 eval`)" if qh9 else ""
        raise FileNotFoundError(f"{run_dir / 'meta.pt'} not found; has `metaham meta-train --out {run_dir}` run?{hint}")
    config = saved_config(run_dir)
    checkpoints = {}
    for kind in LEARNERS:
        path = run_dir / f"{kind}.pt"
        if path.is_file():
            state = load_checkpoint(path)
            if state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != kind:
                raise ValueError(f"{path}: not a metaham meta-train checkpoint of the {kind!r} learner")
            checkpoints[kind] = state
    return TrainedRun(run_dir, config, resolve_split(config["split"]), checkpoints)


@dataclass
class ModelResult:
    """One model's adaptation: query MSE per task and step, and its rollout errors per trajectory.

    ``curves`` ``(N, steps + 1)``; ``rollout_errors``, ``energy_errors`` ``(N, R)``; ``example`` the first task's
    first predicted rollout ``(q, p)``, each ``(T, n, 2)``.
    """

    curves: Tensor
    rollout_errors: Tensor
    energy_errors: Tensor
    diverged: int
    example: tuple[Tensor, Tensor]
    training_steps: int | None = None


@dataclass
class AdaptationReport:
    """The comparison of :func:`evaluate_adaptation`; :meth:`to_dict` is the JSON of ``metaham adapt``."""

    system: str
    shots: int
    steps: int
    seed: int
    lr: float
    backtrack: int
    protocol: str
    info: dict[str, Any]
    results: dict[str, ModelResult]
    truth: tuple[Tensor, Tensor, Tensor] = field(repr=False)  # t (T,), q and p (T, n, 2) of the example rollout
    # (N,) mean square of each task's query targets: vf_nmse = vf_mse / this puts systems whose vector fields
    # differ 25-100x in scale on one footing (1.0 is the error of predicting a zero field).
    query_power: Tensor | None = field(default=None, repr=False)

    @property
    def eval_steps(self) -> list[int]:
        return sorted({s for s in REPORT_STEPS if s <= self.steps} | {self.steps})

    def mean_curve(self, name: str) -> list[float]:
        return self.results[name].curves.mean(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        models = {}
        for name, result in self.results.items():
            # A diverged task (non-finite MSE) counts as infinitely bad: the mean says so, the median stays useful.
            curves = torch.nan_to_num(result.curves, nan=float("inf"))
            at = {str(s): curves[:, s] for s in self.eval_steps}
            normalised = {k: v / self.query_power for k, v in at.items()} if self.query_power is not None else {}
            models[name] = {
                "vf_mse": {k: float(v.mean()) for k, v in at.items()},
                "vf_nmse": {k: float(v.mean()) for k, v in normalised.items()},
                "vf_nmse_median": {k: float(v.median()) for k, v in normalised.items()},
                "vf_mse_std": {k: float(v.std(unbiased=False)) if torch.isfinite(v).all() else None for k, v in at.items()},
                "vf_mse_median": {k: float(v.median()) for k, v in at.items()},
                "rollout_rel_err": geometric_mean(result.rollout_errors),
                "energy_rel_err": geometric_mean(result.energy_errors),
                "diverged_tasks": int((~torch.isfinite(result.curves)).any(1).sum()),
                "diverged_rollouts": result.diverged,
                "training_steps": result.training_steps,
                "vf_mse_curve": self.mean_curve(name),
            }
        return {
            "system": self.system,
            "shots": self.shots,
            "steps": self.steps,
            "models": models,
            "tasks": int(next(iter(self.results.values())).curves.shape[0]),
            "seed": self.seed,
            "adapt_lr": self.lr,
            "adapt_backtrack": self.backtrack,
            "protocol": self.protocol,
            **self.info,
        }


def evaluate_adaptation(
    run: TrainedRun,
    system: str,
    *,
    shots: int,
    steps: int,
    n_tasks: int = 20,
    seed: int = 0,
    lr: float | None = None,
    backtrack: int = BACKTRACK,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> AdaptationReport:
    """Adapt ``meta``, ``pretrained`` (when the run has it) and ``random`` to ``n_tasks`` fresh tasks of ``system``.

    Args:
        run: a loaded run (:func:`load_run`).
        system: a registered system name (built-in or plugin).
        shots: K, support points per task.
        steps: SGD steps of adaptation (the rollouts use the parameters after the last one).
        n_tasks: tasks, each a fresh parameter draw of the system.
        seed: seeds the task pool (kept apart from every training pool) and the random model.
        lr: adaptation learning rate (default: the run's inner-loop rate ``maml.inner_lr``).
        backtrack: halvings of a step that would not lower the support loss (0: plain SGD).
        device: where to compute (default: cpu).
        cache_dir: task-pool cache (default :func:`tasks.default_cache_dir`).
        progress: progress bar on stderr (None: only on a terminal).
    """
    for name, value in (("shots", shots), ("steps", steps), ("n_tasks", n_tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    started = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cpu")
    physics = systems.get(system)
    config = run.config
    lr = float(config["maml"]["inner_lr"] if lr is None else lr)
    tasks = _fresh_tasks(run, system, shots, n_tasks, seed, cache_dir, progress)
    tasks = [task.to(device) for task in tasks]
    graph = system_edge_index(physics, device=device)

    models: dict[str, tuple[HamiltonianGNN, dict[str, Any]]] = {}
    for kind in LEARNERS:
        if kind in run.checkpoints:
            models[kind] = (run.model(kind).to(device), _protocol(run.checkpoints[kind], lr, device))
    random_model = initial_model(config, derive_seed("random_init", seed)).to(device).eval()
    models["random"] = (random_model, {"lr": lr, "names": None})

    # Every model adapts in the tasks' units of train.task_scale (1 unless the run trained that way); MSEs and
    # rollouts are mapped back to the raw field, so runs with and without the units compare on one footing.
    units = task_units(tasks, config["train"]["task_scale"])
    meta_tasks = to_meta_tasks(tasks, units)  # the same views for every model
    bar = tqdm(total=len(models), desc="adapting", unit="model", disable=bar_disabled(progress))
    curves, adapted = {}, {}
    for name, (model, protocol) in models.items():
        outcomes = adapt_tasks(model, meta_tasks, steps=steps, lr=protocol["lr"],
                               loss=task_loss(config), metric=field_mse_halves, names=protocol["names"],
                               backtrack=backtrack)
        curves[name] = units.raw_mse(torch.tensor([o.query_loss for o in outcomes], dtype=torch.float64))
        adapted[name] = [o.params for o in outcomes]
        bar.update(1)
    bar.close()
    # Every model's rollouts in one batch: the models share one architecture, so each implicit step calls the
    # field once for all of them instead of once per model (the call, not the batch size, is what costs here).
    n_tasks = len(tasks)
    q_all, p_all = _rollouts(random_model, [params for name in models for params in adapted[name]],
                             tasks * len(models), graph, units.take(list(range(n_tasks)) * len(models)))
    truth_q = torch.stack([t.rollouts.q for t in tasks])  # (N, R, T, n, 2)
    truth_p = torch.stack([t.rollouts.p for t in tasks])
    results = {}
    for name, q_pred, p_pred in zip(models, q_all.split(n_tasks), p_all.split(n_tasks)):  # model-major rows
        energy = torch.stack([physics.hamiltonian(q_pred[i], p_pred[i], tasks[i].params) for i in range(n_tasks)])
        state = run.checkpoints.get(name)
        results[name] = ModelResult(
            curves=curves[name],
            rollout_errors=rollout_relative_error(truth_q, truth_p, q_pred, p_pred).cpu(),
            energy_errors=energy_relative_error(energy.detach()).cpu(),
            diverged=_failed_trajectories(q_pred),
            example=(q_pred[0, 0].cpu(), p_pred[0, 0].cpu()),
            training_steps=int(state["step"]) if state is not None else None,
        )

    rollouts = tasks[0].rollouts
    t = rollouts.t
    n_steps, r = t.numel() - 1, rollouts.q.shape[0]
    k_query = len(tasks[0].query)
    protocol = (
        f"each model adapted on the same K={shots} support points per task with {steps} steps of "
        + (f"full-batch SGD at lr {lr:g}, a step that does not lower the support loss halved up to {backtrack} "
           "times and skipped if none does" if backtrack else f"plain full-batch SGD at lr {lr:g}")
        + f" (loss: {config['train']['loss']}"
        + _UNITS_TEXT[config["train"]["task_scale"]]
        + (", meta model: its learned Meta-SGD rates" if config["maml"]["meta_sgd"] else "")
        + (", meta model: read-out only (ANIL)" if config["maml"]["anil"] else "")
        + f"); vf_mse: vector-field MSE on {k_query} query points, mean over {len(tasks)} tasks of fresh "
        "parameter draws (vf_nmse: each task's MSE divided by the mean square of its query targets); "
        f"rollouts: {ROLLOUT_METHOD}, {n_steps} steps of {float(t[1] - t[0]):.3g} from {r} held-out "
        f"initial states per task against the ground truth ({config['tasks']['integrator']}); rollout_rel_err and "
        f"energy_rel_err (true H along the predicted rollout): mean over time of |a-b|/(|a|+|b|), geometric "
        f"mean over {len(tasks) * r} trajectories"
    )
    info = {
        "held_out": _split_role(run.split, system) != "train",
        "split_role": _split_role(run.split, system),
        "split": run.split.name,
        "train_systems": list(run.split.train_systems),
        "query_points": k_query,
        "rollout": {"steps": n_steps, "t_end": float(t[-1]), "per_task": r, "integrator": ROLLOUT_METHOD},
        "run": str(run.run_dir),
        "backbone": config["model"]["backbone"],
        "task_scale": config["train"]["task_scale"],
        "seconds": time.perf_counter() - started,
    }
    query_power = torch.stack([torch.cat([t.query.dq, t.query.dp], dim=-1).double().pow(2).mean() for t in tasks])
    return AdaptationReport(system, shots, steps, seed, lr, backtrack, protocol, info, results,
                            truth=(t.cpu(), tasks[0].rollouts.q[0].cpu(), tasks[0].rollouts.p[0].cpu()),
                            query_power=query_power.cpu())


_UNITS_TEXT = {
    "none": "",
    "support_rms": ", each task's targets in units of its support RMS",
    "support_state": ", each task's q, p and targets in units of their support RMS",
}


def _split_role(split: Split, system: str) -> str:
    """How ``system``'s adaptation tasks relate to training. Held out means "not trained on", so only
    ``"train"`` is not held out: ``"test"`` a test system of the split, ``"test_ranges"`` a trained system
    adapted in the split's held-out parameter ranges (parametric splits), ``"unseen"`` a system the split never
    names (a plugin, another split's system)."""
    if system in split.test_ranges:
        return "test_ranges"
    if system in split.train_systems:
        return "train"
    return "test" if system in split.test_systems else "unseen"


def _fresh_tasks(run: TrainedRun, system: str, shots: int, n_tasks: int, seed: int, cache_dir, progress) -> list[Task]:
    """``n_tasks`` tasks of ``system`` from a pool of exactly that many fresh parameter draws."""
    settings = task_config(run.config).to_dict()
    settings.update(k_support=shots, tasks_per_system=n_tasks)
    ranges = run.split.test_ranges.get(system)
    distribution = TaskDistribution(
        [system], TaskConfig.from_dict(settings, source="adaptation tasks"),
        seed=derive_seed("adapt", run.config["data_seed"], seed),
        param_ranges={system: ranges} if ranges else None, cache_dir=cache_dir, progress=progress,
    )
    return distribution.sample(n_tasks, seed=seed)


def _protocol(state: Mapping[str, Any], lr: float, device: torch.device) -> dict[str, Any]:
    """Adaptation settings of a trained learner: its learned Meta-SGD rates or ANIL names, else ``lr``."""
    saved = state["adapt"]
    if saved["lrs"] is not None:
        return {"lr": {n: rate.to(device) for n, rate in zip(saved["names"], saved["lrs"])}, "names": saved["names"]}
    return {"lr": lr, "names": saved["names"]}


def _rollouts(model: HamiltonianGNN, adapted: list[dict[str, Tensor]], tasks: list[Task], graph: Tensor,
              units: TaskUnits) -> tuple[Tensor, Tensor]:
    """Roll out each adapted H (``adapted[i]``: parameters of ``model``'s architecture, fitted to ``tasks[i]``),
    mapped from the task's units to raw ones (the model learned H in those units), from the task's rollout
    initial states on their time grid.

    Returns ``q, p`` ``(N, R, T, n, 2)``. Trajectories whose integration failed are NaN from the failure on (the
    metrics count them as the worst error). All entries with finite adapted weights run as one batch (``vmap``
    over the adapted parameters); a trajectory whose implicit step does not converge, or whose state leaves the
    finite numbers, fails alone while the batch goes on.
    """
    t = tasks[0].rollouts.t
    q0 = torch.stack([task.rollouts.q[:, 0] for task in tasks])  # (N, R, n, 2)
    p0 = torch.stack([task.rollouts.p[:, 0] for task in tasks])
    stacked = {name: torch.stack([params[name] for params in adapted]) for name in adapted[0]}
    units = TaskUnits(*(u.to(q0) for u in units))
    shape = (len(tasks), q0.shape[1], t.numel(), *q0.shape[2:])
    q = torch.full(shape, float("nan"), dtype=q0.dtype, device=q0.device)
    p = q.clone()
    # Models whose SGD diverged to non-finite weights cannot be integrated: they keep NaN states.
    finite = torch.stack([torch.isfinite(v).flatten(1).all(1) for v in stacked.values()]).all(0)
    rows = finite.nonzero().flatten().tolist()
    if rows:
        q[rows], p[rows] = _integrate(model, {k: v[rows] for k, v in stacked.items()},
                                      units.take(rows), q0[rows], p0[rows], t, graph)
    return q, p


def _failed_trajectories(q: Tensor) -> int:
    """How many rollouts of ``q`` ``(N, R, T, n, 2)`` have a non-finite state (failed, or not integrated)."""
    return int((~torch.isfinite(q).flatten(2).all(2)).sum())


def _integrate(model: HamiltonianGNN, stacked: dict[str, Tensor], units: TaskUnits, q0: Tensor, p0: Tensor,
               t: Tensor, graph: Tensor):
    """Implicit-midpoint rollouts of a batch of adapted models, model ``i``'s field mapped from the units
    ``units[i]`` to raw ones (see :class:`TaskUnits`: still Hamiltonian): ``q0, p0`` ``(N, R, n, 2)`` ->
    ``(N, R, T, n, 2)``."""
    def one_model(params, q_unit, p_unit, field_unit, q, p):
        dq, dp = model.vector_field(q / q_unit, p / p_unit, graph, params=params)
        return dq * (q_unit * field_unit), dp * (p_unit * field_unit)

    field = torch.func.vmap(one_model)
    with torch.no_grad():
        q, p = odeint_hamiltonian(lambda q_, p_: field(stacked, *units, q_, p_), q0, p0, t, method=ROLLOUT_METHOD,
                                  failed_trajectories="nan")
    return q.movedim(0, 2), p.movedim(0, 2)
