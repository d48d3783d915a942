"""The task distribution: tasks cut from simulated systems, splits of the systems, meta-batches.

Five names cover it:

* :class:`TaskConfig` -- K, trajectory length, noise, pool size, ground-truth integrator (validated).
* :class:`TaskDistribution` -- tasks over some systems; ``sample(n, seed)`` and ``meta_batches(M, seed)``.
* :class:`Task` -- one system + one parameter draw: ``support`` and ``query`` :class:`PhasePoints`
  (``q, p, dq, dp`` of shape ``(K, n, 2)``) and ``rollouts`` (:class:`Rollouts`, ``(R, T, n, 2)``).
* :class:`Split` and :func:`load_split` -- named meta-train/meta-test splits from ``configs/splits/``.

>>> from tasks import PhasePoints, TaskConfig, load_split
>>> split = load_split("leave_pendulum")
>>> train = split.train_distribution(TaskConfig(tasks_per_system=200), seed=0)
>>> for batch in train.meta_batches(batch_size=10, seed=0, num_batches=2):
...     support = PhasePoints.stack([task.support for task in batch])   # (10, 50, 1, 2) tensors
"""
from .cache import default_cache_dir
from .config import TaskConfig
from .distribution import TaskDistribution
from .splits import Split, load_split, split_names
from .task import PhasePoints, Rollouts, Task

__all__ = [
    "PhasePoints",
    "Rollouts",
    "Split",
    "Task",
    "TaskConfig",
    "TaskDistribution",
    "default_cache_dir",
    "load_split",
    "split_names",
]
