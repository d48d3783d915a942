"""The pre-training baseline: the same model trained on the pooled meta-training tasks, no inner loop.

Its outer objective on a meta-batch is the mean over tasks of the plain task loss on all of the task's points
(support and query together). It has the same interface as :class:`~metaham.meta.MAML` (``meta_loss``,
``parameters``), so a training loop runs either with the same meta-batches, optimizer and number of steps,
which is the fair comparison (Song and Jeong 2024, "pre-trained" baseline).

Example::

    baseline = Pretrain(model)                 # loss: vector-field MSE
    optimizer = torch.optim.Adam(baseline.parameters(), lr=1e-3)
    optimizer.zero_grad(); baseline.meta_loss(tasks).backward(); optimizer.step()
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .batching import MetaTask, group_tasks
from .losses import TaskLoss, VectorFieldLoss


class Pretrain(nn.Module):
    """Pooled training of ``model`` with the task ``loss`` (default: vector-field MSE)."""

    def __init__(self, model: nn.Module, loss: TaskLoss | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else VectorFieldLoss("mse")

    def meta_loss(self, tasks: Sequence[MetaTask]) -> Tensor:
        """Mean over tasks of the loss on each task's support and query points together (scalar)."""
        params = dict(self.model.named_parameters())
        total = 0.0
        for group in group_tasks(tasks):
            # Stacked leaves are (tasks, points, ...): pool support and query along the points axis.
            pooled = tuple(torch.cat([s, q], dim=1) for s, q in zip(group.support, group.query))
            # randomness="same": one path set per batch from a sparse gate in its random phase (as in MAML).
            per_task = torch.func.vmap(lambda data: self.loss(self.model, params, data, group.graph),
                                       randomness="same")(pooled)
            total = total + per_task.sum()
        return total / len(tasks)
