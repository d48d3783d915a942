"""One process of the data-parallel training tests: ``train_worker.py OUT_DIR METAHAM_ARGS...``.

Runs ``metaham METAHAM_ARGS`` in float64 (the QH9 model takes torch's default dtype; meta-training's tests set
``tasks.dtype=float64``), as one rank under torchrun or as a plain process, and writes what this process saw
to ``OUT_DIR/rank<R>.json``: the exit code and, after every optimizer step, the paths each sparse tensor
product keeps. ``DIE_AT_STEP=K`` makes rank 1 kill itself (SIGKILL, no clean-up) inside its K-th step.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from metaham.cli import main
from metaham.nn import SparsityScheduler
from metaham.train import loop


def _record_selections(kept: list) -> None:
    step = SparsityScheduler.step

    def recording(self):
        phase = step(self)
        kept.append([phase, [list(gate.kept_paths) for gate in self.gates]])
        return phase

    SparsityScheduler.step = recording


def _die_at(step_number: int) -> None:
    take_step = loop.take_step

    def dying(job, batch, step, *args, **kwargs):
        if step + 1 == step_number:
            os.kill(os.getpid(), signal.SIGKILL)
        return take_step(job, batch, step, *args, **kwargs)

    loop.take_step = dying


if __name__ == "__main__":
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", 0))
    torch.set_default_dtype(torch.float64)
    kept: list = []
    _record_selections(kept)
    if rank == 1 and "DIE_AT_STEP" in os.environ:
        _die_at(int(os.environ["DIE_AT_STEP"]))
    code = main(argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"code": code, "kept": kept}))
    sys.exit(code)
