"""Meta-batches: the per-task structure the engine consumes, and grouping of equal-shape tasks for ``vmap``.

A :class:`MetaTask` is ``(support, query, graph)``: ``support`` and ``query`` are tuples of tensors whose
first axis runs over the task's points (for Hamiltonian tasks ``(q, p, dq_dt, dp_dt)``, each ``(K, n, 2)``)
and ``graph`` is the model's extra input shared by all points (an ``edge_index``, or ``None``).

:func:`to_meta_tasks` converts the task distribution's ``tasks.Task`` objects, optionally in each task's own
units (:func:`task_units`). Tasks whose tensors have equal shapes, dtypes and devices and whose graphs are equal
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


TASK_SCALES = ("none", "support_rms", "support_state")


class TaskUnits(NamedTuple):
    """Each task's units, ``(N,)`` tensors: ``q`` and ``p`` divide the task's positions and momenta, ``field``
    its time rate, so the model sees ``q / q_unit, p / p_unit`` and fits ``dq/dt / (q_unit field_unit)``,
    ``dp/dt / (p_unit field_unit)``.

    Any such change of units keeps the dynamics Hamiltonian: in the scaled coordinates the flow is the
    symplectic gradient of ``H / (q_unit p_unit field_unit)``. So a model's field ``f`` in task units is the raw
    field ``(q_unit field_unit f_q, p_unit field_unit f_p)`` at ``(q / q_unit, p / p_unit)``.
    """

    q: Tensor
    p: Tensor
    field: Tensor

    def take(self, rows) -> "TaskUnits":
        """The units of the tasks ``rows`` (an index or index list), as a :class:`TaskUnits`."""
        return TaskUnits(self.q[rows], self.p[rows], self.field[rows])

    def raw_mse(self, halves: Tensor) -> Tensor:
        """The raw-unit MSE from the MSEs of the two halves in task units: ``halves`` ``(N, ..., 2)`` holds
        (dq/dt part, dp/dt part), each a mean over equally many elements."""
        shape = (-1,) + (1,) * (halves.ndim - 2)
        q, p, field = (u.to(halves).reshape(shape) for u in self)
        return 0.5 * field.square() * (q.square() * halves[..., 0] + p.square() * halves[..., 1])


def task_units(tasks: Sequence, kind: str) -> TaskUnits:
    """The :class:`TaskUnits` of each ``tasks.Task`` under ``train.task_scale`` = ``kind``.

    ``"none"``: 1 everywhere. ``"support_rms"``: raw coordinates, the field in units of the root mean square of
    the task's support targets ``(dq/dt, dp/dt)``. ``"support_state"``: also positions and momenta in units of
    the RMS of the support set's ``q`` and ``p``, and the field in units of the RMS of the targets so scaled.
    The four paper systems' fields differ 25-100x in scale (a pendulum task's mean square reaches 126, a
    Henon-Heiles task's is ~0.04), so in raw units a few large tasks set both the meta-gradient and the size of
    every adaptation step; in these units every task's targets have mean square 1, and with ``support_state``
    its inputs too, so a heavy, long pendulum looks to the model like a light, short one at the same amplitude.
    The units read only the support set, which adaptation has too, so they cost no query information. A unit
    that comes out zero or non-finite (e.g. a support set at rest) stays 1.
    """
    if kind not in TASK_SCALES:
        raise ValueError(f"unknown task scale {kind!r}; choose one of {', '.join(TASK_SCALES)}")
    device = tasks[0].support.dq.device if tasks else None
    ones = torch.ones(len(tasks), dtype=torch.float64, device=device)
    if kind == "none" or not tasks:
        return TaskUnits(ones, ones, ones)
    q_unit, p_unit = ones, ones
    if kind == "support_state":
        q_unit = _rms([(t.support.q,) for t in tasks])
        p_unit = _rms([(t.support.p,) for t in tasks])
    field = _rms([(t.support.dq / float(a), t.support.dp / float(b)) for t, a, b in zip(tasks, q_unit, p_unit)])
    return TaskUnits(q_unit, p_unit, field)


def _rms(parts: Sequence[tuple[Tensor, ...]]) -> Tensor:
    rms = torch.stack([torch.cat(part, dim=-1).double().pow(2).mean().sqrt() for part in parts])
    return torch.where(torch.isfinite(rms) & (rms > 0), rms, torch.ones_like(rms))


def to_meta_tasks(tasks: Sequence, units: TaskUnits | None = None) -> list[MetaTask]:
    """:class:`MetaTask` views of task-distribution tasks (``tasks.Task``: ``system`` name, ``support`` and
    ``query`` with ``q, p, dq, dp``), with one ``edge_index`` per system, built once and shared. With ``units``
    (e.g. :func:`task_units`) each task's support and query are put in its units: a model fitted to them predicts
    the field in those units (:meth:`TaskUnits.raw_mse` maps its errors back)."""
    import systems
    from metaham.hamiltonian import system_edge_index

    graphs: dict[tuple[str, torch.device], Tensor] = {}
    out = []
    for i, task in enumerate(tasks):
        device = task.support.q.device
        if (task.system, device) not in graphs:
            graphs[(task.system, device)] = system_edge_index(systems.get(task.system), device=device)
        unit = None if units is None else tuple(float(u[i]) for u in units)
        out.append(MetaTask(_points(task.support, unit), _points(task.query, unit), graphs[(task.system, device)]))
    return out


def _points(points, unit: tuple[float, float, float] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if unit is None or unit == (1.0, 1.0, 1.0):
        return points.q, points.p, points.dq, points.dp
    q_unit, p_unit, field = unit
    if q_unit == 1.0 and p_unit == 1.0:  # support_rms: the states stay the task's own tensors
        return points.q, points.p, points.dq / field, points.dp / field
    return points.q / q_unit, points.p / p_unit, points.dq / (q_unit * field), points.dp / (p_unit * field)


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
