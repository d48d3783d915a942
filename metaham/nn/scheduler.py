"""Three-phase sparsity scheduler: random -> adaptive -> fixed, counted in optimizer steps.

Usage (the scheduler lives inside the model so that its step count is in the model's ``state_dict``)::

    model.sparsity = SparsityScheduler(model, random_steps=2000, adaptive_steps=1000)
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        model.sparsity.step()          # one call per optimizer step; forward and eval calls never count

Phase at step count ``s`` (optimizer steps done): random while ``s < random_steps``, adaptive while
``s < random_steps + adaptive_steps``, fixed afterwards. Phases only move forward. Create the scheduler
before loading a checkpoint: creating it sets every gate to the phase of step 0, loading then restores the
saved step, phase and kept sets.
"""
from __future__ import annotations

import torch
from torch import nn

from .sparse_tp import PHASES, SparseTensorProduct


def _check_steps(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (optimizer steps), got {value!r}")
    return value


class SparsityScheduler(nn.Module):
    """Drives the phase of every :class:`SparseTensorProduct` inside ``model``.

    Args:
        model: the module whose sparse tensor products (found through ``model.modules()`` now, at
            construction) this scheduler drives.
        random_steps: optimizer steps of the random phase (>= 0).
        adaptive_steps: optimizer steps of the adaptive phase (>= 0).

    State (buffers, saved in ``state_dict``): ``steps_done`` and ``phase_index``.
    """

    def __init__(self, model: nn.Module, random_steps: int, adaptive_steps: int) -> None:
        super().__init__()
        self.random_steps = _check_steps(random_steps, "random_steps")
        self.adaptive_steps = _check_steps(adaptive_steps, "adaptive_steps")
        # A plain tuple, not submodules: the gates are saved by the model that owns them, not twice.
        self._gates = tuple(m for m in model.modules() if isinstance(m, SparseTensorProduct))
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.long))
        self.register_buffer("phase_index", torch.tensor(PHASES.index(self._phase_at(0)), dtype=torch.long))
        self._push(self.phase)

    @property
    def phase(self) -> str:
        """The current phase name."""
        return PHASES[int(self.phase_index)]

    @property
    def gates(self) -> tuple[SparseTensorProduct, ...]:
        """The sparse tensor products this scheduler drives."""
        return self._gates

    def _phase_at(self, steps: int) -> str:
        if steps < self.random_steps:
            return "random"
        if steps < self.random_steps + self.adaptive_steps:
            return "adaptive"
        return "fixed"

    def step(self) -> str:
        """Count one optimizer step; move to the next phase when its step count is reached.

        In the random and adaptive phases every gate re-selects its top-weight paths (from the weights the
        optimizer just updated); entering the fixed phase freezes them. Returns the phase now in force.
        """
        self.steps_done += 1
        index = max(int(self.phase_index), PHASES.index(self._phase_at(int(self.steps_done))))
        self.phase_index.fill_(index)
        self._push(PHASES[index])
        return PHASES[index]

    def _push(self, phase: str) -> None:
        for gate in self._gates:
            gate.set_phase(phase)

    def extra_repr(self) -> str:
        return (
            f"random_steps={self.random_steps}, adaptive_steps={self.adaptive_steps}, "
            f"steps_done={int(self.steps_done)}, phase={self.phase}, gates={len(self._gates)}"
        )
