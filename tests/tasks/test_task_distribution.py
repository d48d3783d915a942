"""Tasks cut from simulated pools: reproducible, disjoint support/query, exact targets, accurate rollouts,
a cache that is really reused, and meta-batches of one shape."""
import dataclasses
import os

import pytest
import torch

import systems
from metaham.integrate import simulate
from tasks import PhasePoints, TaskDistribution
from tasks.pool import pool_key, resolve_ranges


def _flat(task):
    """All tensors of a task, in a fixed order, for exact comparisons."""
    parts = [task.support.q, task.support.p, task.support.dq, task.support.dp, task.query.q, task.query.p,
             task.query.dq, task.query.dp, task.rollouts.t, task.rollouts.q, task.rollouts.p]
    return parts + [task.params[k] for k in sorted(task.params)]


def _same(tasks_a, tasks_b) -> bool:
    return len(tasks_a) == len(tasks_b) and all(
        a.system == b.system and all(torch.equal(x, y) for x, y in zip(_flat(a), _flat(b)))
        for a, b in zip(tasks_a, tasks_b)
    )


def test_task_shapes(every_system, small_config):
    for task in every_system.sample(len(every_system.systems), seed=0):
        n = systems.get(task.system).n_particles
        assert task.support.q.shape == (small_config.k_support, n, 2)
        query = task.query
        assert all(x.shape == (small_config.k_query, n, 2) for x in (query.q, query.p, query.dq, query.dp))
        assert task.rollouts.t.shape == (small_config.rollout_steps + 1,)
        assert task.rollouts.q.shape == (small_config.rollouts_per_task, small_config.rollout_steps + 1, n, 2)
        assert set(task.params) == set(systems.get(task.system).param_names)
        assert all(v.ndim == 0 and v.dtype == torch.float64 for v in task.params.values())
        moved = task.to(dtype=torch.float32)
        assert moved.support.q.dtype == torch.float32 and moved.rollouts.p.dtype == torch.float32


def test_same_seed_gives_identical_tasks(every_system, small_config):
    names = ["pendulum", "magnetic_mirror", "three_body"]
    cache_dir = os.path.dirname(every_system.describe()["pools"]["pendulum"]["cache_file"])
    cached = TaskDistribution(names, small_config, seed=0, cache_dir=cache_dir)
    assert all(info["from_cache"] for info in cached.describe()["pools"].values())
    torch.manual_seed(123)  # the global RNG must play no part
    fresh = TaskDistribution(names, small_config, seed=0, cache=False)  # simulated again, not read
    assert _same(cached.sample(6, seed=5), fresh.sample(6, seed=5))
    first = list(cached.meta_batches(4, seed=3, num_batches=3))
    second = list(fresh.meta_batches(4, seed=3, num_batches=3))
    assert all(_same(a, b) for a, b in zip(first, second))


def test_other_seed_gives_other_tasks(every_system, small_config):
    other_pool = TaskDistribution(["mass_spring", "two_body"], small_config, seed=1, cache=False)
    mine = TaskDistribution(["mass_spring", "two_body"], small_config, seed=0, cache=False)
    assert not torch.equal(mine.sample(2, seed=0)[0].params["m"], other_pool.sample(2, seed=0)[0].params["m"])
    assert not _same(mine.sample(4, seed=0), other_pool.sample(4, seed=0))
    # Same pool, another draw seed: other pool entries or other points.
    assert not _same(every_system.sample(7, seed=0), every_system.sample(7, seed=1))
    batch_a = next(every_system.meta_batches(5, seed=0))
    batch_b = next(every_system.meta_batches(5, seed=1))
    assert not _same(batch_a, batch_b)


def test_support_and_query_never_overlap(every_system):
    tasks = every_system.sample(3 * len(every_system.systems), seed=0)
    tasks += [t for batch in every_system.meta_batches(8, seed=0, num_batches=5) for t in batch]
    for task in tasks:
        support = torch.cat([task.support.q, task.support.p], dim=-1).flatten(1)  # (K, n * 4)
        query = torch.cat([task.query.q, task.query.p], dim=-1).flatten(1)
        identical = (support[:, None, :] == query[None, :, :]).all(-1)
        assert not bool(identical.any()), f"{task.system}: a support state reappears in the query set"
        # The points are distinct states within each set too (drawn without replacement).
        for points in (support, query):
            assert torch.unique(points, dim=0).shape[0] == points.shape[0]


def test_targets_are_the_exact_vector_field(every_system):
    for task in every_system.sample(len(every_system.systems), seed=2):
        physics = systems.get(task.system)
        for points in (task.support, task.query):
            k = len(points)
            params = {name: value.expand(k) for name, value in task.params.items()}
            dq, dp = physics.vector_field(points.q, points.p, params)
            assert torch.allclose(points.dq, dq, rtol=1e-12, atol=1e-12), task.system
            assert torch.allclose(points.dp, dp, rtol=1e-12, atol=1e-12), task.system


def test_noise_perturbs_targets_only(small_config, tmp_path):
    noisy_config = dataclasses.replace(small_config, noise_std=0.1)
    clean = TaskDistribution("pendulum", small_config, seed=0, cache_dir=tmp_path)
    noisy = TaskDistribution("pendulum", noisy_config, seed=0, cache_dir=tmp_path)
    assert noisy.describe()["pools"]["pendulum"]["from_cache"]  # noise does not re-simulate
    a, b = clean.sample(6, seed=0), noisy.sample(6, seed=0)
    assert all(torch.equal(x.support.q, y.support.q) and torch.equal(x.query.p, y.query.p) for x, y in zip(a, b))
    residual = torch.cat([torch.cat([y.support.dq - x.support.dq, y.query.dp - x.query.dp]) for x, y in zip(a, b)])
    assert 0.08 < float(residual.std()) < 0.12


def test_rollouts_match_the_exact_solution_of_the_mass_spring(small_config):
    # Ground truth at the default tolerance against the closed form x(t) = x0 cos(wt) + v0/w sin(wt).
    config = dataclasses.replace(small_config, tolerance=1e-10, rollout_t_end=10.0, rollout_steps=200)
    dist = TaskDistribution("mass_spring", config, seed=0, cache=False)
    for task in dist.sample(4, seed=0):
        m, k = task.params["m"], task.params["k"]
        w = torch.sqrt(k / m)
        t, x = task.rollouts.t, task.rollouts.q[..., 0, 0]
        x0, v0 = x[:, :1], task.rollouts.p[:, :1, 0, 0] / m
        exact = x0 * torch.cos(w * t) + v0 / w * torch.sin(w * t)
        assert float((x - exact).abs().max()) < 1e-8
        assert torch.equal(task.rollouts.q[..., 0, 1], torch.zeros_like(x))  # the surplus coordinate stays 0


def test_rollouts_conserve_energy_and_follow_the_dynamics(every_system):
    info = every_system.describe()["pools"]
    for task in every_system.sample(len(every_system.systems), seed=4):
        physics = systems.get(task.system)
        r = task.rollouts
        params = {k: v.expand(r.q.shape[0])[:, None] for k, v in task.params.items()}
        energy = physics.hamiltonian(r.q, r.p, params)
        drift = float(((energy - energy[:, :1]).abs() / energy[:, :1].abs()).max())
        assert drift < 1e-6, f"{task.system}: relative energy drift {drift:.2e}"
        assert info[task.system]["rollout_energy_drift"] < 1e-6
        # An independent integration (another method) from the rollout's first state lands on the same path.
        flat = {k: v.expand(r.q.shape[0]) for k, v in task.params.items()}
        q, _ = simulate(physics, flat, r.q[:, 0], r.p[:, 0], r.t, "rk4", step=0.01)
        assert float((q.transpose(0, 1) - r.q).abs().max()) < 1e-7, task.system


def test_cache_is_reused_and_keyed_by_the_simulation_settings(small_config, tmp_path):
    first = TaskDistribution("mass_spring", small_config, seed=0, cache_dir=tmp_path)
    info = first.describe()["pools"]["mass_spring"]
    assert not info["from_cache"] and os.path.isfile(info["cache_file"])
    stamp = os.stat(info["cache_file"]).st_mtime_ns
    second = TaskDistribution("mass_spring", small_config, seed=0, cache_dir=tmp_path)
    assert second.describe()["pools"]["mass_spring"]["from_cache"]
    assert os.stat(info["cache_file"]).st_mtime_ns == stamp  # read, not rewritten
    assert _same(first.sample(3, seed=0), second.sample(3, seed=0))
    # Cutting settings (K, dtype) reuse the pool; simulation settings make a new one.
    cut = TaskDistribution("mass_spring", dataclasses.replace(small_config, k_support=5, dtype="float32"),
                           seed=0, cache_dir=tmp_path)
    assert cut.describe()["pools"]["mass_spring"]["cache_file"] == info["cache_file"]
    longer = TaskDistribution("mass_spring", dataclasses.replace(small_config, t_end=3.0), seed=0, cache_dir=tmp_path)
    assert not longer.describe()["pools"]["mass_spring"]["from_cache"]
    assert longer.describe()["pools"]["mass_spring"]["cache_file"] != info["cache_file"]
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_cache_key_changes_with_every_input(small_config):
    physics = systems.get("mass_spring")
    ranges = resolve_ranges(physics, None)
    base = pool_key(physics, small_config, ranges, seed=0)
    assert pool_key(physics, small_config, ranges, seed=0) == base
    changed = [
        pool_key(physics, small_config, ranges, seed=1),
        pool_key(physics, dataclasses.replace(small_config, tasks_per_system=7), ranges, seed=0),
        pool_key(physics, dataclasses.replace(small_config, tolerance=1e-9), ranges, seed=0),
        pool_key(physics, dataclasses.replace(small_config, points_tolerance=1e-7), ranges, seed=0),
        pool_key(physics, dataclasses.replace(small_config, integrator="rk4"), ranges, seed=0),
        pool_key(physics, small_config, resolve_ranges(physics, {"m": (1.0, 2.0)}), seed=0),
        pool_key(systems.get("pendulum"), small_config, resolve_ranges(systems.get("pendulum"), None), seed=0),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert pool_key(physics, dataclasses.replace(small_config, noise_std=0.5, k_query=3), ranges, seed=0) == base


def test_a_damaged_cache_file_is_resimulated(small_config, tmp_path):
    def pool_info():
        dist = TaskDistribution("mass_spring", small_config, seed=0, cache_dir=tmp_path)
        return dist.describe()["pools"]["mass_spring"]

    path = pool_info()["cache_file"]
    with open(path, "wb") as fh:
        fh.write(b"not a pool")
    with pytest.warns(UserWarning, match="unreadable task cache"):
        assert not pool_info()["from_cache"]
    assert pool_info()["from_cache"]


def test_meta_batches_group_tasks_of_one_shape(every_system, small_config):
    groups = every_system.shape_groups()
    single = {"mass_spring", "pendulum", "henon_heiles", "magnetic_mirror"}
    assert any(single <= set(g) for g in groups)  # the single-particle systems share a shape
    assert all(len({systems.get(n).n_particles for n in g}) == 1 for g in groups)
    seen = set()
    for batch in every_system.meta_batches(6, seed=0, num_batches=25):
        assert len(batch) == 6
        group = next(g for g in groups if batch[0].system in g)
        assert all(task.system in group for task in batch)
        stacked = PhasePoints.stack([task.support for task in batch])
        assert stacked.q.shape == (6, small_config.k_support, batch[0].n_particles, 2)
        seen.update(task.system for task in batch)
    assert seen == set(every_system.systems)
    ungrouped = every_system.meta_batches(6, seed=0, group_by_shape=False, num_batches=10)
    assert any(len({t.n_particles for t in batch}) > 1 for batch in ungrouped)


def test_meta_batches_resume_from_any_index(every_system):
    run = list(every_system.meta_batches(3, seed=9, num_batches=5))
    resumed = list(every_system.meta_batches(3, seed=9, start=3, num_batches=2))
    assert _same(run[3], resumed[0]) and _same(run[4], resumed[1])


def test_sample_takes_turns_and_distinct_draws(every_system, small_config):
    names = every_system.systems
    tasks = every_system.sample(2 * len(names), seed=0)
    assert [t.system for t in tasks] == list(names) * 2
    for name in names:
        mine = [t for t in tasks if t.system == name]
        assert not all(torch.equal(mine[0].params[k], mine[1].params[k]) for k in mine[0].params)


def test_parameter_ranges_and_bad_inputs(small_config):
    narrow = {"mass_spring": {"m": (0.5, 0.6)}}
    dist = TaskDistribution("mass_spring", small_config, seed=0, cache=False, param_ranges=narrow)
    masses = torch.stack([t.params["m"] for t in dist.sample(6, seed=0)])
    springs = torch.stack([t.params["k"] for t in dist.sample(6, seed=0)])
    assert bool(((masses >= 0.5) & (masses <= 0.6)).all())
    assert float(springs.max() - springs.min()) > 0.1  # k keeps the system's own range [0.5, 2]
    with pytest.raises(ValueError, match="no parameter 'mass'"):
        TaskDistribution("mass_spring", small_config, cache=False, param_ranges={"mass_spring": {"mass": (1, 2)}})
    with pytest.raises(ValueError, match="low 2.0 > high 1.0"):
        TaskDistribution("mass_spring", small_config, cache=False, param_ranges={"mass_spring": {"m": (2, 1)}})
    with pytest.raises(ValueError, match="not among the systems"):
        TaskDistribution("mass_spring", small_config, cache=False, param_ranges={"pendulum": {"m": (1, 2)}})
    with pytest.raises(systems.UnknownSystemError, match="known systems: .*mass_spring"):
        TaskDistribution(["mass_spring", "double_pendulum"], small_config, cache=False)
    with pytest.raises(ValueError, match="batch_size"):
        next(dist.meta_batches(0, seed=0))
