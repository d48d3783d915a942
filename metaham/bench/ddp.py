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
global batch times the timed steps over the slowest rank's wall time. Two ways of adding ranks are timed, as
users scale either way:

* **same batch per rank** (``scaling_qh9``, ``scaling_meta``): each of the N ranks takes a batch of the size
  one process takes (``--molecules``, ``--tasks``), so the global batch grows N-fold -- how data-parallel
  throughput is usually quoted and how a run that outgrows one process is scaled out. The items are N
  different batches; the one process takes them in turn, one a step, so both sides see the same items;
* **same global batch** (``scaling_*_same_global_batch``): the N ranks split the one process's batch, as the
  parameter-equivalence tests do. Each rank's share is smaller, and the per-step cost that does not shrink
  with the batch (Python and per-operation overhead, the optimizer) caps the ratio at small batches.

``scaling`` is the N-rank throughput over the one-process throughput (ideal: N), the median over
``--repeats`` pairs timed in turn (the other figures are that pair's). The all-reduce share is the
part of a rank's steps spent in :meth:`~metaham.train.distributed.World.average_gradients`, waiting for the
slower rank included. Batches are built before the clock starts: the bench measures the optimizer step, not
data loading.
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
from metaham.train.distributed import World, balanced_shards, shard_slice, shard_weight

NAME = "ddp"
HELP = "data-parallel training: samples/s of 2 gloo ranks x 1 thread vs 1 process x 1 thread (QH9 and meta steps)"
TARGET_SCALING = 1.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.options import positive

    parser.add_argument("--ranks", type=positive(int), default=2, help="ranks of the parallel side (default 2)")
    parser.add_argument("--steps", type=positive(int), default=20, help="timed optimizer steps per side (default 20)")
    parser.add_argument("--repeats", type=positive(int), default=3,
                        help="one-process / N-rank pairs timed in turn; the median scaling is reported (default 3)")
    parser.add_argument("--warmup", type=positive(int), default=2, help="untimed steps first (default 2)")
    parser.add_argument("--molecules", type=positive(int), default=8,
                        help="QH9 batch of one process: G2 molecules (default 8)")
    parser.add_argument("--tasks", type=positive(int), default=16, help="meta-batch of one process: tasks (default 16)")
    parser.add_argument("--points", type=positive(int), default=50, help="support (and query) points per task (default 50)")
    parser.add_argument("--system", default="mass_spring", help="system of the meta tasks (default mass_spring)")
    parser.add_argument("--hidden", type=positive(int), default=64, help="HamiltonianGNN width (default 64)")
    parser.add_argument("--layers", type=positive(int), default=2, help="HamiltonianGNN layers (default 2)")
    parser.add_argument("--config", default=None, metavar="PATH", help="QH9 model config (default: configs/qh9.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override a QH9 config value, e.g. --set model.layers=2 (repeatable)",
    )


MODES = {"same_batch_per_rank": "", "same_global_batch": "_same_global_batch"}


def run(args: argparse.Namespace) -> tuple[str, dict]:
    from metaham.text import table

    for key, batch in (("molecules", args.molecules), ("tasks", args.tasks)):
        if batch < args.ranks:
            raise UserError(f"--{key} {batch}: each of the {args.ranks} ranks needs one at least")
    problems = {"qh9": _qh9_problem(args), "meta": _meta_problem(args)}
    result: dict[str, Any] = {"ranks": args.ranks, "steps": args.steps, "repeats": args.repeats, "threads_per_rank": 1,
                              "target_scaling": TARGET_SCALING}
    rows = []
    for half, problem in problems.items():
        result[half] = {"batch": problem["batch"]}
        for mode, suffix in MODES.items():
            # Side by side, in turn: a busy spell on a shared machine hits one pair, not one side of all pairs.
            pairs = [[_measure(problem, size, mode, args) for size in (1, args.ranks)] for _ in range(args.repeats)]
            scalings = [many["samples_per_s"] / one["samples_per_s"] for one, many in pairs]
            median = sorted(range(len(pairs)), key=scalings.__getitem__)[len(pairs) // 2]
            (one, many), scaling = pairs[median], scalings[median]
            result[f"scaling_{half}{suffix}"] = scaling
            result[half][mode] = {"one": one, "parallel": many, "scaling": scaling, "scalings": scalings,
                                  "target_met": scaling >= TARGET_SCALING}
            rows.append([half, mode.replace("_", " "), one["batch"], many["batch"], f"{one['samples_per_s']:.2f}",
                         f"{many['samples_per_s']:.2f}", f"{scaling:.2f}", f"{100 * many['allreduce_share']:.1f}%"])
    met = all(result[f"scaling_{h}"] >= TARGET_SCALING for h in problems)
    summary = (
        f"data-parallel training step: 1 process x 1 thread vs {args.ranks} gloo ranks x 1 thread, "
        f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} pairs\n"
        + table(rows, ["step", "ranks added with", "batch (1)", f"batch ({args.ranks})", "samples/s (1)",
                       f"samples/s ({args.ranks})", "scaling", "in all-reduce"])
        + f"\nscaling target >= {TARGET_SCALING:g} (ideal {args.ranks}), same batch per rank: "
        + ("met" if met else "NOT met")
    )
    return summary, result


def _qh9_problem(args: argparse.Namespace) -> dict:
    from metaham.errors import UsageError
    from metaham.qh9.data import step_cost
    from metaham.qh9.dataset import molecule_data
    from metaham.qh9.train import DEFAULT_CONFIG, load_train_config
    from metaham.train import ConfigError

    from .qh9 import g2_inputs

    try:
        model = load_train_config(args.config or DEFAULT_CONFIG, args.overrides)["model"]
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    inputs = g2_inputs(args.molecules * args.ranks, 1)
    molecules = [molecule_data(Z, pos, H) for _, Z, pos, H, _ in inputs]
    # g2_inputs lists the molecules largest first; a training batch is a shuffled draw. Contiguous shards of the
    # sorted list would give rank 0 all the large ones and time the imbalance, not the data parallelism.
    order = np.random.default_rng(0).permutation(len(molecules))
    molecules = [molecules[i] for i in order]
    return {"half": "qh9", "batch": args.molecules, "items": molecules,
            "costs": step_cost(np.array([m.num_nodes for m in molecules])).tolist(),
            "model": {**model, "residual": False, "random_steps": 0, "adaptive_steps": 0}}


def _meta_problem(args: argparse.Namespace) -> dict:
    import systems

    from .maml import equal_shape_tasks

    try:
        system = systems.get(args.system)
    except KeyError as exc:
        raise UserError(f"--system {args.system!r}: {exc}") from None
    return {"half": "meta", "batch": args.tasks,
            "items": equal_shape_tasks(system, args.tasks * args.ranks, args.points), "costs": None,
            "model": {"backbone": "gcn", "hidden": args.hidden, "layers": args.layers}}


def _measure(problem: dict, size: int, mode: str, args: argparse.Namespace) -> dict:
    """Time ``problem`` on ``size`` spawned ranks; samples/s over the slowest rank, rank 0's all-reduce share."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        mp.start_processes(_rank_main, args=(size, _free_port(), problem, mode, args.warmup, args.steps, str(out)),
                           nprocs=size, start_method="spawn", join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    slowest = max(r["seconds"] for r in ranks)
    return {"batch": _global_batch(problem, size, mode), "seconds": slowest,
            "samples_per_s": sum(r["samples"] for r in ranks) / slowest,
            "allreduce_share": max(r["allreduce_seconds"] / r["seconds"] for r in ranks)}


def _global_batch(problem: dict, size: int, mode: str) -> int:
    return problem["batch"] * (size if mode == "same_batch_per_rank" else 1)


def _shards(problem: dict, mode: str, world: World) -> list[list]:
    """The batches this rank steps through in turn, one a step: its shard of the global batch, split as the
    training command splits one (QH9: :func:`~metaham.train.distributed.balanced_shards` by molecule cost; meta:
    contiguous, the tasks being of one shape). The one process of the same-batch-per-rank side takes the N
    ranks' shards in turn."""
    b, items, costs = problem["batch"], problem["items"], problem["costs"]
    size = world.size if mode == "same_global_batch" else len(items) // b
    n = b if mode == "same_global_batch" else len(items)
    if costs is None:
        parts = [items[shard_slice(n, World(rank=k, size=size))] for k in range(size)]
    else:
        parts = [[items[i] for i in shard] for shard in balanced_shards(costs[:n], size)]
    if mode == "same_global_batch" or world.distributed:
        return [parts[world.rank]]
    return parts


def _rank_main(rank: int, size: int, port: int, problem: dict, mode: str, warmup: int, steps: int, out: str) -> None:
    """One rank (or the one process): join the group, build the half's step, time it, write what it saw."""
    from metaham.train.distributed import barrier, close_world, init_world
    from metaham.train.loop import take_step

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_world("cpu")
    try:
        timed = _TimedWorld(**dataclasses.asdict(world))
        # The job holds this rank's batches itself: take_step's batch argument is not read.
        job = (_QH9Step if problem["half"] == "qh9" else _MetaStep)(
            problem["model"], _shards(problem, mode, world), _global_batch(problem, size, mode), timed)
        for step in range(warmup):
            take_step(job, None, step, 10.0, timed)
        barrier(world)
        timed.spent[0] = 0.0
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            take_step(job, None, step, 10.0, timed)
        seconds = time.perf_counter() - start
        samples = sum(job.sizes[step % len(job.sizes)] for step in range(warmup, warmup + steps))
        (Path(out) / f"rank{rank}.json").write_text(
            json.dumps({"seconds": seconds, "samples": samples, "allreduce_seconds": timed.spent[0]}))
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

    def __init__(self, model: dict, shards: list[list], global_batch: int, world: World) -> None:
        from torch_geometric.data import Batch

        from metaham.qh9.model import QH9Model

        torch.manual_seed(0)
        self.model = QH9Model(**model)
        self.batches = [Batch.from_data_list(shard) for shard in shards]
        self.targets = [self.model.target(b) for b in self.batches]
        self.sizes = [b.num_graphs for b in self.batches]
        self.weights = [shard_weight(n, global_batch, world) for n in self.sizes]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.schedulers = [self.model.sparsity]

    def parameters(self):
        return self.model.parameters()

    def loss(self, batch: Any, step: int) -> torch.Tensor:
        from metaham.qh9.train import matrix_loss

        k = step % len(self.batches)
        b = self.batches[k]
        prediction = self.model(b.z, b.pos, b.batch, b.ptr)
        return self.weights[k] * matrix_loss(prediction, self.targets[k], "mae+mse", self.model.output_scale)


class _MetaStep:
    """The meta half's step (second-order MAML on a shard of the meta-batch) as a :class:`~metaham.train.loop.Job`."""

    name, failure_hint = "meta", ""

    def __init__(self, model: dict, shards: list[list], global_batch: int, world: World) -> None:
        from metaham.hamiltonian import HamiltonianGNN
        from metaham.meta import MAML

        torch.manual_seed(0)
        self.maml = MAML(HamiltonianGNN(**model), inner_lr=0.1)
        self.shards, self.sizes = shards, [len(tasks) for tasks in shards]
        self.weights = [shard_weight(n, global_batch, world) for n in self.sizes]
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr=1e-3)
        self.schedulers: list = []

    def parameters(self):
        return self.maml.parameters()

    def loss(self, batch: Any, step: int) -> torch.Tensor:
        k = step % len(self.shards)
        return self.weights[k] * self.maml.meta_loss(self.shards[k])
