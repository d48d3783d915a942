"""Meta-batches: the per-task structure the engine consumes, and grouping of equal-shape tasks for ``vmap``.

A :class:`MetaTask` is ``(support, query, graph)``: ``support`` and ``query`` are tuples of tensors whose
first axis runs over the task's points (for Hamiltonian tasks ``(q, p, dq_dt, dp_dt)``, each ``(K, n, 2)``)
and ``graph`` is the model's extra input shared by all points (an ``edge_index``, or ``None``).

:func:`to_meta_tasks` converts the task distribution's ``tasks.Task`` objects, optionally in each task's own
units (:func:`task_scales`). Tasks whose tensors have equal shapes, dtypes and devices and whose graphs are equal
are stacked along a new leading task axis, so that one ``vmap`` call runs them all; any other task runs on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class MetaTask(NamedTuple):
    """One task: ``support`` and ``query`` tuples of tensors (first axis: points) and a shared ``graph``."""

    support: tuple[Tensor, ...]
    query: tuple[Tensor, ...]
    graph: object = None


@dataclass
class TaskGroup:
    """Tasks of one shape: their positions in the meta-batch and their data stacked on a new axis 0."""

    indices: list[int]
    support: tuple[Tensor, ...]
    query: tuple[Tensor, ...]
    graph: object


TASK_SCALES = ("none", "support_rms")


def task_scales(tasks: Sequence, kind: str) -> Tensor:
    """``(N,)`` the vector-field unit of each ``tasks.Task`` under ``train.task_scale`` = ``kind``.

    ``"none"``: 1 for every task. ``"support_rms"``: the root mean square of the task's support targets
    ``(dq/dt, dp/dt)``. The four paper systems' fields differ 25-100x in scale (a pendulum task's mean square
    reaches 126, a Henon-Heiles task's is ~0.04), so in raw units a few large tasks set both the meta-gradient
    and the size of every adaptation step; divided by this unit every task's targets have mean square 1. The
    unit reads only the support set, which adaptation has too, so it costs no query information. A support set
    whose targets are all zero keeps the unit 1.
    """
    if kind not in TASK_SCALES:
        raise ValueError(f"unknown task scale {kind!r}; choose one of {', '.join(TASK_SCALES)}")
    if kind == "none" or not tasks:
        device = tasks[0].support.dq.device if tasks else None
        return torch.ones(len(tasks), dtype=torch.float64, device=device)
    rms = torch.stack([torch.cat([t.support.dq, t.support.dp], dim=-1).double().pow(2).mean().sqrt() for t in tasks])
    return torch.where(torch.isfinite(rms) & (rms > 0), rms, torch.ones_like(rms))


def to_meta_tasks(tasks: Sequence, scales: Tensor | None = None) -> list[MetaTask]:
    """:class:`MetaTask` views of task-distribution tasks (``tasks.Task``: ``system`` name, ``support`` and
    ``query`` with ``q, p, dq, dp``), with one ``edge_index`` per system, built once and shared. With ``scales``
    (``(N,)``, e.g. :func:`task_scales`) each task's targets, support and query, are divided by its scale: a
    model fitted to them predicts the field in that unit, and its raw-unit MSE is ``scale**2`` times its MSE."""
    import systems
    from metaham.hamiltonian import system_edge_index

    graphs: dict[tuple[str, torch.device], Tensor] = {}
    out = []
    for i, task in enumerate(tasks):
        device = task.support.q.device
        if (task.system, device) not in graphs:
            graphs[(task.system, device)] = system_edge_index(systems.get(task.system), device=device)
        unit = None if scales is None else float(scales[i])
        out.append(MetaTask(_points(task.support, unit), _points(task.query, unit), graphs[(task.system, device)]))
    return out


def _points(points, unit: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if unit is None or unit == 1.0:
        return points.q, points.p, points.dq, points.dp
    return points.q, points.p, points.dq / unit, points.dp / unit


def check_tasks(tasks: Sequence[MetaTask]) -> None:
    """``ValueError`` naming the first task that is not a (support, query, graph) of tensor tuples."""
    if len(tasks) == 0:
        raise ValueError("a meta-batch needs at least one task")
    for i, task in enumerate(tasks):
        if len(task) != 3:
            raise ValueError(f"task {i}: expected (support, query, graph), got {len(task)} items")
        for part, data in (("support", task[0]), ("query", task[1])):
            if not isinstance(data, tuple) or not data or not all(isinstance(t, Tensor) for t in data):
                raise ValueError(f"task {i}: {part} must be a non-empty tuple of tensors")


def group_tasks(tasks: Sequence[MetaTask]) -> list[TaskGroup]:
    """Group the tasks that ``vmap`` can batch (see the module docstring), keeping first-seen order."""
    check_tasks(tasks)
    groups: list[tuple[tuple, object, list[int]]] = []
    for i, task in enumerate(tasks):
        key = (_signature(task.support), _signature(task.query))
        for group_key, graph, members in groups:
            if group_key == key and _same_graph(graph, task.graph):
                members.append(i)
                break
        else:
            groups.append((key, task.graph, [i]))
    out = []
    for _, graph, members in groups:
        support = tuple(torch.stack(leaves) for leaves in zip(*(tasks[i].support for i in members)))
        query = tuple(torch.stack(leaves) for leaves in zip(*(tasks[i].query for i in members)))
        out.append(TaskGroup(members, support, query, graph))
    return out


def _signature(data: tuple[Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in data)


def _same_graph(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))
    return a is b
