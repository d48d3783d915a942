"""A pool: every parameter draw and trajectory of one system, simulated in one batch and cached.

A pool holds ``N = tasks_per_system`` parameter draws. Each draw has ``J = trajectories_per_task`` trajectories
(states saved on ``points_per_trajectory`` times over ``[0, t_end]``) that support/query points are cut from,
and ``R = rollouts_per_task`` further trajectories on the rollout time grid. All ``N * (J + R)`` trajectories
are integrated together, each row with its own parameters (in chunks of ``_CHUNK`` trajectories, which bounds
memory and drives the progress bar), in float64 with the configured integrator: the rollouts, which are the
ground truth, at ``tolerance``; the point trajectories at the looser ``points_tolerance`` (a support or query
target is the exact vector field at its state, so those states need only lie on a trajectory, not be the
ground truth of one).

Accuracy is measured, not assumed: every pool records the largest relative energy drift
``max |H(t) - H(0)| / |H(0)|`` of its rollouts (and of its point trajectories), and a rollout drift above
``_ENERGY_WARN`` gives a warning.
"""
from __future__ import annotations

import inspect
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaham.errors import IntegrationError, NonFiniteError
from metaham.integrate import ADAPTIVE, simulate
from metaham.text import bar_disabled
from systems.base import System, uniform

from .cache import DATA_VERSION, derive_seed, digest, load_pool, pool_path, save_pool
from .config import TaskConfig

Ranges = Mapping[str, tuple[float, float]]

_CHUNK = 4096
_ENERGY_WARN = 1e-6


@dataclass
class Pool:
    """The simulated pool of one system (float64, on CPU).

    ``params`` name -> ``(N,)``; ``q``, ``p`` ``(N, J, T, n, 2)`` on times ``t`` ``(T,)``; ``rollout_q``,
    ``rollout_p`` ``(N, R, T_r, n, 2)`` on ``rollout_t`` ``(T_r,)``. ``info``: cache file, whether it was read
    from the cache, simulation seconds, largest relative energy drift of the rollouts and point trajectories.
    """

    system: str
    params: dict[str, Tensor]
    t: Tensor
    q: Tensor
    p: Tensor
    rollout_t: Tensor
    rollout_q: Tensor
    rollout_p: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.q.shape[0]


def resolve_ranges(system: System, overrides: Ranges | None) -> dict[str, tuple[float, float]]:
    """The system's own sampling ranges, with ``overrides`` (name -> (low, high)) validated and applied."""
    ranges = {p.name: (float(p.low), float(p.high)) for p in system.params}
    for name, bounds in (overrides or {}).items():
        if name not in ranges:
            raise ValueError(
                f"system {system.name!r} has no parameter {name!r} to set a range for; "
                f"its parameters: {', '.join(ranges) or 'none'}"
            )
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(
                f"range of parameter {name!r} of {system.name!r} must be [low, high], got {bounds!r}"
            ) from None
        if not low <= high:
            raise ValueError(f"range of parameter {name!r} of {system.name!r}: low {low} > high {high}")
        system.check_params({name: low})
        system.check_params({name: high})
        ranges[name] = (low, high)
    return ranges


def pool_key(system: System, config: TaskConfig, ranges: Ranges, seed: int) -> str:
    """The cache key: a digest of everything that determines the pool's content."""
    return digest(
        {
            "data_version": DATA_VERSION,
            "system": system.describe(),
            "source": _source_digest(system),
            "ranges": {k: list(v) for k, v in ranges.items()},
            "config": config.simulation_dict(),
            "seed": seed,
        }
    )


def build_pool(
    system: System,
    config: TaskConfig,
    ranges: Ranges,
    seed: int,
    cache_dir: Path | None,
    progress: bool | None = None,
) -> Pool:
    """Load the pool from ``cache_dir`` if a matching file is there, else simulate (and cache) it."""
    key = pool_key(system, config, ranges, seed)
    path = pool_path(cache_dir, system.name, key) if cache_dir is not None else None
    data = load_pool(path, key) if path is not None else None
    from_cache = data is not None
    if data is None:
        data = _simulate(system, config, ranges, seed, progress)
        data["key"] = key
        if path is not None:
            save_pool(path, data)
    pool = Pool(
        system=system.name,
        params=dict(data["params"]),
        t=data["t"],
        q=data["q"],
        p=data["p"],
        rollout_t=data["rollout_t"],
        rollout_q=data["rollout_q"],
        rollout_p=data["rollout_p"],
    )
    pool.info = {
        "tasks": pool.size,
        "trajectories": pool.size * (pool.q.shape[1] + pool.rollout_q.shape[1]),
        "cache_file": str(path) if path is not None else None,
        "from_cache": from_cache,
        "simulation_seconds": data["seconds"],
        "rollout_energy_drift": data["rollout_energy_drift"],
        "points_energy_drift": data["points_energy_drift"],
    }
    return pool


def _simulate(system: System, config: TaskConfig, ranges: Ranges, seed: int, progress: bool | None) -> dict:
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(derive_seed("pool", seed, system.name, sorted(ranges.items())))
    n_tasks, n_traj, n_roll = config.tasks_per_system, config.trajectories_per_task, config.rollouts_per_task
    params = {
        name: uniform(generator, (n_tasks,), low, high, torch.float64) for name, (low, high) in ranges.items()
    }
    # One row per trajectory: each task's J data trajectories followed by its R rollout trajectories.
    per_traj = {k: v.repeat_interleave(n_traj + n_roll) for k, v in params.items()}
    q0, p0 = system.sample_initial_state(per_traj, generator)
    q0, p0 = q0.to(torch.float64), p0.to(torch.float64)
    shape = q0.shape[1:]
    q0, p0 = q0.view(n_tasks, n_traj + n_roll, *shape), p0.view(n_tasks, n_traj + n_roll, *shape)
    t = torch.linspace(0.0, config.t_end, config.points_per_trajectory, dtype=torch.float64)
    rollout_t = torch.linspace(0.0, config.rollout_t_end, config.rollout_steps + 1, dtype=torch.float64)

    total = n_tasks * (n_traj + n_roll)
    with tqdm(total=total, desc=f"simulating {system.name}", unit="traj", disable=bar_disabled(progress)) as bar:
        q, p, points_drift = _integrate(
            system, config, config.points_tolerance, params, n_traj, q0[:, :n_traj], p0[:, :n_traj], t, bar
        )
        rq, rp, drift = _integrate(
            system, config, config.tolerance, params, n_roll, q0[:, n_traj:], p0[:, n_traj:], rollout_t, bar
        )
    if drift > _ENERGY_WARN:
        warnings.warn(
            f"{system.name}: ground-truth rollouts drift in energy by up to {drift:.2e} (relative); lower the "
            "task config's 'tolerance' (or 'step') for a more accurate pool",
            stacklevel=4,
        )
    return {
        "format": "metaham-task-pool",
        "data_version": DATA_VERSION,
        "system": system.name,
        "seed": seed,
        "ranges": {k: list(v) for k, v in ranges.items()},
        "config": config.simulation_dict(),
        "params": params,
        "t": t,
        "q": q,
        "p": p,
        "rollout_t": rollout_t,
        "rollout_q": rq,
        "rollout_p": rp,
        "seconds": time.perf_counter() - start,
        "rollout_energy_drift": drift,
        "points_energy_drift": points_drift,
    }


def _integrate(
    system: System, config: TaskConfig, tolerance: float, params: dict[str, Tensor], per_task: int, q0: Tensor,
    p0: Tensor, t: Tensor, bar: tqdm,
) -> tuple[Tensor, Tensor, float]:
    """Integrate ``(N, per_task, n, 2)`` initial states on ``t``; return ``(N, per_task, T, n, 2)`` twice and
    the largest relative energy drift."""
    n_tasks, shape = q0.shape[0], q0.shape[2:]
    flat_q0, flat_p0 = q0.reshape(-1, *shape), p0.reshape(-1, *shape)
    flat_params = {k: v.repeat_interleave(per_task) for k, v in params.items()}
    kwargs = {"rtol": tolerance, "atol": tolerance} if config.integrator in ADAPTIVE else {"step": config.step}
    qs, ps, drift = [], [], 0.0
    for lo in range(0, flat_q0.shape[0], _CHUNK):
        hi = min(lo + _CHUNK, flat_q0.shape[0])
        chunk_params = {k: v[lo:hi] for k, v in flat_params.items()}
        try:
            q, p = simulate(system, chunk_params, flat_q0[lo:hi], flat_p0[lo:hi], t, config.integrator, **kwargs)
        except IntegrationError as exc:
            raise IntegrationError(f"{system.name}: simulating its task pool: {exc}") from exc
        q, p = q.detach().transpose(0, 1).contiguous(), p.detach().transpose(0, 1).contiguous()  # (B, T, n, 2)
        _check_finite(system, q, p, chunk_params)
        energy = system.hamiltonian(q, p, {k: v[:, None] for k, v in chunk_params.items()}).detach()
        scale = energy[:, :1].abs().clamp_min(1e-12)
        drift = max(drift, float(((energy - energy[:, :1]).abs() / scale).max()))
        qs.append(q)
        ps.append(p)
        bar.update(hi - lo)
    full = (n_tasks, per_task, t.numel(), *shape)
    return torch.cat(qs).view(full), torch.cat(ps).view(full), drift


def _check_finite(system: System, q: Tensor, p: Tensor, params: dict[str, Tensor]) -> None:
    bad = ~(torch.isfinite(q).flatten(1).all(1) & torch.isfinite(p).flatten(1).all(1))
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        values = ", ".join(f"{k}={float(v[first]):.4g}" for k, v in params.items())
        raise NonFiniteError(
            f"{system.name}: {int(bad.sum())} simulated trajectories became non-finite (first with {values}); "
            "the system's initial-state sampler or parameter ranges allow unbounded orbits"
        )


def _source_digest(system: System) -> str:
    """Digest of the source file that defines the system, so editing its physics invalidates its cache."""
    module = sys.modules.get(type(system).__module__)
    try:
        return digest(inspect.getsource(module)) if module is not None else ""
    except (OSError, TypeError):
        return ""


__all__ = ["Pool", "build_pool", "pool_key", "resolve_ranges"]
