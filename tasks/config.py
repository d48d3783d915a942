"""How tasks are drawn: one validated dataclass with the paper's defaults.

Meta-training's YAML config embeds it as a mapping (``TaskConfig.schema()`` gives the defaults that
:func:`metaham.train.config.load_config` checks types against; :meth:`TaskConfig.from_dict` then checks values).
Every bad value is a :class:`~metaham.train.config.ConfigError` that names the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from metaham.integrate import ADAPTIVE, METHODS
from metaham.train.config import ConfigError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Fields that change the simulated trajectories (and so the cache key). The others (K, noise, dtype) only
# change how tasks are cut from the same trajectories, so changing them reuses the cached pool.
SIMULATION_FIELDS = (
    "points_per_trajectory",
    "t_end",
    "trajectories_per_task",
    "tasks_per_system",
    "rollouts_per_task",
    "rollout_steps",
    "rollout_t_end",
    "integrator",
    "tolerance",
    "points_tolerance",
    "step",
)


@dataclass(frozen=True)
class TaskConfig:
    """The task distribution's settings (defaults follow Song and Jeong, ICLR 2024).

    Attributes:
        k_support: phase-space points in a task's support set (the paper's K = 50).
        k_query: points in its query set.
        points_per_trajectory: states saved per simulated trajectory, evenly spaced on ``[0, t_end]`` (200).
        t_end: length of the simulated trajectories the points are cut from (10).
        trajectories_per_task: trajectories per parameter draw; support and query points are drawn from
            their ``trajectories_per_task * points_per_trajectory`` (trajectory, time) pairs without overlap.
        tasks_per_system: parameter draws simulated per system and cached (the pool meta-batches draw from);
            the default 2000 x 5 trajectories is the paper's 10,000 trajectories per system.
        noise_std: std of Gaussian noise added to the vector-field targets (dq, dp) of support and query
            points; the states themselves stay exact. 0 gives exact targets.
        rollouts_per_task: held-out trajectories per task (own initial states, same parameters) for rollout
            evaluation.
        rollout_steps: rollout length in steps; a rollout holds ``rollout_steps + 1`` states on
            ``[0, rollout_t_end]``, the first being the initial state.
        rollout_t_end: rollout time span.
        integrator: the integrator, one of :data:`metaham.integrate.METHODS`; always run in float64.
        tolerance: rtol = atol of an adaptive integrator (dop853, dopri5, dopri8) for the rollouts: the
            ground truth.
        points_tolerance: rtol = atol for the trajectories support and query points are cut from. Their
            targets are exact at every state whatever this is (the states only need to lie on a trajectory
            to this accuracy), so it is looser than ``tolerance``: 3-4x faster on the stiff systems.
        step: largest step of a fixed-step integrator (leapfrog, implicit_midpoint, rk4).
        dtype: dtype of the tasks handed out ("float32" or "float64"); simulation is always float64.
    """

    k_support: int = 50
    k_query: int = 50
    points_per_trajectory: int = 200
    t_end: float = 10.0
    trajectories_per_task: int = 5
    tasks_per_system: int = 2000
    noise_std: float = 0.0
    rollouts_per_task: int = 2
    rollout_steps: int = 200
    rollout_t_end: float = 10.0
    integrator: str = "dop853"
    tolerance: float = 1e-10
    points_tolerance: float = 1e-8
    step: float = 1e-3
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "str": str}[f.type]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"task config: {f.name!r} must be {f.type}, got {value!r}")
        for name in ("k_support", "k_query", "trajectories_per_task", "tasks_per_system", "rollouts_per_task",
                     "rollout_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"task config: {name!r} must be >= 1, got {getattr(self, name)}")
        if self.points_per_trajectory < 2:
            raise ConfigError(f"task config: 'points_per_trajectory' must be >= 2, got {self.points_per_trajectory}")
        for name in ("t_end", "rollout_t_end", "tolerance", "points_tolerance", "step"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"task config: {name!r} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ConfigError(f"task config: 'noise_std' must be >= 0, got {self.noise_std}")
        if self.integrator not in METHODS:
            raise ConfigError(f"task config: 'integrator' must be one of {', '.join(METHODS)}, got {self.integrator!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"task config: 'dtype' must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        available = self.trajectories_per_task * self.points_per_trajectory
        if self.k_support + self.k_query > available:
            raise ConfigError(
                f"task config: 'k_support' + 'k_query' = {self.k_support + self.k_query} exceeds the "
                f"{available} points of a task ('trajectories_per_task' x 'points_per_trajectory'); "
                "support and query must not overlap"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The defaults as a plain dict: the schema to embed in a larger YAML config."""
        return dataclasses.asdict(cls())

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "task config") -> "TaskConfig":
        """Build from a mapping (e.g. a YAML section); unknown keys are errors that name the key and ``source``."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a mapping of task settings, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(known)})")
        try:
            return cls(**dict(values))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}".replace("task config: ", "")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def simulation_dict(self) -> dict[str, Any]:
        """The fields that determine the simulated pool (the part of the config that keys the cache)."""
        # Only the integrator's own accuracy knobs count, so changing the others does not re-simulate.
        unused = ("step",) if self.integrator in ADAPTIVE else ("tolerance", "points_tolerance")
        return {name: getattr(self, name) for name in SIMULATION_FIELDS if name not in unused}
