"""The task distribution over a set of systems: fixed task sets and reproducible meta-batches.

>>> from tasks import TaskConfig, TaskDistribution
>>> dist = TaskDistribution(["mass_spring", "pendulum"], TaskConfig(tasks_per_system=100), seed=0)
>>> batch = next(dist.meta_batches(batch_size=10, seed=0))   # a list of 10 Tasks
>>> held_out = dist.sample(30, seed=1)                        # a fixed list of 30 Tasks

Construction builds one :class:`~tasks.pool.Pool` per system (simulated once, then read from the cache).
A task is cut from a pool entry when it is drawn: K support and K query points from disjoint random
(trajectory, time) pairs of that entry's trajectories, targets from the system's exact vector field at those
states (plus the configured noise), and the entry's rollouts. Tasks of one system are cut in one batched
vector-field call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from systems import get as get_system

from .cache import default_cache_dir, derive_seed
from .config import TaskConfig
from .pool import Pool, build_pool, resolve_ranges
from .task import PhasePoints, Rollouts, Task

ParamRanges = Mapping[str, Mapping[str, tuple[float, float]]]


class TaskDistribution:
    """Tasks over ``systems``, each a parameter draw of one system (uniform within the parameter ranges).

    Args:
        systems: registry names (or one name).
        config: the :class:`TaskConfig` (default: the paper's settings).
        seed: seeds the pools (parameter draws and initial states); meta-batches have their own seed.
        param_ranges: per system, parameter name -> ``(low, high)`` replacing the system's own sampling range
            (parametric splits); unnamed parameters keep the system's range.
        cache_dir: where pools are cached (default :func:`tasks.cache.default_cache_dir`).
        cache: False disables the on-disk cache (always simulate, never write).
        progress: show a progress bar while simulating (None: only on a terminal).
    """

    def __init__(
        self,
        systems: str | Sequence[str],
        config: TaskConfig | None = None,
        *,
        seed: int = 0,
        param_ranges: ParamRanges | None = None,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        progress: bool | None = None,
    ) -> None:
        names = (systems,) if isinstance(systems, str) else tuple(systems)
        if not names:
            raise ValueError("a task distribution needs at least one system")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"system listed twice: {', '.join(duplicates)}")
        param_ranges = dict(param_ranges or {})
        stray = sorted(set(param_ranges) - set(names))
        if stray:
            raise ValueError(
                f"parameter ranges given for {', '.join(stray)}, which is not among the systems {list(names)}"
            )
        self.systems: tuple[str, ...] = names
        self.config = config if config is not None else TaskConfig()
        self.seed = int(seed)
        self._physics = {name: get_system(name) for name in names}
        self.param_ranges = {n: resolve_ranges(self._physics[n], param_ranges.get(n)) for n in names}
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._pools: dict[str, Pool] = {
            n: build_pool(self._physics[n], self.config, self.param_ranges[n], self.seed,
                          directory if cache else None, progress)
            for n in names
        }

    # -- drawing tasks ------------------------------------------------------------------------------------
    def sample(self, n_tasks: int, seed: int) -> list[Task]:
        """A fixed list of ``n_tasks`` tasks (e.g. held-out evaluation tasks), reproducible from ``seed``.

        Systems take turns (task ``i`` belongs to ``systems[i % len(systems)]``) and each system's tasks use
        distinct parameter draws while its pool has enough.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        generator = torch.Generator().manual_seed(derive_seed("sample", seed))
        order = [self.systems[i % len(self.systems)] for i in range(n_tasks)]
        entries = {}
        for name in self.systems:
            size = self._pools[name].size
            count = order.count(name)
            perms = [torch.randperm(size, generator=generator) for _ in range(-(-count // size))]
            entries[name] = torch.cat(perms)[:count].tolist() if perms else []
        return self._cut([(name, entries[name].pop(0)) for name in order], generator)

    def meta_batches(
        self,
        batch_size: int,
        seed: int,
        *,
        group_by_shape: bool = True,
        start: int = 0,
        num_batches: int | None = None,
    ) -> Iterator[list[Task]]:
        """Yield meta-batches: lists of ``batch_size`` tasks drawn at random (endless unless ``num_batches``).

        Every system gets the same share of tasks on average. With ``group_by_shape`` every meta-batch holds
        tasks of systems with the same number of particles and the same interaction graph (so their
        support/query tensors stack to ``(M, K, n, 2)`` and one ``vmap`` handles them); a group is chosen
        with probability proportional to its number of systems. Batch ``b`` depends only on ``(seed, b)``,
        so ``start=b`` resumes a run exactly where it stopped.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start < 0 or (num_batches is not None and num_batches < 0):
            raise ValueError("start and num_batches must be >= 0")
        groups = self.shape_groups() if group_by_shape else [list(self.systems)]
        weights = torch.tensor([len(g) for g in groups], dtype=torch.float64)
        index = start
        while num_batches is None or index < start + num_batches:
            generator = torch.Generator().manual_seed(derive_seed("meta_batch", seed, index))
            group = groups[int(torch.multinomial(weights, 1, generator=generator))]
            which = torch.randint(len(group), (batch_size,), generator=generator).tolist()
            picks = [(group[i], int(torch.randint(self._pools[group[i]].size, (), generator=generator))) for i in which]
            yield self._cut(picks, generator)
            index += 1

    def shape_groups(self) -> list[list[str]]:
        """The systems grouped by (number of particles, interaction graph), in order of first appearance."""
        groups: dict[tuple, list[str]] = {}
        for name in self.systems:
            physics = self._physics[name]
            key = (physics.n_particles, tuple(sorted(tuple(e) for e in physics.edges())))
            groups.setdefault(key, []).append(name)
        return list(groups.values())

    def describe(self) -> dict:
        """A JSON-ready summary: systems, seed, config, parameter ranges and each pool's cache/accuracy info."""
        return {
            "systems": list(self.systems),
            "seed": self.seed,
            "config": self.config.to_dict(),
            "param_ranges": {n: {k: list(v) for k, v in r.items()} for n, r in self.param_ranges.items()},
            "pools": {n: dict(pool.info) for n, pool in self._pools.items()},
        }

    # -- cutting tasks from pools ---------------------------------------------------------------------------
    def _cut(self, picks: list[tuple[str, int]], generator: torch.Generator) -> list[Task]:
        """Tasks for ``(system, pool entry)`` picks, in order; one batched cut per system."""
        tasks: list[Task | None] = [None] * len(picks)
        for name in dict.fromkeys(name for name, _ in picks):
            slots = [i for i, (n, _) in enumerate(picks) if n == name]
            entries = torch.tensor([picks[i][1] for i in slots])
            for slot, task in zip(slots, self._cut_system(name, entries, generator)):
                tasks[slot] = task
        return tasks  # type: ignore[return-value]

    def _cut_system(self, name: str, entries: Tensor, generator: torch.Generator) -> list[Task]:
        pool, physics, config = self._pools[name], self._physics[name], self.config
        m, k_s, k_q = entries.numel(), config.k_support, config.k_query
        n_traj, n_times, shape = pool.q.shape[1], pool.q.shape[2], pool.q.shape[3:]
        # Disjoint support and query: the k_s + k_q (trajectory, time) pairs with the largest random keys,
        # in random order (topk sorts by key), split into the first k_s and the next k_q.
        keys = torch.rand(m, n_traj * n_times, generator=generator, dtype=torch.float64)
        chosen = keys.topk(k_s + k_q, dim=1).indices
        rows = entries[:, None]
        q = pool.q.view(pool.size, n_traj * n_times, *shape)[rows, chosen]  # (m, k_s + k_q, n, 2)
        p = pool.p.view(pool.size, n_traj * n_times, *shape)[rows, chosen]
        params = {key: value[entries] for key, value in pool.params.items()}
        flat = {key: value.repeat_interleave(k_s + k_q) for key, value in params.items()}
        dq, dp = physics.vector_field(q.reshape(-1, *shape), p.reshape(-1, *shape), flat)
        dq, dp = dq.detach().reshape(q.shape), dp.detach().reshape(p.shape)
        if config.noise_std > 0:
            dq = dq + config.noise_std * torch.randn(dq.shape, generator=generator, dtype=dq.dtype)
            dp = dp + config.noise_std * torch.randn(dp.shape, generator=generator, dtype=dp.dtype)
        dtype = config.torch_dtype
        q, p, dq, dp = (x.to(dtype) for x in (q, p, dq, dp))
        params = {key: value.to(dtype) for key, value in params.items()}
        rollout_t = pool.rollout_t.to(dtype)
        rollout_q, rollout_p = pool.rollout_q[entries].to(dtype), pool.rollout_p[entries].to(dtype)
        return [
            Task(
                system=name,
                params={key: value[i] for key, value in params.items()},
                support=PhasePoints(q[i, :k_s], p[i, :k_s], dq[i, :k_s], dp[i, :k_s]),
                query=PhasePoints(q[i, k_s:], p[i, k_s:], dq[i, k_s:], dp[i, k_s:]),
                rollouts=Rollouts(rollout_t, rollout_q[i], rollout_p[i]),
            )
            for i in range(m)
        ]
