"""Meta-batches: the per-task structure the engine consumes, and grouping of equal-shape tasks for ``vmap``.

A :class:`MetaTask` is ``(support, query, graph)``: ``support`` and ``query`` are tuples of tensors whose
first axis runs over the task's points (for Hamiltonian tasks ``(q, p, dq_dt, dp_dt)``, each ``(K, n, 2)``)
and ``graph`` is the model's extra input shared by all points (an ``edge_index``, or ``None``).

:func:`to_meta_tasks` converts the task distribution's ``tasks.Task`` objects. Tasks whose tensors have equal
shapes, dtypes and devices and whose graphs are equal are stacked along a new leading task axis, so that one
``vmap`` call runs them all; any other task runs on its own.
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


def to_meta_tasks(tasks: Sequence) -> list[MetaTask]:
    """:class:`MetaTask` views of task-distribution tasks (``tasks.Task``: ``system`` name, ``support`` and
    ``query`` with ``q, p, dq, dp``), with one ``edge_index`` per system, built once and shared."""
    import systems
    from metaham.hamiltonian import system_edge_index

    graphs: dict[tuple[str, torch.device], Tensor] = {}
    out = []
    for task in tasks:
        device = task.support.q.device
        if (task.system, device) not in graphs:
            graphs[(task.system, device)] = system_edge_index(systems.get(task.system), device=device)
        out.append(MetaTask(_points(task.support), _points(task.query), graphs[(task.system, device)]))
    return out


def _points(points) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return points.q, points.p, points.dq, points.dp


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
