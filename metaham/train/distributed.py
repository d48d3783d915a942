"""Data parallelism on torch.distributed: who this process is among the ranks torchrun started, and the few
collectives both halves need, each a no-op when there is one process.

Why one module: both training halves shard each batch and average loss and gradients through
:meth:`World.average_gradients` (the engine's one reduction point), evaluation shards molecules and gathers
their scores. All of them need the same rank arithmetic and the same behaviour when a peer dies, so code
written once runs unchanged under plain ``metaham ...`` (one process, nothing initialised) and under
``torchrun --nproc_per_node N -m metaham ...``.

Backends: gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).

Failure: gloo raises a plain ``RuntimeError`` from a collective when a peer's socket closes (a rank that exited:
at once, "Connection reset by peer") or when nothing arrives within the process group's timeout (a rank that
hangs: after ``timeout_s``, "Timed out waiting ... for recv"). :func:`collective` turns either into one
:class:`RankFailure` naming the collective and this rank; every helper here runs inside it. The timeout is
``init_world``'s ``timeout_s``, else the environment variable ``METAHAM_DIST_TIMEOUT`` (seconds), else 300 s.
Under torchrun a rank that exits non-zero also makes its node's agent stop that node's other ranks (SIGTERM);
ranks on other nodes, or peers of a rank that exited with status 0, learn of it through :class:`RankFailure`.

Example (``torchrun --standalone --nproc_per_node 2 script.py``, or ``python script.py`` for one process)::

    with open_world("cpu") as world:
        model = wrap_ddp(Net().to(world.device_for("cpu")), world)   # gradients averaged over ranks
        mine = batch[shard_slice(len(batch), world)]                  # rank k takes [start, stop)
        ...
        losses = all_gather_objects(local_losses, world)              # one entry per rank, rank order
        if world.is_main:
            print(sum(losses, []))
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from metaham.text import bar_disabled

TIMEOUT_ENV = "METAHAM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A collective could not complete: a peer rank exited, or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, ``local_rank`` on its node, and the
    process-group ``backend`` (``None`` for a single process, when nothing is initialised). The training engine
    asks it two things: :attr:`is_main` before every write into a run directory (config, checkpoints, logs),
    so that N ranks never race on one file, and :meth:`average_gradients` before each optimizer step."""

    rank: int
    size: int
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def average_gradients(self, parameters: Iterable[torch.Tensor], loss: torch.Tensor) -> float:
        """Make each parameter's ``.grad`` the mean over the ranks and return the mean of ``loss`` over them (the
        training engine calls this between ``backward()`` and the optimizer step; one process already holds both).

        A parameter that has no gradient on some ranks (a shard that does not reach it) counts as zero there,
        and keeps no gradient where no rank has one -- as in one process, where the optimizer then skips it.
        Every rank therefore reduces the same list, and the update matches one process's on the whole batch."""
        return average_step_(list(parameters), loss, self)

    def device_for(self, device: torch.device | str) -> torch.device:
        """The device this rank uses for a resolved ``device``: a bare ``cuda`` means ``cuda:local_rank`` (one GPU
        per rank); ``cpu`` and an explicit ``cuda:N`` stay. ``auto`` is resolved before, by whoever parses it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


SINGLE_PROCESS = World(rank=0, size=1, local_rank=0, backend=None)
_opened: World | None = None  # the world init_world set up: torch keeps no public record of the group's timeout


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is None and TIMEOUT_ENV not in os.environ:
        return DEFAULT_TIMEOUT_S
    text = str(timeout_s) if timeout_s is not None else os.environ[TIMEOUT_ENV]
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        where = "timeout_s" if timeout_s is not None else TIMEOUT_ENV
        raise ValueError(f"{where}={text!r}: expected a finite number of seconds > 0")
    return value


def current_world() -> World:
    """The world of the process group already initialised in this process, else :data:`SINGLE_PROCESS`.

    A process has at most one default group (torch.distributed keeps it globally), so code deep inside a
    command, e.g. :func:`metaham.qh9.evaluate.evaluate_model`, can shard over the ranks its command set up."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    if _opened is not None:
        return _opened
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())


def rank_bar_disabled(progress: bool | None, world: World) -> bool | None:
    """tqdm's ``disable`` for this rank (:func:`metaham.text.bar_disabled`): one bar for a run, rank 0's, since
    N ranks drawing on one terminal would overwrite each other."""
    return True if not world.is_main else bar_disabled(progress)


def _import_group_defaults_first() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated at import. torch imports the module
    lazily (through torch._dynamo, on the first optimizer step or DDP), so imported after ``init_process_group``
    its ten defaults hold the default group for good: ``destroy_process_group`` then cannot free it, gloo's worker
    threads outlive :func:`close_world`, and one that still has to take the GIL to drop the last collective's
    tensors when the interpreter shuts down aborts the process ("terminate called without an active exception",
    SIGABRT after every result was written: about one run in a hundred of tests/train/dist_worker.py
    ``collectives``). Imported first, the defaults are ``None``; freeing the group then joins its threads, with the
    GIL released."""
    import torch.distributed.nn.functional  # noqa: F401  (imported for the side effect above)


def init_world(device: torch.device | str, timeout_s: float | None = None, force: bool = False) -> World:
    """Join the ranks torchrun started, or stay a single process.

    With torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) and
    ``WORLD_SIZE > 1`` (or ``force``, e.g. to try nccl with one rank), initialise the default process group: gloo
    for a CPU ``device``, nccl for CUDA (after ``torch.cuda.set_device(local_rank)``), with ``timeout_s`` (else
    ``METAHAM_DIST_TIMEOUT``, else 300 s) bounding every collective. Otherwise return :data:`SINGLE_PROCESS` and
    initialise nothing. Calling it again returns the world already set up.
    """
    if dist.is_available() and dist.is_initialized():
        return current_world()
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    if not (size > 1 or force):
        return SINGLE_PROCESS
    missing = [name for name in _TORCHRUN_ENV if name not in env]
    if missing:
        raise ValueError(f"a distributed run needs torchrun's environment variables; missing {', '.join(missing)}")
    timeout = _timeout_s(timeout_s)
    local_rank = int(env.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    world = World(int(env["RANK"]), size, local_rank, backend, timeout)
    _import_group_defaults_first()
    with collective("init_process_group", world):
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    global _opened
    _opened = world
    return world


def close_world(world: World) -> None:
    """Leave the process group (safe for a single process, and after a :class:`RankFailure`)."""
    global _opened
    if world.backend is not None and dist.is_initialized():
        dist.destroy_process_group()
        _opened = None


@contextlib.contextmanager
def open_world(device: torch.device | str, timeout_s: float | None = None, force: bool = False) -> Iterator[World]:
    """:func:`init_world` on entry, :func:`close_world` on exit, whatever happens in between."""
    world = init_world(device, timeout_s, force)
    try:
        yield world
    finally:
        close_world(world)


@contextlib.contextmanager
def collective(name: str, world: World) -> Iterator[None]:
    """Run a collective (or code that runs one, like DDP's ``backward``), turning the ``RuntimeError`` a
    backend raises for a dead or silent peer into :class:`RankFailure` naming ``name`` and this rank."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, RankFailure):
            raise
        wait = f"{world.timeout_s:g} s" if world.timeout_s else "the timeout"
        raise RankFailure(
            f"rank {world.rank} of {world.size}: {name} failed: a peer rank exited or did not answer within {wait} "
            f"({type(exc).__name__}: {str(exc).strip()})"
        ) from exc


def shard_slice(n: int, world: World) -> slice:
    """This rank's contiguous part of ``n`` items: rank ``k`` takes ``[start, stop)``, ranks in order, sizes
    differing by at most one (the first ``n % size`` ranks take one more). All of ``range(n)`` for one process."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def balanced_shards(costs: Sequence[float], size: int) -> list[list[int]]:
    """Split items of the given ``costs`` into ``size`` shards of nearly equal total cost: the positions each
    rank takes (rank ``k``: entry ``k``), each list in increasing order.

    A data-parallel step lasts as long as its slowest rank, and molecules differ several-fold in cost, so
    contiguous shards of a shuffled batch leave ranks waiting on each other. Greedy longest-first: each item,
    costliest first (ties by position), goes to the rank with the least cost so far (ties: fewer items, then
    the lower rank). A function of ``costs`` alone, so every rank computes the same split without talking.
    With at least ``size`` items of positive cost every rank gets one at least. One process takes all."""
    shards: list[list[int]] = [[] for _ in range(size)]
    loads = [0.0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(size), key=lambda r: (loads[r], len(shards[r]), r))
        shards[k].append(i)
        loads[k] += costs[i]
    return [sorted(shard) for shard in shards]


def all_reduce_mean_(tensors: Sequence[torch.Tensor | None], world: World) -> None:
    """Average floating-point ``tensors`` over the ranks, in place (``None`` entries, e.g. parameters without a
    gradient, are skipped). Tensors of one dtype and device travel in one flat buffer: one collective, not one
    per tensor, which matters for the many small tensors of a meta-gradient."""
    if not world.distributed:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        with collective("all_reduce", world):
            dist.all_reduce(flat)
        flat /= world.size
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.detach().copy_(part.view_as(t))


def average_step_(parameters: Sequence[torch.Tensor], loss: torch.Tensor, world: World) -> float:
    """:meth:`World.average_gradients`: two collectives, one for the loss and which parameters have a gradient
    somewhere, one (per dtype) for the gradients themselves."""
    value = float(loss.detach())
    if not world.distributed:
        return value
    device = parameters[0].device if parameters else loss.device
    head = torch.tensor([value] + [float(p.grad is not None) for p in parameters], dtype=torch.float64, device=device)
    with collective("all_reduce", world):
        dist.all_reduce(head)
    for p, somewhere in zip(parameters, head[1:].tolist()):
        if somewhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in parameters], world)
    return float(head[0]) / world.size


def shard_weight(local: int, total: int, world: World) -> float:
    """The factor of a rank's mean loss over ``local`` of a batch's ``total`` items such that the mean over ranks
    of the weighted losses (what :meth:`World.average_gradients` forms) is the mean over all ``total`` items:
    shards of unequal size (a batch of 3 on 2 ranks) must not average as equals."""
    return local * world.size / total


def broadcast_(tensors: Sequence[torch.Tensor], world: World, src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, in place."""
    if not world.distributed:
        return
    with collective("broadcast", world):
        for t in tensors:
            dist.broadcast(t.detach(), src)


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    with collective("all_gather_object", world):
        dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, world: World, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable ``obj`` in rank order on rank ``dst`` only (``None`` elsewhere): for large results,
    e.g. predicted matrices, that only the writing rank needs."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.rank == dst else None
    with collective("gather_object", world):
        dist.gather_object(obj, out, dst)
    return out


def barrier(world: World) -> None:
    """Wait until every rank gets here (bounded by the timeout)."""
    if world.distributed:
        with collective("barrier", world):
            dist.barrier()


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (its gradients are then averaged over
    ranks during ``backward``; run that inside :func:`collective` to get :class:`RankFailure`), else ``model``.
    Construction broadcasts rank 0's parameters, so every rank starts from the same weights."""
    if not world.distributed:
        return model
    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    with collective("DistributedDataParallel", world):
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
