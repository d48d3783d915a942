"""The inner-loop update shared by MAML, its variants and test-time adaptation, as a pure function."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .losses import TaskLoss


def sgd_step(
    loss: TaskLoss,
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: tuple,
    graph: object,
    names: Sequence[str],
    lrs: Mapping[str, Tensor | float],
    first_order: bool = False,
) -> dict[str, Tensor]:
    """One full-batch gradient step on the parameters ``names``: ``p <- p - lrs[p] * dL/dp``.

    Returns a new dict with every entry of ``params`` (the others unchanged). The gradient is taken with
    ``torch.func.grad``, so the step stays differentiable with respect to ``params`` and ``lrs`` for an outer
    ``autograd``/``torch.func`` derivative (second-order MAML, Meta-SGD) and runs under ``vmap``.
    ``first_order`` detaches the gradient: the step is then a constant shift for the outer derivative
    (first-order MAML).
    """

    def loss_of(adapted: dict[str, Tensor]) -> Tensor:
        return loss(model, {**params, **adapted}, data, graph)

    grads = torch.func.grad(loss_of)({name: params[name] for name in names})
    new = dict(params)
    for name in names:
        g = grads[name].detach() if first_order else grads[name]
        new[name] = params[name] - lrs[name] * g
    return new
