"""Test-time adaptation: plain full-batch SGD on a task's support set, with the query-loss curve.

Every model in a comparison (meta-trained, pre-trained, random) is adapted with this same protocol; the
meta-learned initialisation is tuned to the inner-loop optimizer, so adapt with what it was meta-trained for
(plain SGD at the inner learning rate, 0.1 by default) and state the protocol with every result.

Example::

    curve = adapt(model, task.support, task.query, task.graph, steps=10, lr=0.1)
    curve.steps        # [0, 1, ..., 10]
    curve.query_loss   # query loss after each of those steps
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .batching import MetaTask, group_tasks
from .functional import sgd_step
from .losses import TaskLoss, VectorFieldLoss


@dataclass
class Adaptation:
    """The query-loss curve of one adaptation run and the parameters after its last step."""

    steps: list[int]
    query_loss: list[float]
    params: dict[str, Tensor] = field(repr=False)


def adapt(
    model: nn.Module,
    support: tuple[Tensor, ...],
    query: tuple[Tensor, ...],
    graph: object = None,
    *,
    steps: int = 10,
    lr: float | Mapping[str, Tensor | float] = 0.1,
    eval_at: Iterable[int] | None = None,
    loss: TaskLoss | None = None,
    names: Sequence[str] | None = None,
    metric: TaskLoss | None = None,
) -> Adaptation:
    """Adapt ``model``'s parameters with ``steps`` full-batch SGD steps on ``support``.

    Args:
        model, support, query, graph: as in a :class:`~metaham.meta.MetaTask`; the model is not modified.
        steps: number of SGD steps (>= 0).
        lr: one learning rate, or one per parameter name (e.g. ``MAML.learning_rates()`` after Meta-SGD).
        eval_at: steps after which to measure the query loss (default: every step ``0..steps``).
        loss: task loss (default: vector-field MSE), used for both the updates and the query loss.
        names: parameters to adapt (default: all; pass the read-out's names for an ANIL-trained model).
        metric: what ``query_loss`` measures on the query set (default: ``loss``), e.g. the vector-field MSE
            of a model adapted with log-cosh.

    Returns:
        :class:`Adaptation` with the sorted ``steps`` of ``eval_at`` and the query loss after each.
    """
    checkpoints, params, names, lrs, loss, metric = _settings(model, steps, lr, eval_at, loss, metric, names)
    curve = []
    for step in range(steps + 1):
        if step in checkpoints:
            # torch.func.grad inside the loss ignores the outer no_grad, so the vector field is still computed.
            with torch.no_grad():
                curve.append(float(metric(model, params, query, graph)))
        if step < steps:
            params = sgd_step(loss, model, params, support, graph, names, lrs, first_order=True)
    return Adaptation(checkpoints, curve, params)


def adapt_tasks(
    model: nn.Module,
    tasks: Sequence[MetaTask],
    *,
    steps: int = 10,
    lr: float | Mapping[str, Tensor | float] = 0.1,
    eval_at: Iterable[int] | None = None,
    loss: TaskLoss | None = None,
    names: Sequence[str] | None = None,
    metric: TaskLoss | None = None,
) -> list[Adaptation]:
    """:func:`adapt` applied to each of ``tasks`` (:class:`~metaham.meta.MetaTask`), one :class:`Adaptation` each.

    Tasks of equal shape are stacked and adapted together under ``torch.func.vmap`` (as in MAML's meta-batches):
    the same SGD steps as adapting them one by one, several times faster for small tasks.
    """
    checkpoints, params0, names, lrs, loss, metric = _settings(model, steps, lr, eval_at, loss, metric, names)
    results: list[Adaptation | None] = [None] * len(tasks)
    for group in group_tasks(tasks):
        graph = group.graph
        step_all = torch.func.vmap(lambda p, data: sgd_step(loss, model, p, data, graph, names, lrs, first_order=True))
        measure_all = torch.func.vmap(lambda p, data: metric(model, p, data, graph))
        count = len(group.indices)
        params = {name: value.expand(count, *value.shape) for name, value in params0.items()}
        curve = []
        for step in range(steps + 1):
            if step in checkpoints:
                with torch.no_grad():
                    curve.append(measure_all(params, group.query).tolist())
            if step < steps:
                params = step_all(params, group.support)
        for j, index in enumerate(group.indices):
            results[index] = Adaptation(checkpoints, [values[j] for values in curve], {n: v[j] for n, v in params.items()})
    return results  # type: ignore[return-value]


def _settings(model, steps, lr, eval_at, loss, metric, names):
    """Validated adaptation settings: checkpoints, detached parameters, adapted names, rates, loss, metric."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    loss = loss if loss is not None else VectorFieldLoss("mse")
    metric = metric if metric is not None else loss
    checkpoints = sorted(set(range(steps + 1) if eval_at is None else eval_at))
    if checkpoints and not 0 <= checkpoints[0] <= checkpoints[-1] <= steps:
        raise ValueError(f"eval_at must lie in [0, {steps}], got {checkpoints}")
    params = {name: value.detach() for name, value in model.named_parameters()}
    names = tuple(params) if names is None else tuple(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names not among the model's parameters: {', '.join(unknown)}")
    lrs = dict(lr) if isinstance(lr, Mapping) else {name: float(lr) for name in names}
    missing = [n for n in names if n not in lrs]
    if missing:
        raise ValueError(f"lr has no learning rate for: {', '.join(missing)}")
    lrs = {name: (v.detach() if isinstance(v, Tensor) else v) for name, v in lrs.items()}
    return checkpoints, params, names, lrs, loss, metric
