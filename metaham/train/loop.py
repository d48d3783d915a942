"""The step loop both training halves plug into.

A half supplies a :class:`Job`: its optimizer and parameters, its batches from any step on, the loss of one
batch, and its own bookkeeping after a step (logs, validation, epoch ends) and checkpoint. The loop owns the
rest: the optimizer step (:func:`take_step`: backward, the world's gradient averaging, clipping, the update,
the schedulers that follow it), the progress bar, periodic checkpoints, the wall-clock budget, and a
checkpoint when the user interrupts -- only between steps, where weights, optimizer state and step count
agree, so that resuming continues exactly.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .distributed import SINGLE_PROCESS, World, rank_bar_disabled


class Clock:
    """Seconds a run has trained, earlier parts included, against its budget."""

    def __init__(self, max_minutes: float = 0.0, seconds_before: float = 0.0) -> None:
        self._start = time.perf_counter() - seconds_before
        self._deadline = self._start + 60.0 * max_minutes if max_minutes else math.inf

    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def expired(self) -> bool:
        return time.perf_counter() > self._deadline


class Job(Protocol):
    """What a half supplies to :func:`run_loop`.

    Attributes:
        name: names the half in messages and on the progress bar.
        optimizer: steps the parameters.
        schedulers: stepped once after every optimizer step (e.g. the sparsity scheduler), in order.
        failure_hint: what to suggest when the loss is not finite (``"lower train.lr"``).
    """

    name: str
    optimizer: torch.optim.Optimizer
    schedulers: Sequence[Any]
    failure_hint: str

    def parameters(self) -> Iterable[torch.Tensor]:
        """The trained parameters (clipped, and averaged over ranks)."""

    def batches(self, step: int) -> Iterable[Any]:
        """The batches of optimizer steps ``step``, ``step + 1``, ... up to the last of the run."""

    def loss(self, batch: Any, step: int) -> torch.Tensor:
        """The loss of ``batch`` at optimizer step ``step`` (0-based), before ``backward``."""

    def after_step(self, step: int, loss: float, clock: Clock) -> bool:
        """The half's bookkeeping after ``step`` steps are done (``clock.seconds()``: the run's time so far);
        True when it wrote a checkpoint itself."""

    def save(self, step: int, seconds: float) -> None:
        """Write the checkpoint that a resumed run continues from."""

    def postfix(self) -> str:
        """A short status for the progress bar."""


@dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs and when it checkpoints.

    Attributes:
        total_steps: the optimizer steps of the whole run.
        checkpoint_every: also checkpoint every that many steps (0: only where the half does, at the last
            step, on the clock and on an interrupt).
        max_minutes: wall-clock budget of the run, resumed parts included (0: none).
        clip_norm: clip the gradients' total norm to this (0: no clipping).
        progress: show a progress bar on stderr (None: only on a terminal).
    """

    total_steps: int
    checkpoint_every: int = 0
    max_minutes: float = 0.0
    clip_norm: float = 0.0
    progress: bool | None = None


@dataclass(frozen=True)
class LoopOutcome:
    """Where the loop stopped: after ``steps`` steps, ``seconds`` in all, because of ``stopped``
    (``"steps"``: all done; ``"max_minutes"``: the budget ran out)."""

    steps: int
    seconds: float
    stopped: str


def take_step(job: Job, batch: Any, step: int, clip_norm: float = 0.0, world: World = SINGLE_PROCESS) -> float:
    """One optimizer step on ``batch``; returns the loss (its mean over the ranks). ``FloatingPointError`` when
    the loss is not finite: on every rank at once, since all see the same mean."""
    loss = job.loss(batch, step)
    job.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for p in job.parameters() if p.requires_grad]
    # This process's gradients are complete here and nothing has read them yet: the one place where a
    # data-parallel world turns each rank's shard gradients into those of the whole batch.
    value = world.average_gradients(parameters, loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"{job.name}: the training loss became {value} at step {step + 1}; {job.failure_hint}")
    parameters = [p for p in parameters if p.grad is not None]
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    job.optimizer.step()
    for scheduler in job.schedulers:
        scheduler.step()
    return value


def run_loop(
    job: Job, settings: LoopSettings, *, start_step: int = 0, seconds: float = 0.0, world: World = SINGLE_PROCESS
) -> LoopOutcome:
    """Run ``job`` from optimizer step ``start_step`` (a resumed run: ``seconds`` already trained) to
    ``settings.total_steps`` or the end of the budget, whichever comes first."""
    clock = Clock(settings.max_minutes, seconds)
    step, stopped = start_step, "steps"
    bar = tqdm(total=settings.total_steps, initial=start_step, desc=f"{job.name:>10}", unit="step", file=sys.stderr,
               disable=rank_bar_disabled(settings.progress, world), dynamic_ncols=True)
    between_steps = True  # weights, optimizer state and `step` agree: an interrupt here may checkpoint
    try:
        for batch in job.batches(step):
            between_steps = False
            value = take_step(job, batch, step, settings.clip_norm, world)
            step += 1
            saved = job.after_step(step, value, clock)
            between_steps = True
            bar.update(1)
            bar.set_postfix_str(job.postfix(), refresh=False)
            periodic = bool(settings.checkpoint_every) and step % settings.checkpoint_every == 0
            out_of_time = step < settings.total_steps and clock.expired()
            if not saved and (periodic or out_of_time or step == settings.total_steps):
                job.save(step, clock.seconds())
            if out_of_time:
                stopped = "max_minutes"
                break
    except KeyboardInterrupt:
        # Keep the finished steps; mid-step the last checkpoint stays (a half-applied step would break the
        # exact resume).
        if between_steps and step > start_step:
            job.save(step, clock.seconds())
        raise
    finally:
        bar.close()
    return LoopOutcome(step, clock.seconds(), stopped)
