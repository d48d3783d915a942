"""Test-time adaptation: plain full-batch SGD on a task's support set, with the query-loss curve.

Every model in a comparison (meta-trained, pre-trained, random) is adapted with this same protocol; the
meta-learned initialisation is tuned to the inner-loop optimizer, so adapt with what it was meta-trained for
(plain SGD at the inner learning rate, 0.1 by default) and state the protocol with every result.

``backtrack=m`` safeguards the SGD steps (a monotone descent rule, as in Armijo backtracking): a step that does
not lower the task's support loss is retried with its learning rate halved, up to ``m`` times, and skipped if
none does. Wherever plain SGD descends it changes nothing, so the meta-learned step is kept; where a task's
curvature is too high for the learning rate (plain SGD diverged on a few pendulum tasks, whose vector fields
are ~25x larger than the other systems'), the support loss can no longer grow. The rule reads the support set
only, so it applies identically to every model and system, the held-out ones included.

Example::

    curve = adapt(model, task.support, task.query, task.graph, steps=10, lr=0.1)
    curve.steps        # [0, 1, ..., 10]
    curve.query_loss   # query loss after each of those steps
    safe = adapt(model, task.support, task.query, task.graph, steps=10, lr=0.1, backtrack=10)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .batching import MetaTask, group_tasks
from .functional import sgd_step
from .losses import TaskLoss, VectorFieldLoss

#: Default halvings of a non-descending step wherever a trained model is scored by adapting it (``metaham adapt``,
#: held-in validation during meta-training), so every score uses the same protocol (0 would be plain SGD).
BACKTRACK = 10


@dataclass
class Adaptation:
    """The query-loss curve of one adaptation run and the parameters after its last step (a metric that returns
    a vector, e.g. :func:`~metaham.meta.losses.field_mse_halves`, gives a list per step)."""

    steps: list[int]
    query_loss: list
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
    backtrack: int = 0,
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
        backtrack: halve a step's learning rate up to this many times until the support loss decreases, and
            skip the step if it never does (0: plain SGD); see the module docstring.

    Returns:
        :class:`Adaptation` with the sorted ``steps`` of ``eval_at`` and the query loss after each.
    """
    checkpoints, params, names, lrs, loss, metric = _settings(model, steps, lr, eval_at, loss, metric, names,
                                                              backtrack)
    step_once = _stepper(loss, model, graph, names, lrs, backtrack, batched=False)
    curve = []
    for step in range(steps + 1):
        if step in checkpoints:
            # torch.func.grad inside the loss ignores the outer no_grad, so the vector field is still computed.
            with torch.no_grad():
                curve.append(float(metric(model, params, query, graph)))
        if step < steps:
            params = step_once(params, support)
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
    backtrack: int = 0,
) -> list[Adaptation]:
    """:func:`adapt` applied to each of ``tasks`` (:class:`~metaham.meta.MetaTask`), one :class:`Adaptation` each.

    Tasks of equal shape are stacked and adapted together under ``torch.func.vmap`` (as in MAML's meta-batches):
    the same SGD steps as adapting them one by one, several times faster for small tasks (with ``backtrack``,
    each task still gets its own step sizes).
    """
    checkpoints, params0, names, lrs, loss, metric = _settings(model, steps, lr, eval_at, loss, metric, names,
                                                               backtrack)
    results: list[Adaptation | None] = [None] * len(tasks)
    for group in group_tasks(tasks):
        graph = group.graph
        step_all = _stepper(loss, model, graph, names, lrs, backtrack, batched=True)
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


def _stepper(loss, model, graph, names, lrs, backtrack: int, batched: bool):
    """``step(params, support) -> params``: one adaptation step, over a leading task axis when ``batched``."""
    vmap = torch.func.vmap if batched else (lambda fn: fn)
    if backtrack == 0:
        return vmap(lambda p, data: sgd_step(loss, model, p, data, graph, names, lrs, first_order=True))

    def grad_and_loss(p, data):
        return torch.func.grad_and_value(lambda a: loss(model, {**p, **a}, data, graph))({n: p[n] for n in names})

    grad_and_loss, loss_at = vmap(grad_and_loss), vmap(lambda p, data: loss(model, p, data, graph))

    def step(params, support):
        grads, current = grad_and_loss(params, support)  # current: (tasks,) or ()
        if not batched:
            for halvings in range(backtrack + 1):
                trial = {n: params[n] - 0.5**halvings * lrs[n] * grads[n] for n in names}
                with torch.no_grad():
                    if bool(loss_at({**params, **trial}, support) <= current):  # NaN never descends
                        return {**params, **trial}
            return params  # no halving descends: the step is skipped
        new = dict(params)  # tasks that never descend keep their parameters (the step is skipped)
        left = torch.arange(current.numel(), device=current.device)  # tasks without a descending step yet
        for halvings in range(backtrack + 1):
            # Only the tasks still left are tried again: on the pendulum ~40% of a step's tasks need a halving,
            # and one of them is enough to start another round. The choice is made here, outside vmap, where the
            # losses are concrete values.
            base = {n: v[left] for n, v in params.items()}
            trial = {n: base[n] - 0.5**halvings * lrs[n] * grads[n][left] for n in names}
            with torch.no_grad():
                better = loss_at({**base, **trial}, tuple(x[left] for x in support)) <= current[left]  # NaN: never
            for n in names:
                new[n] = new[n].index_copy(0, left[better], trial[n][better])
            left = left[~better]
            if left.numel() == 0:
                break
        return new

    return step


def _settings(model, steps, lr, eval_at, loss, metric, names, backtrack=0):
    """Validated adaptation settings: checkpoints, detached parameters, adapted names, rates, loss, metric."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
        raise ValueError(f"backtrack must be an integer >= 0, got {backtrack!r}")
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
