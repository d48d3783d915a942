"""Training of the QH9 model: its config, loss, learning-rate schedule, and the step it plugs into the engine.

A run is configured by one YAML file validated against :data:`SCHEMA` (every key optional; unknown keys and
wrong types are :class:`~metaham.train.ConfigError` s naming the key)::

    model: {...}        # QH9Model arguments: widths, dense, tp_sparsity, pair_sparsity, random_steps, ...
    data: {split_by: auto, seed: 43, max_train: 0, max_val: 0}
    train: {epochs, batch_size, lr, weight_decay, warmup_steps, decay, min_lr_ratio, clip_norm, loss, seed,
            checkpoint_every, max_minutes, eval_batch_size, eigen_loss, compile}
    device: auto
    threads: 0

:func:`train` fits :class:`~metaham.qh9.model.QH9Model` on the ``train`` part of a QH9 file (QH9's split
``data.split_by``; the data side is :mod:`metaham.qh9.data`), with AdamW (no decay on biases, norms and gate
weights), linear warm-up then cosine or linear decay of the learning rate (a function of the optimizer step,
so a resumed run follows the same schedule), gradient clipping, and one :class:`~metaham.nn.SparsityScheduler`
step per optimizer step. Before the first step :meth:`~metaham.qh9.model.QH9Model.fit_statistics` sets the
per-element reference blocks and the output scale from the training rows. After every epoch the validation H
MAE is measured. The run directory, log, checkpoints, clock and step loop are the engine's
(:mod:`metaham.train`); a trained model is read back and scored by :mod:`metaham.qh9.evaluate`.

A run directory holds::

    config.yaml   the resolved config, with the data file (what --resume and `metaham qh9 eval` read)
    last.pt       checkpoint after the latest epoch (or every train.checkpoint_every steps, when the clock
                  stops the run, on Ctrl-C): model state -- gate phases, kept paths and scheduler step
                  included -- optimizer, progress (with the running epoch's loss sum), RNG states
    best.pt       the checkpoint of the epoch with the lowest validation H MAE
    log.csv       one row per completed epoch (and row 0 before training): epoch, step, lr, train loss (mean
                  over the epoch's batches), validation H MAE (micro-Hartree), phase, seconds
    tensorboard/  the same curves, when tensorboard is installed

Checkpoints are plain dicts loaded with ``weights_only=True``. Resuming continues from ``last.pt`` exactly:
the data order of an epoch depends only on ``(train.seed, epoch)`` and the RNG state is restored, so a resumed
run reproduces an uninterrupted one, log included.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch_geometric.data import Batch

from metaham.errors import UsageError
from metaham.train import ConfigError, load_config
from metaham.train.checkpoint import capture_state, restore_state
from metaham.train.distributed import (
    World, all_gather_objects, balanced_shards, current_world, shard_slice, shard_weight,
)
from metaham.train.log import read_log as _read_log
from metaham.train.loop import Clock, LoopSettings, run_loop
from metaham.train.run import Run, RunSpec, start_run

from .data import batches, epoch_order, make_dataset, open_data, split_positions, split_scheme, step_cost
from .dataset import QH9Dataset, matrices
from .eigen_loss import EigenWeights, batch_eigen_loss
from .model import CHECKPOINT_FORMAT, QH9Model, build_model
from .splits import SCHEMES

DEFAULT_CONFIG = "qh9"  # the shipped configs/qh9.yaml (see metaham.train.config.shipped_config)
LOSSES = ("mae", "mse", "mae+mse")
DECAYS = ("cosine", "linear", "none")

_MODEL_DEFAULTS = {k: v.default for k, v in inspect.signature(QH9Model.__init__).parameters.items() if k != "self"}
# torch.compile backends offered: inductor (generated kernels), cudagraphs (CUDA graph replay), aot_eager and
# eager (tracing only: for debugging, and for tests that must not wait for code generation).
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")
STATISTICS_ROWS = 2000  # training rows (a fixed random subset) that set the reference blocks and output scale

SCHEMA: dict[str, Any] = {
    "model": _MODEL_DEFAULTS,
    "data": {"file": "", "split_by": "auto", "seed": 43, "max_train": 0, "max_val": 0},
    "train": {
        "epochs": 40,
        "batch_size": 8,
        "lr": 2e-3,
        "weight_decay": 1e-5,
        "warmup_steps": 50,
        "decay": "cosine",
        "min_lr_ratio": 0.02,
        "clip_norm": 10.0,
        "loss": "mae+mse",
        "seed": 0,
        "checkpoint_every": 0,
        "max_minutes": 0.0,
        "eval_batch_size": 64,
        # Weights of the eigen-aware terms (metaham.qh9.eigen_loss), added to `loss`; 0: off.
        "eigen_loss": {"alignment": 0.0, "virtual": 0.0, "density": 0.0, "hinge": 0.0},
        # torch.compile backend for the model once its kept paths are fixed; none: eager (docs/benchmarks.md).
        "compile": "none",
    },
    "device": "auto",
    "threads": 0,
}

# May change on --resume: they change neither the model, the data nor the updates made so far.
RESUMABLE = frozenset({"train.epochs", "train.checkpoint_every", "train.max_minutes", "train.eval_batch_size",
                       "device", "threads"})
LOG_FILE = "log.csv"
LOG_FIELDS = ("epoch", "step", "lr", "train_loss", "val_h_mae_ueh", "phase", "seconds")
LOG_TAGS = {"train_loss": "loss/train", "val_h_mae_ueh": "val/h_mae_ueh", "lr": "lr"}


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """:data:`SCHEMA` defaults, then the YAML file at ``path``, then ``key=value`` overrides, validated."""
    config = load_config(SCHEMA, path, overrides)
    validate_config(config, source=str(path) if path is not None else "config")
    return config


def validate_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Check what the schema's types cannot; :class:`ConfigError` names the key."""

    def require(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{source}: key {key!r} must be {what}, got {value!r}")

    t, d = config["train"], config["data"]
    for key in ("epochs", "batch_size", "eval_batch_size"):
        require(t[key] >= 1, f"train.{key}", ">= 1", t[key])
    for key in ("warmup_steps", "checkpoint_every"):
        require(t[key] >= 0, f"train.{key}", ">= 0", t[key])
    require(math.isfinite(t["lr"]) and t["lr"] > 0, "train.lr", "> 0", t["lr"])
    for key in ("weight_decay", "clip_norm", "max_minutes"):
        require(math.isfinite(t[key]) and t[key] >= 0, f"train.{key}", ">= 0", t[key])
    require(0 <= t["min_lr_ratio"] <= 1, "train.min_lr_ratio", "in [0, 1]", t["min_lr_ratio"])
    require(t["loss"] in LOSSES, "train.loss", f"one of {', '.join(LOSSES)}", t["loss"])
    for key, value in t["eigen_loss"].items():
        require(math.isfinite(value) and value >= 0, f"train.eigen_loss.{key}", "a finite number >= 0", value)
    require(t["decay"] in DECAYS, "train.decay", f"one of {', '.join(DECAYS)}", t["decay"])
    backends = ("none", *COMPILE_BACKENDS)
    require(t["compile"] in backends, "train.compile", f"one of {', '.join(backends)}", t["compile"])
    require(d["split_by"] in ("auto", *SCHEMES), "data.split_by", f"auto or one of {', '.join(SCHEMES)}", d["split_by"])
    for key in ("max_train", "max_val"):
        require(d[key] >= 0, f"data.{key}", ">= 0 (0: all rows)", d[key])
    require(config["threads"] >= 0, "threads", ">= 0 (0: torch's default)", config["threads"])
    try:
        build_model(config["model"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: key 'model': {exc}") from None


# How `metaham qh9 train` keeps its run directories (metaham.train.run).
RUN = RunSpec(
    command="metaham qh9 train",
    schema=SCHEMA,
    validate=validate_config,
    checkpoint_format=CHECKPOINT_FORMAT,
    checkpoints=("last.pt", "best.pt"),
    resumable=RESUMABLE,
    resume_needs="last.pt",
)


# -- loss, schedule, validation ----------------------------------------------------------------------------------
@contextlib.contextmanager
def compile_errors(setting: str, backend: str | None) -> Iterator[None]:
    """A failure of torch.compile's backend on the first calls of a compiled model (e.g. inductor finding no C++
    compiler on a CPU) as one :class:`~metaham.errors.UsageError` line naming the setting,
    ``setting.format(backend)`` (``"--compile {}"``, ``"train.compile={}"``), not a traceback of torch's internals."""
    try:
        yield
    except Exception as exc:
        if backend in (None, "none") or not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        hint = (f" (inductor compiles C++ on a CPU: it needs a working compiler, g++ or $CXX; "
                f"{setting.format('aot_eager')} traces without one)" if backend == "inductor" else "")
        raise UsageError(
            f"{setting.format(backend)}: torch.compile failed: {type(exc).__name__}: {lines[0] if lines else ''}{hint}"
        ) from exc


def matrix_loss(predicted: list[torch.Tensor], target: list[torch.Tensor], kind: str, scale: torch.Tensor) -> torch.Tensor:
    """Mean over molecules of the mean entry error of ``(pred - target) / scale``: ``mae``, ``mse`` or their sum."""
    losses = []
    for p, t in zip(predicted, target):
        e = (p - t) / scale
        value = e.abs().mean() if kind != "mse" else e.pow(2).mean()
        if kind == "mae+mse":
            value = value + e.pow(2).mean()
        losses.append(value)
    return torch.stack(losses).mean()


def learning_rate(step: int, total_steps: int, settings: Mapping[str, Any]) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine / linear decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (``none``: constant)."""
    lr, warmup = settings["lr"], settings["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if settings["decay"] == "none":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if settings["decay"] == "cosine" else 1.0 - progress
    floor = settings["min_lr_ratio"]
    return lr * (floor + (1.0 - floor) * shape)


@torch.no_grad()
def validation_mae(model: QH9Model, batches: list[Batch], device: torch.device, world: World | None = None) -> float:
    """QH9's H MAE (mean over molecules of the mean absolute entry error), in micro-Hartree.

    Under several ranks (``world``, default :func:`~metaham.train.distributed.current_world`) each scores whole
    batches of its share and every rank gets the per-molecule errors of all, in the order of one process: the
    same batches, the same mean, so the number does not depend on the ranks. Every rank must call it."""
    world = current_world() if world is None else world
    was_training = model.training
    model.eval()
    errors = []
    for batch in batches[shard_slice(len(batches), world)]:
        batch = copy.copy(batch).to(device)  # PyG's .to moves in place: the kept batches stay where they are
        for p, t in zip(model.predict(batch), matrices(batch, "H")):
            errors.append(float((p - t).abs().mean()))
    model.train(was_training)
    return 1e6 * float(np.mean([e for part in all_gather_objects(errors, world) for e in part]))


# -- the run ---------------------------------------------------------------------------------------------------
def _optimizer(model: QH9Model, settings: Mapping[str, Any]) -> torch.optim.AdamW:
    # No weight decay on vectors: biases, norm scales and the gates' path weights (decay would bias the
    # adaptive phase towards dropping paths).
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)  # one kernel for all tensors
    return torch.optim.AdamW(groups, lr=settings["lr"], fused=fused)


def train(
    config: dict[str, Any], run_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
    trust_pickle: bool = False, world: World | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says (``config["data"]["file"]`` the QH9 file), writing into ``run_dir``.

    Data parallel under torchrun: pass the ``world`` :func:`~metaham.train.distributed.open_world` set up
    (default: :func:`~metaham.train.distributed.current_world`). ``train.batch_size`` stays the global batch:
    every rank reads the same epoch order and takes its contiguous share of each batch; the gradients are
    averaged over the ranks, each rank's loss weighted by its share, so N ranks make the updates of one process.
    Rank 0 alone writes into ``run_dir``.

    Returns:
        ``{"run_dir", "epochs", "steps", "best_epoch", "best_val_h_mae_ueh", "initial_val_h_mae_ueh",
        "last_val_h_mae_ueh", "seconds", "stopped", "phase", "n_train", "n_val", "statistics", "world_size"}``.
    """
    world = current_world() if world is None else world
    with open_data(config["data"]["file"], trust_pickle) as file:
        # The data are checked before the run directory is touched: a refused file leaves nothing behind.
        # A residual model needs each molecule's H_init: where the file has none, pyscf computes it as a row is first read.
        residual = config["model"]["residual"]
        train_set = make_dataset(file, split_positions(file, config["data"], "train"), residual)
        val_set = make_dataset(file, split_positions(file, config["data"], "val"), residual)
        if not len(train_set) or not len(val_set):
            scheme = split_scheme(file, config["data"])
            named = f"auto split ({scheme} here)" if config["data"]["split_by"] == "auto" else f"{scheme} split"
            remedy = "more rows" if scheme == "stable-id" else "more rows, or data.split_by=stable-id"
            raise ConfigError(
                f"{file.path}: the {named} leaves {len(train_set)} training and {len(val_set)} validation rows of "
                f"{len(file)}; both must be non-empty (use {remedy})"
            )
        _check_batches_fill_the_ranks(len(train_set), config["train"]["batch_size"], world)
        run = start_run(run_dir, copy.deepcopy(config), RUN, resume=resume, world=world)
        config, settings = run.config, run.config["train"]
        job = _Epochs(run, train_set, list(batches(val_set, settings["eval_batch_size"])), resume)
        try:
            outcome = run_loop(job, job.loop_settings(progress), start_step=job.progress["step"],
                               seconds=job.progress["seconds"], world=run.world)
        finally:
            job.log.close()
    p = job.progress
    return {
        "run_dir": str(run.path),
        "epochs": outcome.steps // job.steps_per_epoch,
        "steps": outcome.steps,
        "best_epoch": p["best_epoch"],
        "best_val_h_mae_ueh": p["best"],
        "initial_val_h_mae_ueh": p["initial"],
        "last_val_h_mae_ueh": p["last"],
        "seconds": outcome.seconds,
        "stopped": "epochs" if outcome.stopped == "steps" else outcome.stopped,
        "phase": job.model.sparsity.phase,
        "n_train": len(train_set),
        "n_val": len(val_set),
        "statistics": job.statistics,
        "world_size": world.size,
    }


def _check_batches_fill_the_ranks(n_train: int, batch_size: int, world: World) -> None:
    # A rank without molecules would skip the forward pass, and with it the random-phase path draws that keep
    # the ranks' generators (and so their sparse products) in step.
    smallest = min(batch_size, n_train % batch_size or batch_size)
    if smallest < world.size:
        raise ConfigError(
            f"{world.size} ranks need at least {world.size} molecules in every batch; with {n_train} training rows "
            f"and train.batch_size={batch_size} one batch holds {smallest} (choose another train.batch_size)"
        )


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """``log.csv`` of a run as a list of rows (numbers where numeric, None where empty)."""
    return _read_log(Path(run_dir) / LOG_FILE)


class _Shard(NamedTuple):
    """This rank's molecules of one global batch of ``total``."""

    batch: Batch
    total: int


class _Epochs:
    """The QH9 half as a :class:`~metaham.train.loop.Job`: epochs of shuffled molecules, one loss, validation
    and a log row at the end of each epoch, ``best.pt`` beside ``last.pt``."""

    name = "train"
    failure_hint = "lower train.lr"

    def __init__(self, run: Run, train_set: QH9Dataset, val_batches: list[Batch], resume: bool) -> None:
        config, settings = run.config, run.config["train"]
        self.run, self.config, self.settings = run, config, settings
        self.train_set, self.val_batches = train_set, val_batches
        self.steps_per_epoch = math.ceil(len(train_set) / settings["batch_size"])
        # Each molecule's step cost, to give the ranks shards of equal cost (one process takes the whole batch).
        n_atoms = train_set.file.catalog().n_atoms[train_set.positions] if run.world.distributed else None
        self.costs = None if n_atoms is None else step_cost(n_atoms)
        self.total_steps = settings["epochs"] * self.steps_per_epoch
        torch.manual_seed(settings["seed"])
        self.model = build_model(config["model"]).to(run.device)
        self.optimizer = _optimizer(self.model, settings)
        self.schedulers = [self.model.sparsity]  # one scheduler step per optimizer step
        self._compiled = False
        self.recent: collections.deque[float] = collections.deque(maxlen=20)  # the progress bar's loss
        # Everything the loop's position and the log depend on; `loss_sum` / `loss_count` are the running
        # epoch's, so that its log row averages all its batches even when the epoch spans a resume.
        self.progress: dict[str, Any] = {"step": 0, "seconds": 0.0, "best": math.inf, "best_epoch": 0,
                                         "initial": None, "last": None, "loss_sum": 0.0, "loss_count": 0}
        if resume:
            state = run.load("last.pt")
            restore_state(state, self._parts())
            self.progress.update({k: v for k, v in state["progress"].items() if k in self.progress})
            self.statistics = state["statistics"]
        else:
            subset = np.random.RandomState(settings["seed"]).permutation(len(train_set))[:STATISTICS_ROWS]
            self.statistics = self.model.fit_statistics(batches(train_set, settings["eval_batch_size"], subset))
            self.progress["initial"] = validation_mae(self.model, val_batches, run.device, run.world)
        self.log = run.log(LOG_FILE, LOG_FIELDS, keep_through=self.progress["step"] if resume else None,
                           tags=LOG_TAGS, formats={"seconds": ".3f"})
        if not resume:
            self.log.write({"epoch": 0, "step": 0, "val_h_mae_ueh": self.progress["initial"],
                            "phase": self.model.sparsity.phase, "seconds": 0.0})
        self.model.train()

    def loop_settings(self, progress: bool | None) -> LoopSettings:
        s = self.settings
        return LoopSettings(total_steps=self.total_steps, checkpoint_every=s["checkpoint_every"],
                            max_minutes=s["max_minutes"], clip_norm=s["clip_norm"], progress=progress)

    # -- the Job ------------------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def batches(self, step: int) -> Iterator[_Shard]:
        size, first_epoch = self.settings["batch_size"], step // self.steps_per_epoch
        world = self.run.world
        for epoch in range(first_epoch, self.settings["epochs"]):
            # The same order on every rank: it depends on (seed, epoch) only.
            order = epoch_order(len(self.train_set), self.settings["seed"], epoch)
            skip = (step % self.steps_per_epoch) * size if epoch == first_epoch else 0
            for start in range(skip, len(order), size):
                rows = order[start : start + size]
                if self.costs is not None:
                    mine = rows[balanced_shards(self.costs[rows].tolist(), world.size)[world.rank]]
                else:
                    mine = rows
                (batch,) = batches(self.train_set, size, mine)
                yield _Shard(batch.to(self.run.device), len(rows))

    def loss(self, shard: _Shard, step: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.total_steps, self.settings)
        self._compile_when_fixed()
        model, batch = self.model, shard.batch
        with compile_errors("train.compile={}", self.settings["compile"]):
            learned = model(batch.z, batch.pos, batch.batch, batch.ptr)
        loss = matrix_loss(learned, model.target(batch), self.settings["loss"], model.output_scale)
        weights = EigenWeights(**self.settings["eigen_loss"])
        if weights:
            full = [h0.to(h) + h for h0, h in zip(matrices(batch, "H_init"), learned)] if model.residual else learned
            per_atom = [batch.z[a:b] for a, b in zip(batch.ptr[:-1], batch.ptr[1:])]
            positions = [batch.pos[a:b] for a, b in zip(batch.ptr[:-1], batch.ptr[1:])]
            loss = loss + batch_eigen_loss(full, matrices(batch, "H"), per_atom, positions, weights,
                                           model.output_scale)
        # Both terms are means over this shard's molecules: weigh them by the shard's share of the batch.
        return loss * shard_weight(batch.num_graphs, shard.total, self.run.world)

    def _compile_when_fixed(self) -> None:
        """``train.compile``: compile the model in place once its kept paths stop changing (the fixed phase; a
        dense model from the start). The random and adaptive phases choose new paths at every step, values a
        compiled graph is specialised on: a recompilation per step."""
        backend, model = self.settings["compile"], self.model
        if backend == "none" or self._compiled or not (model.dense or model.sparsity.phase == "fixed"):
            return
        if self.run.world.is_main:
            print(f"compiling the model with torch.compile ({backend}): the next steps and the next validation "
                  "take minutes on a CPU, once", file=sys.stderr, flush=True)
        model.compile(dynamic=True, backend=backend)
        self._compiled = True

    def after_step(self, step: int, loss: float, clock: Clock) -> bool:
        p = self.progress
        p["step"] = step
        p["loss_sum"] += loss
        p["loss_count"] += 1
        self.recent.append(loss)
        if step % self.steps_per_epoch:
            return False
        epoch = step // self.steps_per_epoch
        val = validation_mae(self.model, self.val_batches, self.run.device, self.run.world)
        p["seconds"] = clock.seconds()
        self.log.write({"epoch": epoch, "step": step, "lr": self.optimizer.param_groups[0]["lr"],
                        "train_loss": p["loss_sum"] / p["loss_count"], "val_h_mae_ueh": val,
                        "phase": self.model.sparsity.phase, "seconds": p["seconds"]})
        p.update(last=val, loss_sum=0.0, loss_count=0)
        if val < p["best"]:
            p.update(best=val, best_epoch=epoch)
            self.run.save("best.pt", self._checkpoint())
        self.run.save("last.pt", self._checkpoint())
        return True

    def save(self, step: int, seconds: float) -> None:
        self.progress.update(step=step, seconds=seconds)
        self.run.save("last.pt", self._checkpoint())

    def postfix(self) -> str:
        return f"loss {np.mean(self.recent):.4g} {self.model.sparsity.phase}"

    def _parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def _checkpoint(self) -> dict[str, Any]:
        return {**capture_state(self._parts()), "model_config": dict(self.model.config),
                "progress": dict(self.progress), "statistics": self.statistics, "config": self.config}
