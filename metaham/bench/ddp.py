"""``metaham bench ddp``: data-parallel training throughput, N gloo ranks x 1 thread vs 1 process x 1 thread.

Both sides run the engine's optimizer step (:func:`metaham.train.loop.take_step`: backward, the world's average of
loss and gradients, clipping, the update, the schedulers) on the same global batch, as ``metaham qh9 train`` and
``metaham meta-train`` do under torchrun: each rank takes its contiguous shard and weights its loss by the
shard's size. Two steps are timed:

* QH9: the QH9 model of ``configs/qh9.yaml`` (``--config`` / ``--set`` change it; fixed sparsity phase, learning ``H``) on a
  batch of the largest G2 molecules in a seeded shuffled order (as a training batch is), with their core
  Hamiltonians as targets;
* meta: one second-order MAML step of a HamiltonianGNN on a meta-batch of equal-shape tasks of one system.

Each side runs in fresh processes spawned here, one torch thread each, and reports samples per second: the
global batch times the timed steps over the slowest rank's wall time. ``scaling_*`` is the N-rank throughput
over the one-process throughput (ideal: N). The all-reduce share is the part of a rank's steps spent in
:meth:`~metaham.train.distributed.World.average_gradients`, waiting for the slower rank included. Batches are
built before the clock starts: the bench measures the optimizer step, not data loading.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaham.errors import UserError
from metaham.train.distributed import World, shard_slice, shard_weight

NAME = "ddp"
HELP = "data-parallel training: samples/s of 2 gloo ranks x 1 thread vs 1 process x 1 thread (QH9 and meta steps)"
TARGET_SCALING = 1.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.options import positive

    parser.add_argument("--ranks", type=positive(int), default=2, help="ranks of the parallel side (default 2)")
    parser.add_argument("--steps", type=positive(int), default=10, help="timed optimizer steps per side (default 10)")
    parser.add_argument("--warmup", type=positive(int), default=2, help="untimed steps first (default 2)")
    parser.add_argument("--molecules", type=positive(int), default=8, help="QH9 global batch: G2 molecules (default 8)")
    parser.add_argument("--tasks", type=positive(int), default=16, help="meta-batch: tasks (default 16)")
    parser.add_argument("--points", type=positive(int), default=50, help="support (and query) points per task (default 50)")
    parser.add_argument("--system", default="mass_spring", help="system of the meta tasks (default mass_spring)")
    parser.add_argument("--hidden", type=positive(int), default=64, help="HamiltonianGNN width (default 64)")
    parser.add_argument("--layers", type=positive(int), default=2, help="HamiltonianGNN layers (default 2)")
    parser.add_argument("--config", default=None, metavar="PATH", help="QH9 model config (default: configs/qh9.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override a QH9 config value, e.g. --set model.layers=2 (repeatable)",
    )


def run(args: argparse.Namespace) -> tuple[str, dict]:
    from metaham.text import table

    for key, batch in (("molecules", args.molecules), ("tasks", args.tasks)):
        if batch < args.ranks:
            raise UserError(f"--{key} {batch}: each of the {args.ranks} ranks needs one at least")
    problems = {"qh9": _qh9_problem(args), "meta": _meta_problem(args)}
    result: dict[str, Any] = {"ranks": args.ranks, "steps": args.steps, "threads_per_rank": 1,
                              "target_scaling": TARGET_SCALING}
    rows = []
    for half, problem in problems.items():
        one, many = (_measure(problem, size, args) for size in (1, args.ranks))
        scaling = many["samples_per_s"] / one["samples_per_s"]
        result[f"scaling_{half}"] = scaling
        result[half] = {"batch": problem["batch"], "one": one, "parallel": many, "target_met": scaling >= TARGET_SCALING}
        rows.append([half, problem["batch"], f"{one['samples_per_s']:.2f}", f"{many['samples_per_s']:.2f}",
                     f"{scaling:.2f}", f"{100 * many['allreduce_share']:.1f}%"])
    met = all(result[h]["target_met"] for h in problems)
    summary = (
        f"data-parallel training step: 1 process x 1 thread vs {args.ranks} gloo ranks x 1 thread, "
        f"{args.steps} timed steps after {args.warmup}\n"
        + table(rows, ["step", "global batch", "samples/s (1)", f"samples/s ({args.ranks})", "scaling",
                       "in all-reduce"])
        + f"\nscaling target >= {TARGET_SCALING:g} (ideal {args.ranks}): {'met' if met else 'NOT met'}"
    )
    return summary, result


def _qh9_problem(args: argparse.Namespace) -> dict:
    from metaham.errors import UsageError
    from metaham.qh9.dataset import molecule_data
    from metaham.qh9.train import DEFAULT_CONFIG, load_train_config
    from metaham.train import ConfigError

    from .qh9 import g2_inputs

    try:
        model = load_train_config(args.config or DEFAULT_CONFIG, args.overrides)["model"]
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    molecules = [molecule_data(Z, pos, H) for _, Z, pos, H, _ in g2_inputs(args.molecules, 1)]
    # g2_inputs lists the molecules largest first; a training batch is a shuffled draw. Contiguous shards of the
    # sorted list would give rank 0 all the large ones and time the imbalance, not the data parallelism.
    order = np.random.default_rng(0).permutation(len(molecules))
    molecules = [molecules[i] for i in order]
    return {"half": "qh9", "batch": len(molecules), "items": molecules,
            "model": {**model, "residual": False, "random_steps": 0, "adaptive_steps": 0}}


def _meta_problem(args: argparse.Namespace) -> dict:
    import systems

    from .maml import equal_shape_tasks

    try:
        system = systems.get(args.system)
    except KeyError as exc:
        raise UserError(f"--system {args.system!r}: {exc}") from None
    return {"half": "meta", "batch": args.tasks, "items": equal_shape_tasks(system, args.tasks, args.points),
            "model": {"backbone": "gcn", "hidden": args.hidden, "layers": args.layers}}


def _measure(problem: dict, size: int, args: argparse.Namespace) -> dict:
    """Time ``problem`` on ``size`` spawned ranks; samples/s over the slowest rank, rank 0's all-reduce share."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        mp.start_processes(_rank_main, args=(size, _free_port(), problem, args.warmup, args.steps, str(out)),
                           nprocs=size, start_method="spawn", join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    slowest = max(r["seconds"] for r in ranks)
    return {"seconds": slowest, "samples_per_s": problem["batch"] * args.steps / slowest,
            "allreduce_share": max(r["allreduce_seconds"] / r["seconds"] for r in ranks)}


def _rank_main(rank: int, size: int, port: int, problem: dict, warmup: int, steps: int, out: str) -> None:
    """One rank (or the one process): join the group, build the half's step, time it, write what it saw."""
    from metaham.train.distributed import barrier, close_world, init_world
    from metaham.train.loop import take_step

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_world("cpu")
    try:
        timed = _TimedWorld(**dataclasses.asdict(world))
        # The job holds this rank's shard itself: take_step's batch argument is not read.
        job = (_QH9Step if problem["half"] == "qh9" else _MetaStep)(problem, timed)
        for step in range(warmup):
            take_step(job, None, step, 10.0, timed)
        barrier(world)
        timed.spent[0] = 0.0
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            take_step(job, None, step, 10.0, timed)
        seconds = time.perf_counter() - start
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "allreduce_seconds": timed.spent[0]}))
    finally:
        close_world(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class _TimedWorld(World):
    """A world that adds the seconds spent averaging loss and gradients to ``spent[0]``."""

    spent: list = dataclasses.field(default_factory=lambda: [0.0])

    def average_gradients(self, parameters, loss) -> float:
        start = time.perf_counter()
        value = super().average_gradients(parameters, loss)
        self.spent[0] += time.perf_counter() - start
        return value


class _QH9Step:
    """The QH9 half's step (as :class:`metaham.qh9.train` takes it) as a :class:`~metaham.train.loop.Job`."""

    name, failure_hint = "qh9", ""

    def __init__(self, problem: dict, world: World) -> None:
        from torch_geometric.data import Batch

        from metaham.qh9.model import QH9Model

        torch.manual_seed(0)
        self.model = QH9Model(**problem["model"])
        self.batch = Batch.from_data_list(problem["items"][shard_slice(problem["batch"], world)])
        self.target = self.model.target(self.batch)
        self.weight = shard_weight(self.batch.num_graphs, problem["batch"], world)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.schedulers = [self.model.sparsity]

    def parameters(self):
        return self.model.parameters()

    def loss(self, batch: Any, step: int) -> torch.Tensor:
        from metaham.qh9.train import matrix_loss

        b = self.batch
        return self.weight * matrix_loss(self.model(b.z, b.pos, b.batch, b.ptr), self.target, "mae+mse",
                                         self.model.output_scale)


class _MetaStep:
    """The meta half's step (second-order MAML on a shard of the meta-batch) as a :class:`~metaham.train.loop.Job`."""

    name, failure_hint = "meta", ""

    def __init__(self, problem: dict, world: World) -> None:
        from metaham.hamiltonian import HamiltonianGNN
        from metaham.meta import MAML

        torch.manual_seed(0)
        self.maml = MAML(HamiltonianGNN(**problem["model"]), inner_lr=0.1)
        self.tasks = problem["items"][shard_slice(problem["batch"], world)]
        self.weight = shard_weight(len(self.tasks), problem["batch"], world)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr=1e-3)
        self.schedulers: list = []

    def parameters(self):
        return self.maml.parameters()

    def loss(self, batch: Any, step: int) -> torch.Tensor:
        return self.weight * self.maml.meta_loss(self.tasks)
