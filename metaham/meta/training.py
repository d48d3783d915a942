"""Meta-training: one loop that trains the meta-learner (MAML) and the pre-trained baseline alike.

:func:`train` trains the learners ``meta`` (``MAML.meta_loss``) and, unless ``train.pretrain`` is false,
``pretrained`` (``Pretrain.meta_loss``) one after the other, from the same initialisation, on the same
meta-batches (batch ``b`` depends only on ``(train.seed, b)``), with the same Adam optimizer and number of
outer steps: the fair comparison of Song and Jeong (ICLR 2024). The config (:func:`load_meta_config`) and the
models and learners it builds live in :mod:`metaham.meta.config`; the run directory, logs, checkpoints and
step loop are the engine's (:mod:`metaham.train`).

A run directory holds::

    config.yaml                  the resolved config (what --resume and `metaham adapt` read)
    meta.pt, pretrained.pt       checkpoints: plain dicts loadable with weights_only=True, rewritten atomically
                                 every train.checkpoint_every steps and at the end (model, Adam state, Meta-SGD
                                 rates, step, config, RNG state)
    meta.csv, pretrained.csv     the training log (step, mean outer loss, seconds, held-in validation MSE)
    tensorboard/                 the same curves, when tensorboard is installed

Resuming reloads the checkpoint and continues with the next meta-batch, so a resumed run is identical to an
uninterrupted one. The held-in validation (optional) adapts on tasks of the *training* systems drawn from
fresh pools (never the held-out system), so hyper-parameters can be chosen without looking at it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from metaham.train import ConfigError
from metaham.train.checkpoint import CheckpointError, capture_state, restore_state
from metaham.train.distributed import World, current_world, shard_slice, shard_weight
from metaham.train.log import read_log as _read_log
from metaham.train.loop import Clock, LoopSettings, run_loop
from metaham.train.run import Run, start_run
from tasks import Split, Task, TaskConfig, TaskDistribution
from tasks.cache import derive_seed

from .adapt import BACKTRACK, adapt_tasks
from .batching import MetaTask, task_units, to_meta_tasks
from .config import (
    LEARNERS,
    RUN,
    initial_model,
    make_learner,
    resolve_split,
    sparsity_scheduler,
    task_config,
    task_loss,
)
from .losses import field_mse_halves
from .maml import MAML
from .pretrain import Pretrain

LOG_FIELDS = ("step", "loss", "seconds", "val_query_mse")
LOG_TAGS = {"loss": "loss/outer", "val_query_mse": "loss/validation_query_mse"}


@dataclass
class LearnerResult:
    """What one learner's training produced."""

    kind: str
    steps: int
    outer_steps: int
    final_loss: float | None
    seconds: float
    checkpoint: Path
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "outer_steps": self.outer_steps,
            "final_loss": self.final_loss,
            "seconds": self.seconds,
            "checkpoint": str(self.checkpoint),
            "resumed_from": self.resumed_from,
        }


def train(
    config: dict[str, Any],
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
    world: World | None = None,
) -> dict[str, LearnerResult]:
    """Meta-train (and pre-train) as ``config`` says, writing checkpoints and logs into ``run_dir``.

    Args:
        config: a validated config (:func:`~metaham.meta.config.load_meta_config`).
        run_dir: the run directory (created); see the module docstring for its files.
        resume: continue the run in ``run_dir`` from its checkpoints (learners already finished are skipped).
        progress: show progress bars on stderr (None: only on a terminal).
        cache_dir: where the task pools are cached (default :func:`tasks.default_cache_dir`).
        world: the ranks torchrun started (:func:`~metaham.train.distributed.open_world`; default
            :func:`~metaham.train.distributed.current_world`). Each rank takes its contiguous share of the tasks of
            every meta-batch (``train.meta_batch`` stays the global meta-batch) and the meta-gradients are
            averaged, each rank's loss weighted by its share: N ranks make the updates of one process. Every
            rank validates (the same tasks, the same result); rank 0 alone writes into ``run_dir``.

    Returns:
        learner name -> :class:`LearnerResult`.
    """
    world = current_world() if world is None else world
    if config["train"]["meta_batch"] < world.size:
        raise ConfigError(f"{world.size} ranks need train.meta_batch >= {world.size} (one task per rank at least), "
                          f"got {config['train']['meta_batch']}")
    run = start_run(run_dir, copy.deepcopy(config), RUN, resume=resume, world=world)
    split = resolve_split(run.config["split"])
    distribution = split.train_distribution(task_config(run.config), seed=run.config["data_seed"],
                                            cache_dir=cache_dir, progress=progress)
    validation = _validation_tasks(run.config, split, cache_dir, progress)
    kinds = LEARNERS if run.config["train"]["pretrain"] else LEARNERS[:1]
    return {kind: _Learner(kind, run, split, distribution, validation, resume).train(progress) for kind in kinds}


def read_log(run_dir: str | Path, kind: str) -> list[dict[str, float | None]]:
    """The CSV log of one learner as a list of rows (numbers, or None where a column is empty)."""
    return _read_log(Path(run_dir) / f"{kind}.csv")


def _validation_tasks(config, split: Split, cache_dir, progress) -> list[Task]:
    """Held-in validation tasks: the training systems, fresh parameter draws (own pool seed)."""
    n = config["train"]["validate_tasks"]
    if config["train"]["validate_every"] == 0:
        return []
    base = task_config(config).to_dict()
    base.update(tasks_per_system=-(-n // len(split.train_systems)), rollouts_per_task=1)
    distribution = TaskDistribution(
        split.train_systems, TaskConfig(**base), seed=derive_seed("validate", config["data_seed"]),
        param_ranges=split.train_ranges, cache_dir=cache_dir, progress=progress,
    )
    return distribution.sample(n, seed=0)


class _Learner:
    """One learner as a :class:`~metaham.train.loop.Job`: its model, meta-batches, outer loss, log and checkpoint."""

    failure_hint = "lower train.lr or maml.inner_lr"

    def __init__(self, kind: str, run: Run, split: Split, distribution: TaskDistribution, validation: list[Task],
                 resume: bool) -> None:
        config, settings = run.config, run.config["train"]
        self.name, self.run, self.split, self.distribution, self.validation = kind, run, split, distribution, validation
        self.config, self.settings = config, settings
        self.checkpoint = f"{kind}.pt"
        # Both learners start from the same initialisation: the comparison isolates the training objective.
        self.model = initial_model(config, derive_seed("init", settings["seed"])).to(run.device)
        self.learner = make_learner(kind, self.model, config).to(run.device)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=settings["lr"])
        # Created before a checkpoint is restored (it sets the gates to step 0's phase; the restore then puts back
        # the saved step, phase and kept paths). No learning-rate schedule in meta-training.
        self.sparsity = sparsity_scheduler(self.model, config)
        self.schedulers: list[Any] = [self.sparsity] if self.sparsity is not None else []
        self.start, self.seconds, self.last_loss = 0, 0.0, None
        self.window: list[float] = []  # outer losses since the last log row (checkpointed: the mean spans a resume)
        if resume and run.has(self.checkpoint):
            state = run.load(self.checkpoint)
            if state.get("kind") != kind:
                raise ValueError(f"{run.path / self.checkpoint}: not a checkpoint of the {kind!r} learner")
            if self.sparsity is not None and "sparsity" not in state:
                raise CheckpointError(f"{run.path / self.checkpoint}: written before meta-training drove the sparse "
                                      "gates' phases (no 'sparsity' state); start a new run")
            restore_state(state, self._parts())
            self.start, self.seconds, self.last_loss = int(state["step"]), float(state["seconds"]), state["last_loss"]
            self.window = list(state.get("window", []))
        self.log = run.log(f"{kind}.csv", LOG_FIELDS, keep_through=self.start if self.start else None, tags=LOG_TAGS,
                           tensorboard=f"tensorboard/{kind}", formats={"seconds": ".3f"})

    def train(self, progress: bool | None) -> LearnerResult:
        settings = self.settings
        try:
            if self.start == 0 and self.validation:
                self.log.write({"step": 0, "seconds": 0.0, "val_query_mse": self._validate()})
            loop = LoopSettings(total_steps=settings["outer_steps"], checkpoint_every=settings["checkpoint_every"],
                                progress=progress)
            outcome = run_loop(self, loop, start_step=self.start, seconds=self.seconds, world=self.run.world)
        finally:
            self.log.close()
        return LearnerResult(self.name, outcome.steps, settings["outer_steps"], self.last_loss, outcome.seconds,
                             self.run.path / self.checkpoint, self.start)

    # -- the Job ------------------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.learner.parameters()

    def batches(self, step: int) -> Iterator[list[Task]]:
        total = self.settings["outer_steps"]
        return self.distribution.meta_batches(self.settings["meta_batch"],
                                              derive_seed("meta_batches", self.settings["seed"]), start=step,
                                              num_batches=max(0, total - step))

    def loss(self, batch: list[Task], step: int) -> torch.Tensor:
        mine = [task.to(self.run.device) for task in batch[shard_slice(len(batch), self.run.world)]]
        tasks: list[MetaTask] = to_meta_tasks(mine, task_units(mine, self.settings["task_scale"]))
        return self.learner.meta_loss(tasks) * shard_weight(len(mine), len(batch), self.run.world)

    def after_step(self, step: int, loss: float, clock: Clock) -> bool:
        self.window.append(loss)
        validate_now = bool(self.validation) and step % self.settings["validate_every"] == 0
        if step % self.settings["log_every"] == 0 or step == self.settings["outer_steps"] or validate_now:
            val = self._validate() if validate_now else None
            self.last_loss = sum(self.window) / len(self.window)
            self.log.write({"step": step, "loss": self.last_loss, "seconds": clock.seconds(), "val_query_mse": val})
            self.window = []
        return False

    def save(self, step: int, seconds: float) -> None:
        self.run.save(self.checkpoint, {
            **capture_state(self._parts()),
            "kind": self.name,
            "step": step,
            "outer_steps": self.settings["outer_steps"],
            "seconds": seconds,
            "model_config": dict(self.model.config),
            "model": self.model.state_dict(),  # what metaham adapt reads
            "config": self.config,
            "split": self.split.to_dict(),
            "adapt": _adapt_protocol(self.name, self.learner, self.config),
            "last_loss": self.last_loss,
            "window": list(self.window),
        })

    def postfix(self) -> str:
        recent = self.window[-20:]
        return f"loss {sum(recent) / len(recent):.4g}" if recent else ""

    def _parts(self) -> dict[str, Any]:
        parts = {"learner": self.learner, "optimizer": self.optimizer}
        return parts | ({"sparsity": self.sparsity} if self.sparsity is not None else {})

    def _validate(self) -> float | None:
        return _validate(self.learner, self.validation, self.config, self.run.device)


def _adapt_protocol(kind: str, learner: MAML | Pretrain, config: Mapping[str, Any]) -> dict[str, Any]:
    """How to adapt this learner at test time: the inner-loop optimizer it was trained for."""
    protocol: dict[str, Any] = {"lr": config["maml"]["inner_lr"], "names": None, "lrs": None}
    if kind == "meta" and isinstance(learner, MAML) and (config["maml"]["anil"] or learner.inner_lrs is not None):
        protocol["names"] = list(learner.adapted_names)
        if learner.inner_lrs is not None:
            protocol["lrs"] = [lr.detach() for lr in learner.inner_lrs]
    return protocol


def _validate(learner, validation: list[Task], config: Mapping[str, Any], device: torch.device) -> float | None:
    """Mean query vector-field MSE of held-in tasks after ``train.validate_steps`` SGD steps at the inner lr, in
    raw units (the model adapts in the units of ``train.task_scale``; its MSE is mapped back).

    The steps are safeguarded as in ``metaham adapt`` (``BACKTRACK`` halvings of a step that would raise the
    support loss): with plain SGD a model near the edge of stability, as the pre-trained one can be at lr 0.3,
    logged a validation MSE of 1.0 or NaN where the adaptation that scores it stays finite."""
    if not validation:
        return None
    model, names, lrs = learner.model, None, config["maml"]["inner_lr"]
    if isinstance(learner, MAML):
        names, lrs = learner.adapted_names, learner.learning_rates()
    steps = config["train"]["validate_steps"]
    # Evaluation mode: a sparse gate in its random phase uses its kept paths instead of drawing new ones.
    model.eval()
    try:
        tasks = [task.to(device) for task in validation]
        units = task_units(tasks, config["train"]["task_scale"])
        outcomes = adapt_tasks(model, to_meta_tasks(tasks, units), steps=steps, lr=lrs,
                               eval_at=[steps], loss=task_loss(config), metric=field_mse_halves, names=names,
                               backtrack=BACKTRACK)
    finally:
        model.train()
    halves = torch.tensor([o.query_loss[-1] for o in outcomes], dtype=torch.float64)
    return float(units.raw_mse(halves).mean())
