"""Small task settings shared by the task tests (pools of a few tasks over short trajectories)."""
import pytest

import systems
from tasks import TaskConfig, TaskDistribution

SMALL = TaskConfig(
    k_support=10,
    k_query=10,
    points_per_trajectory=20,
    t_end=2.0,
    trajectories_per_task=2,
    tasks_per_system=6,
    rollouts_per_task=1,
    rollout_steps=20,
    rollout_t_end=2.0,
    tolerance=1e-8,
    dtype="float64",
)


@pytest.fixture(scope="session")
def small_config() -> TaskConfig:
    return SMALL


@pytest.fixture(scope="session")
def every_system(tmp_path_factory) -> TaskDistribution:
    """One distribution over every registered system (single- and multi-particle), cached in a temp folder."""
    return TaskDistribution(systems.names(), SMALL, seed=0, cache_dir=tmp_path_factory.mktemp("pools"))
