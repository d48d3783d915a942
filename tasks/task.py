"""A task: one system type, one draw of its parameters, support/query points and held-out rollouts.

Shapes (``n`` = the system's particles, 2 = spatial dimension):

* :class:`PhasePoints` -- ``q``, ``p`` (states) and ``dq``, ``dp`` (targets: the exact vector field
  ``(dH/dp, -dH/dq)`` at the states, plus the configured target noise), each ``(K, n, 2)``.
* :class:`Rollouts` -- ``t`` ``(T,)`` and ``q``, ``p`` ``(R, T, n, 2)``: ``R`` ground-truth trajectories with
  ``q[:, 0], p[:, 0]`` their initial states.

``stack`` turns a list of equal-shape values into one with a leading task axis (``(M, K, n, 2)``), the input
of a ``vmap`` over the tasks of a meta-batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T", bound="_Tensors")


class _Tensors:
    """Moving and stacking for dataclasses whose fields are all tensors."""

    def to(self: _T, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> _T:
        """A copy on ``device`` with floating tensors cast to ``dtype`` (either may be None: keep)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in dataclasses.fields(self)}
        )

    @classmethod
    def stack(cls: type[_T], items: Sequence[_T]) -> _T:
        """Stack equal-shape values along a new leading axis."""
        if not items:
            raise ValueError(f"{cls.__name__}.stack needs at least one item")
        return cls(**{f.name: torch.stack([getattr(i, f.name) for i in items]) for f in dataclasses.fields(cls)})


@dataclass
class PhasePoints(_Tensors):
    """Phase-space points with their vector-field targets, each ``(K, n, 2)``."""

    q: Tensor
    p: Tensor
    dq: Tensor
    dp: Tensor

    def __len__(self) -> int:
        return self.q.shape[0]


@dataclass
class Rollouts(_Tensors):
    """Ground-truth trajectories: ``t`` ``(T,)``, ``q`` and ``p`` ``(R, T, n, 2)``."""

    t: Tensor
    q: Tensor
    p: Tensor


@dataclass
class Task:
    """One system type with one draw of its physical parameters.

    Attributes:
        system: registry name of the system (``systems.get(task.system)`` gives its physics).
        params: the parameter draw, name -> 0-d tensor.
        support: the K points a learner adapts on.
        query: K further points, disjoint from the support set, to evaluate the adapted learner on.
        rollouts: held-out trajectories (their own initial states, the same parameters).
    """

    system: str
    params: dict[str, Tensor]
    support: PhasePoints
    query: PhasePoints
    rollouts: Rollouts

    @property
    def n_particles(self) -> int:
        return self.support.q.shape[-2]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Task":
        """A copy on ``device`` with tensors cast to ``dtype`` (either may be None: keep)."""
        return Task(
            system=self.system,
            params={k: v.to(device=device, dtype=dtype) for k, v in self.params.items()},
            support=self.support.to(device, dtype),
            query=self.query.to(device, dtype),
            rollouts=self.rollouts.to(device, dtype),
        )
