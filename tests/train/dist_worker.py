"""One rank of the distributed tests, started by torchrun: ``dist_worker.py SCENARIO OUT_DIR``.

Each scenario writes what this rank saw to ``OUT_DIR/rank<R>.json`` for tests/train/test_distributed.py to check.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from metaham.train.distributed import (
    RankFailure,
    all_gather_objects,
    all_reduce_mean_,
    barrier,
    broadcast_,
    current_world,
    gather_objects,
    open_world,
    shard_slice,
    shard_weight,
    wrap_ddp,
)

STEPS, BATCH, LR = 20, 16, 0.1


def regression_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small float64 network and one fixed batch, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    return model, x, y


def sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, list]:
    """``STEPS`` plain SGD steps on the mean squared error of ``(x, y)``; the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    module = getattr(model, "module", model)
    return {k: v.tolist() for k, v in module.state_dict().items()}


def collectives(world) -> dict:
    mean = [torch.full((2, 3), float(world.rank + 1), dtype=torch.float64), None, torch.tensor([world.rank * 2.0])]
    all_reduce_mean_(mean, world)
    shared = torch.tensor([float(world.rank) + 10.0])
    broadcast_([shared], world, src=1)
    barrier(world)
    # The engine's reduction: `reached` has a gradient on rank 0 only, `unreached` on no rank.
    reached, unreached = (torch.zeros(2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if world.rank == 0:
        reached.grad = torch.tensor([4.0, -2.0], dtype=torch.float64)
    loss = world.average_gradients([reached, unreached], torch.tensor(float(world.rank + 1)))
    model, x, y = regression_problem()
    mine = shard_slice(BATCH, world)
    return {
        "step": [loss, reached.grad.tolist(), unreached.grad],
        "weights": {n: shard_weight(n, 5, world) for n in (2, 3)},
        "world": [world.rank, world.size, world.local_rank, world.backend, world.timeout_s],
        "current": [*current_world().__dict__.values()],
        "shards": {n: [shard_slice(n, world).start, shard_slice(n, world).stop] for n in (0, 1, 5, 7, 8)},
        "mean": [mean[0].tolist(), mean[2].tolist()],
        "broadcast": shared.tolist(),
        "gathered": all_gather_objects({"rank": world.rank}, world),
        "gathered_at_0": gather_objects(world.rank * 3, world),
        "ddp": sgd(wrap_ddp(model, world), x[mine], y[mine]),
    }


def peer_lost(world, how: str) -> dict:
    """Rank 1 leaves after one all-reduce (``exit``: the process ends; ``stall``: it stops answering); rank 0
    then all-reduces again and reports what it got, and how long it waited."""
    t = [torch.ones(3)]
    all_reduce_mean_(t, world)
    if world.rank == 1:
        if how == "stall":
            time.sleep(60)
        os._exit(0)
    start = time.monotonic()
    try:
        all_reduce_mean_(t, world)
    except RankFailure as exc:
        return {"error": str(exc), "type": type(exc).__name__, "seconds": time.monotonic() - start}
    return {"error": None}


def threads() -> int:
    """The number of threads of this process (Linux)."""
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    if scenario in ("exit", "stall"):
        with open_world("cpu", timeout_s=float(os.environ["TEST_TIMEOUT_S"])) as world:  # closes after a failure too
            result = peer_lost(world, scenario)
    else:
        before = threads()
        with open_world("cpu", timeout_s=30) as world:
            result = collectives(world) if scenario == "collectives" else {"world": [world.rank, world.size]}
        result["threads"] = [before, threads()]
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))
    sys.exit(3 if result.get("error") else 0)


if __name__ == "__main__":
    main()
