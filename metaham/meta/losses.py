"""Task losses: the vector-field loss of a Hamiltonian model and the point-wise losses it can use.

A *task loss* is any callable ``loss(model, params, data, graph) -> scalar`` where ``params`` is a dict
name -> tensor used in place of the model's own parameters (``torch.func.functional_call``), ``data`` a
tuple of tensors for one task and ``graph`` whatever the model needs besides the data (for a
:class:`~metaham.hamiltonian.HamiltonianGNN` its ``edge_index``). The MAML engine, the pre-training baseline
and adaptation all take one; write your own for another model (the tests use linear regression).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TaskLoss = Callable[[nn.Module, Mapping[str, Tensor], tuple, object], Tensor]


def mse(error: Tensor) -> Tensor:
    """Mean squared error of the residuals ``error`` (any shape) -> scalar."""
    return error.pow(2).mean()


def log_cosh(error: Tensor) -> Tensor:
    """Mean log(cosh(error)) -> scalar: quadratic for small residuals, linear for large ones, so systems whose
    vector fields differ in scale weigh alike (the paper's choice).

    Written as ``x + softplus(-2x) - log 2``, which is exact, overflow-free and smooth at 0 (a form with
    ``|x|`` gets a wrong second derivative at exactly 0, and surplus coordinates make zero residuals common).
    """
    return (error + F.softplus(-2.0 * error) - math.log(2.0)).mean()


LOSSES: dict[str, Callable[[Tensor], Tensor]] = {"mse": mse, "logcosh": log_cosh}


class VectorFieldLoss:
    """Task loss of a Hamiltonian model on exact vector-field targets.

    ``data = (q, p, dq_dt, dp_dt)``, each ``(..., K, n, 2)``; ``graph`` is the ``edge_index`` ``(2, E)``.
    Returns ``kind`` (``"mse"`` or ``"logcosh"``) of the residuals of both halves of the vector field.

    Example: ``VectorFieldLoss("logcosh")(model, dict(model.named_parameters()), (q, p, dq, dp), edge_index)``.
    """

    def __init__(self, kind: str = "mse") -> None:
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self._pointwise = LOSSES[kind]

    def __call__(self, model: nn.Module, params: Mapping[str, Tensor], data: tuple, graph: Tensor) -> Tensor:
        q, p, dq_dt, dp_dt = data
        dq_hat, dp_hat = model.vector_field(q, p, graph, params=params)
        return self._pointwise(torch.cat([dq_hat - dq_dt, dp_hat - dp_dt], dim=-1))

    def __repr__(self) -> str:
        return f"VectorFieldLoss({self.kind!r})"


def field_mse_halves(model: nn.Module, params: Mapping[str, Tensor], data: tuple, graph: Tensor) -> Tensor:
    """``(2,)``: the MSE of the dq/dt half and of the dp/dt half of a Hamiltonian model's vector field (data
    as :class:`VectorFieldLoss`). Their mean is ``VectorFieldLoss("mse")``; kept apart, errors measured in task
    units with different position and momentum units map back to raw units (``TaskUnits.raw_mse``)."""
    q, p, dq_dt, dp_dt = data
    dq_hat, dp_hat = model.vector_field(q, p, graph, params=params)
    return torch.stack([mse(dq_hat - dq_dt), mse(dp_hat - dp_dt)])

