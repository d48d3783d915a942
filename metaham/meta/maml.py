"""MAML (Finn et al. 2017) and its variants on ``torch.func``: second/first order, ANIL, Meta-SGD.

For each task the inner loop takes ``inner_steps`` full-batch SGD steps on the support set,
``theta' = theta - lr * dL_support/dtheta``, and the meta-loss is the query loss at ``theta'``, averaged over
the meta-batch. Calling ``backward()`` on it gives the meta-gradient with respect to the initialisation
``theta`` (and the inner learning rates, for Meta-SGD):

* second order (default): the derivative runs through the inner update, Hessian-vector products included;
* ``first_order=True``: the inner gradient is treated as a constant (FOMAML);
* ``anil=True``: only the read-out (parameters whose name starts with ``readout_prefix``) adapts in the inner
  loop (Raghu et al. 2020); the body is still meta-learned through the query loss;
* ``meta_sgd=True``: one learned inner learning rate per parameter entry, initialised at ``inner_lr`` and
  meta-learned with the initialisation (Li et al. 2017). They are this module's parameters.

Equal-shape tasks run together under ``torch.func.vmap`` (see :mod:`metaham.meta.batching`), other tasks one
by one; both give the same meta-gradient. The defaults (inner lr 0.1, one step, second order) are the ones
measured to make meta-learning beat pre-training on Hamiltonian tasks at CPU scale.

Example (one meta-training step)::

    import torch
    from metaham.hamiltonian import HamiltonianGNN, edge_index
    from metaham.meta import MAML, MetaTask

    model = HamiltonianGNN(backbone="gcn", hidden=32, layers=2)
    maml = MAML(model, inner_lr=0.1, inner_steps=1)         # loss: vector-field MSE
    graph = edge_index(1)                                   # one particle
    def points(k):                                          # (q, p, dq/dt, dp/dt) of a unit oscillator
        q, p = torch.randn(k, 1, 2), torch.randn(k, 1, 2)
        return q, p, p, -q
    tasks = [MetaTask(points(50), points(50), graph) for _ in range(10)]
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    optimizer.zero_grad()
    maml.meta_loss(tasks).backward()
    optimizer.step()
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .batching import MetaTask, check_tasks, group_tasks
from .functional import sgd_step
from .losses import TaskLoss, VectorFieldLoss


class MAML(nn.Module):
    """Meta-learner wrapping ``model``; its parameters are the model's (plus the Meta-SGD rates).

    Args:
        model: any ``nn.Module`` the task ``loss`` knows how to call.
        loss: task loss ``loss(model, params, data, graph) -> scalar`` (default: vector-field MSE).
        inner_lr: inner SGD learning rate (initial value of the learned rates with ``meta_sgd``).
        inner_steps: inner SGD steps per task, >= 1.
        first_order: drop second-order terms (FOMAML).
        anil: adapt only the parameters starting with ``readout_prefix`` in the inner loop.
        meta_sgd: learn one inner learning rate per parameter entry.
        readout_prefix: the read-out's parameter-name prefix (``HamiltonianGNN`` uses ``"readout."``).
        vmap: batch equal-shape tasks with ``torch.func.vmap`` (``False``: always one task at a time).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: TaskLoss | None = None,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        first_order: bool = False,
        anil: bool = False,
        meta_sgd: bool = False,
        readout_prefix: str = "readout.",
        vmap: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(inner_lr, (int, float)) and math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        self.model = model
        self.loss = loss if loss is not None else VectorFieldLoss("mse")
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.anil = anil
        self.vmap = vmap
        names = [name for name, _ in model.named_parameters()]
        if anil:
            names = [name for name in names if name.startswith(readout_prefix)]
            if not names:
                raise ValueError(f"anil=True but the model has no parameter whose name starts with {readout_prefix!r}")
        self.adapted_names: tuple[str, ...] = tuple(names)
        # Meta-SGD rates live in a ParameterList aligned with adapted_names (ParameterDict keys cannot hold
        # the dots of parameter names).
        params = dict(model.named_parameters())
        self.inner_lrs = (
            nn.ParameterList(nn.Parameter(torch.full_like(params[n].detach(), self.inner_lr)) for n in names)
            if meta_sgd
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, "
            f"anil={self.anil}, meta_sgd={self.inner_lrs is not None}, vmap={self.vmap}, loss={self.loss!r}"
        )

    def learning_rates(self) -> dict[str, Tensor | float]:
        """Inner learning rate of each adapted parameter (tensors shaped like it with Meta-SGD)."""
        if self.inner_lrs is None:
            return {name: self.inner_lr for name in self.adapted_names}
        return dict(zip(self.adapted_names, self.inner_lrs))

    def adapt(self, support: tuple[Tensor, ...], graph: object = None, steps: int | None = None) -> dict[str, Tensor]:
        """Adapted parameters (every model parameter, by name) after the inner loop on one task's support set.

        The result stays differentiable with respect to the initialisation (unless ``first_order``).
        """
        params = dict(self.model.named_parameters())
        lrs = self.learning_rates()
        for _ in range(self.inner_steps if steps is None else steps):
            params = sgd_step(self.loss, self.model, params, support, graph, self.adapted_names, lrs, self.first_order)
        return params

    def task_loss(self, task: MetaTask) -> Tensor:
        """Query loss of one task after adaptation on its support set (scalar)."""
        support, query, graph = task
        return self.loss(self.model, self.adapt(support, graph), query, graph)

    def meta_loss(self, tasks: Sequence[MetaTask]) -> Tensor:
        """Mean post-adaptation query loss over the meta-batch (scalar); ``backward()`` gives the meta-gradient."""
        if not self.vmap:
            check_tasks(tasks)
            return torch.stack([self.task_loss(MetaTask(*t)) for t in tasks]).mean()
        total = 0.0
        for group in group_tasks(tasks):
            if len(group.indices) == 1:
                losses = self.task_loss(MetaTask(*tasks[group.indices[0]]))
            else:
                one_task = lambda s, q, graph=group.graph: self.task_loss(MetaTask(s, q, graph))  # noqa: E731
                # randomness="same": a sparse gate in its random phase draws one path set for the whole group,
                # as one forward pass over a batch does.
                losses = torch.func.vmap(one_task, randomness="same")(group.support, group.query)
            total = total + losses.sum()
        return total / len(tasks)
