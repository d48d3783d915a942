"""The processes of a run: which one this is, and what only one of them may do.

A single process is ``World()``: rank 0 of 1. A data-parallel launcher builds a world of its own (a subclass
that knows torch.distributed) and hands it to the engine; the engine asks it two things only:

* :attr:`World.is_main` before every write into the run directory (config, checkpoints, logs), so that N
  ranks never race on one file;
* :meth:`World.average_gradients` between ``backward()`` and the optimizer step (see
  :func:`metaham.train.loop.take_step`), where each rank's gradients of its shard are made the gradients of
  the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class World:
    """Rank ``rank`` of ``size`` processes training one model."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Make each parameter's ``.grad`` the mean over ranks. One process already holds the mean."""


SINGLE_PROCESS = World()
