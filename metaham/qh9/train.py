"""Training and evaluation of the QH9 model: config, loop, checkpoints, logs.

A run is configured by one YAML file validated against :data:`SCHEMA` (every key optional; unknown keys and
wrong types are :class:`~metaham.train.ConfigError` s naming the key)::

    model: {...}        # QH9Model arguments: widths, dense, tp_sparsity, pair_sparsity, random_steps, ...
    data: {split_by: auto, seed: 43, max_train: 0, max_val: 0}
    train: {epochs, batch_size, lr, weight_decay, warmup_steps, decay, min_lr_ratio, clip_norm, loss, seed,
            checkpoint_every, max_minutes, eval_batch_size}
    device: auto
    threads: 0

:func:`train` fits :class:`~metaham.qh9.model.QH9Model` on the ``train`` part of a QH9 file (QH9's split
``data.split_by``), with AdamW (no decay on biases, norms and gate weights), linear warm-up then cosine or
linear decay of the learning rate (a function of the optimizer step, so a resumed run follows the same
schedule), gradient clipping, and one :class:`~metaham.nn.SparsityScheduler` step per optimizer step.
Before the first step :meth:`~metaham.qh9.model.QH9Model.fit_statistics` sets the per-element reference
blocks and the output scale from the training rows. After every epoch the validation H MAE is measured.

A run directory holds::

    config.yaml   the resolved config, with the data file (what --resume and `metaham qh9 eval` read)
    last.pt       checkpoint after the latest epoch (or every train.checkpoint_every steps): model state --
                  gate phases, kept paths and scheduler step included -- optimizer, epoch, step, RNG state
    best.pt       the checkpoint of the epoch with the lowest validation H MAE
    log.csv       epoch, step, lr, train loss, validation H MAE (micro-Hartree), phase, seconds
    tensorboard/  the same curves, when tensorboard is installed

Checkpoints are plain dicts loaded with ``weights_only=True``. Resuming continues from ``last.pt`` exactly:
the data order of an epoch depends only on ``(train.seed, epoch)`` and the RNG state is restored, so a resumed
run reproduces an uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import functools
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import yaml
from torch_geometric.data import Batch, Data
from tqdm.auto import tqdm

from metaham.train import ConfigError, atomic_write_bytes, load_checkpoint, load_config, save_checkpoint
from metaham.train.config import CONFIG_FILE, load_saved_config

from .basis import normalize_basis
from .dataset import QH9Dataset, matrices
from .formats import QH9File, open_qh9
from .model import QH9Model, build_model
from .splits import SCHEMES, default_scheme, select

CHECKPOINT_FORMAT = "metaham-qh9-model"
DEFAULT_CONFIG = "qh9"  # the shipped configs/qh9.yaml (see metaham.train.config.shipped_config)
LOSSES = ("mae", "mse", "mae+mse")
DECAYS = ("cosine", "linear", "none")

_MODEL_DEFAULTS = {k: v.default for k, v in inspect.signature(QH9Model.__init__).parameters.items() if k != "self"}
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
    },
    "device": "auto",
    "threads": 0,
}

# May change on --resume: they change neither the model, the data nor the updates made so far.
RESUMABLE = frozenset({"train.epochs", "train.checkpoint_every", "train.max_minutes", "train.eval_batch_size",
                       "device", "threads"})
_CSV_FIELDS = ("epoch", "step", "lr", "train_loss", "val_h_mae_ueh", "phase", "seconds")


# -- config ----------------------------------------------------------------------------------------------------
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
    require(t["decay"] in DECAYS, "train.decay", f"one of {', '.join(DECAYS)}", t["decay"])
    require(d["split_by"] in ("auto", *SCHEMES), "data.split_by", f"auto or one of {', '.join(SCHEMES)}", d["split_by"])
    for key in ("max_train", "max_val"):
        require(d[key] >= 0, f"data.{key}", ">= 0 (0: all rows)", d[key])
    require(config["threads"] >= 0, "threads", ">= 0 (0: torch's default)", config["threads"])
    try:
        build_model(config["model"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: key 'model': {exc}") from None


def _changed_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The validated config saved in a run directory."""
    return load_saved_config(run_dir, SCHEMA, validate_config, '`metaham qh9 train`')


def _prepare_run(run_dir: Path, config: dict[str, Any], resume: bool) -> dict[str, Any]:
    if resume:
        saved = saved_config(run_dir)
        changed = [k for k in _changed_keys(saved, config) if k not in RESUMABLE]
        if changed:
            raise ConfigError(
                f"--resume: key {changed[0]!r} differs from the saved run in {run_dir / CONFIG_FILE}; only "
                f"{', '.join(sorted(RESUMABLE))} may change when resuming"
            )
        if not (run_dir / "last.pt").is_file():
            raise ConfigError(f"--resume: {run_dir / 'last.pt'} not found; nothing to resume")
    elif (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    atomic_write_bytes(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
    return config


# -- data ------------------------------------------------------------------------------------------------------
def open_data(path: str | Path, trust_pickle: bool = False) -> QH9File:
    """Open a QH9 file and check that it is def2-SVP (the only layout the model has)."""
    file = open_qh9(path, trust_pickle=trust_pickle)
    basis = file.metadata.get("basis")
    if basis is not None:
        try:
            normalize_basis(str(basis))
        except ValueError as exc:
            file.close()
            raise ValueError(f"{path}: {exc}") from None
    return file


def split_positions(file: QH9File, data: Mapping[str, Any], part: str) -> np.ndarray:
    """File positions of ``part`` (train, val, test, all) under the config's split; ``max_train`` /
    ``max_val`` keep the first rows of a shuffled order (fixed by ``data.seed``)."""
    catalog = file.catalog()
    scheme = default_scheme(catalog) if data["split_by"] == "auto" else data["split_by"]
    positions = select(catalog, part, scheme, data["seed"])
    limit = {"train": data["max_train"], "val": data["max_val"]}.get(part, 0)
    if limit and len(positions) > limit:
        positions = np.sort(np.random.RandomState(data["seed"]).permutation(positions)[:limit])
    return positions


def with_initial_guess(data: Data, cache: dict[int, torch.Tensor], xc: str = "b3lyp5") -> Data:
    """One molecule (a :class:`~metaham.qh9.dataset.QH9Dataset` item) with ``H_init``, the MINAO-guess Fock
    matrix, computed with pyscf where the file has none; kept in ``cache`` by row id (~0.1-2 s per molecule the
    first time). A dataset ``transform``: ``QH9Dataset(file, transform=partial(with_initial_guess, cache=...))``."""
    if "H_init" in data:
        return data
    from .generate import DFTSettings, initial_guess_fock

    row = int(data.id)
    if row not in cache:
        F = initial_guess_fock(data.z.numpy(), data.pos.numpy(), DFTSettings(xc=xc))
        cache[row] = torch.from_numpy(F).reshape(-1)  # flat, as the dataset stores matrices
    data.H_init = cache[row]
    return data


def _batches(dataset: QH9Dataset, batch_size: int, order: np.ndarray | None = None) -> Iterator[Batch]:
    # Not a DataLoader: each of its iterators draws a seed from torch's global generator, whose state a resumed
    # run restores -- the draws would differ between a resumed and an uninterrupted run.
    order = np.arange(len(dataset)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield Batch.from_data_list([dataset[int(i)] for i in order[start : start + batch_size]])


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a function of ``(seed, epoch)`` only, so resuming reproduces it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# -- loss, schedule, validation ----------------------------------------------------------------------------------
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
def validation_mae(model: QH9Model, batches: list[Batch], device: torch.device) -> float:
    """QH9's H MAE (mean over molecules of the mean absolute entry error), in micro-Hartree."""
    was_training = model.training
    model.eval()
    errors = []
    for batch in batches:
        batch = copy.copy(batch).to(device)  # PyG's .to moves in place: the kept batches stay where they are
        for p, t in zip(model.predict(batch), matrices(batch, "H")):
            errors.append(float((p - t).abs().mean()))
    model.train(was_training)
    return 1e6 * float(np.mean(errors))


# -- the run ---------------------------------------------------------------------------------------------------
def _optimizer(model: QH9Model, settings: Mapping[str, Any]) -> torch.optim.AdamW:
    # No weight decay on vectors: biases, norm scales and the gates' path weights (decay would bias the
    # adaptive phase towards dropping paths).
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)  # one kernel for all tensors
    return torch.optim.AdamW(groups, lr=settings["lr"], fused=fused)


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine")
    return device


def train(
    config: dict[str, Any], run_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Train as ``config`` says (``config["data"]["file"]`` the QH9 file), writing into ``run_dir``.

    Returns:
        ``{"run_dir", "epochs", "steps", "best_epoch", "best_val_h_mae_ueh", "initial_val_h_mae_ueh",
        "last_val_h_mae_ueh", "seconds", "stopped", "phase", "n_train", "n_val", "statistics"}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _prepare_run(run_dir, copy.deepcopy(config), resume)
    settings, device = config["train"], _resolve_device(config["device"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    file = open_data(config["data"]["file"], trust_pickle)
    xc = str(file.metadata.get("xc", "b3lyp5"))
    # A residual model needs each molecule's H_init: where the file has none, pyscf computes it as a row is first read.
    prepare = functools.partial(with_initial_guess, cache={}, xc=xc) if config["model"]["residual"] else None
    train_set = QH9Dataset(file, split_positions(file, config["data"], "train"), transform=prepare)
    val_set = QH9Dataset(file, split_positions(file, config["data"], "val"), transform=prepare)
    if not len(train_set) or not len(val_set):
        raise ConfigError(
            f"{file.path}: the {config['data']['split_by']} split leaves {len(train_set)} training and "
            f"{len(val_set)} validation rows; both must be non-empty (use more rows, or data.split_by=stable-id)"
        )
    val_batches = list(_batches(val_set, settings["eval_batch_size"]))

    torch.manual_seed(settings["seed"])
    model = build_model(config["model"]).to(device)
    optimizer = _optimizer(model, settings)
    steps_per_epoch = math.ceil(len(train_set) / settings["batch_size"])
    total_steps = settings["epochs"] * steps_per_epoch
    state = {"epoch": 0, "batch": 0, "step": 0, "seconds": 0.0, "best": math.inf, "best_epoch": 0, "initial": None}
    if resume:
        checkpoint = load_checkpoint(run_dir / "last.pt", map_location=device)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{run_dir / 'last.pt'}: not a metaham QH9 model checkpoint")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        state.update(checkpoint["progress"])
        statistics = checkpoint["statistics"]
    else:
        subset = np.random.RandomState(settings["seed"]).permutation(len(train_set))[:STATISTICS_ROWS]
        statistics = model.fit_statistics(_batches(train_set, settings["eval_batch_size"], subset))
        state["initial"] = validation_mae(model, val_batches, device)
    log = _Log(run_dir, state["step"])
    if not resume:
        log.write(0, 0, None, None, state["initial"], model.sparsity.phase, 0.0)

    def save(path: Path) -> None:
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "model_config": dict(model.config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "progress": dict(state),
                "statistics": statistics,
                "config": config,
            },
            path,
        )

    started = time.perf_counter() - state["seconds"]
    deadline = started + 60.0 * settings["max_minutes"] if settings["max_minutes"] else math.inf
    stopped = "epochs"
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        while state["epoch"] < settings["epochs"]:
            order = _epoch_order(len(train_set), settings["seed"], state["epoch"])
            losses = []
            skip = state["batch"] * settings["batch_size"]
            for batch in _batches(train_set, settings["batch_size"], order[skip:]):
                batch = batch.to(device)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(state["step"], total_steps, settings)
                loss = matrix_loss(model(batch.z, batch.pos, batch.batch, batch.ptr), model.target(batch),
                                   settings["loss"], model.output_scale)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the training loss became {value} at step {state['step'] + 1}; lower train.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings["clip_norm"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip_norm"])
                optimizer.step()
                model.sparsity.step()
                state["step"] += 1
                state["batch"] += 1
                losses.append(value)
                bar.update(1)
                bar.set_postfix_str(f"loss {np.mean(losses[-20:]):.4g} {model.sparsity.phase}", refresh=False)
                if settings["checkpoint_every"] and state["step"] % settings["checkpoint_every"] == 0:
                    state["seconds"] = time.perf_counter() - started
                    save(run_dir / "last.pt")
                if time.perf_counter() > deadline:
                    stopped = "max_minutes"
                    break
            if state["batch"] >= steps_per_epoch:  # the epoch is complete (even if the clock stopped it)
                state["epoch"], state["batch"] = state["epoch"] + 1, 0
                if state["epoch"] >= settings["epochs"]:
                    stopped = "epochs"
            val = validation_mae(model, val_batches, device)
            state["seconds"] = time.perf_counter() - started
            mean_loss = float(np.mean(losses)) if losses else None
            log.write(state["epoch"], state["step"], optimizer.param_groups[0]["lr"], mean_loss, val,
                      model.sparsity.phase, state["seconds"])
            state["last"] = val
            if val < state["best"]:
                state["best"], state["best_epoch"] = val, state["epoch"]
                save(run_dir / "best.pt")
            save(run_dir / "last.pt")
            if stopped != "epochs":
                break
    finally:
        bar.close()
        log.close()
        file.close()
    return {
        "run_dir": str(run_dir),
        "epochs": state["epoch"],
        "steps": state["step"],
        "best_epoch": state["best_epoch"],
        "best_val_h_mae_ueh": state["best"],
        "initial_val_h_mae_ueh": state["initial"],
        "last_val_h_mae_ueh": state.get("last"),
        "seconds": state["seconds"],
        "stopped": stopped,
        "phase": model.sparsity.phase,
        "n_train": len(train_set),
        "n_val": len(val_set),
        "statistics": statistics,
    }


class _Log:
    """``log.csv`` (and its TensorBoard mirror); on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        path = run_dir / "log.csv"
        rows = []
        if start_step and path.is_file():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start_step]
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=_CSV_FIELDS)
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: the CSV log is always written
            self._tb = None
        else:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def write(self, epoch, step, lr, loss, val, phase, seconds) -> None:
        fmt = lambda v: "" if v is None else f"{v:.8g}"  # noqa: E731
        self._writer.writerow({"epoch": epoch, "step": step, "lr": fmt(lr), "train_loss": fmt(loss),
                               "val_h_mae_ueh": fmt(val), "phase": phase, "seconds": f"{seconds:.3f}"})
        self._file.flush()
        if self._tb is not None:
            for name, value in (("loss/train", loss), ("val/h_mae_ueh", val), ("lr", lr)):
                if value is not None:
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """``log.csv`` of a run as a list of rows (numbers where numeric, None where empty)."""
    with (Path(run_dir) / "log.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    def value(key: str, text: str):
        if key == "phase":
            return text
        return None if text == "" else float(text)

    return [{k: value(k, v) for k, v in row.items()} for row in rows]


# -- evaluation --------------------------------------------------------------------------------------------------
def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[QH9Model, dict[str, Any]]:
    """The model of a checkpoint file, or of a run directory (its ``best.pt``, else ``last.pt``), in eval mode;
    returns ``(model, checkpoint dict)``."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a metaham QH9 model checkpoint (from `metaham qh9 train`)")
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    part: str = "test",
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    keep_predictions: bool = False,
    progress: bool = True,
    trust_pickle: bool = False,
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """QH9 metrics of a trained model on ``part`` of ``data`` (default: the training file), split as in training,
    in batches of ``batch_size`` molecules (default: the run's ``train.eval_batch_size``).

    Returns:
        ``(summary, predictions)``: :func:`~metaham.qh9.metrics.summarize`'s keys plus ``part``,
        ``split_by``, ``phase``, ``dense``, ``residual``; predictions ``{row_id: (norb, norb)}`` pyscf order
        when ``keep_predictions``.
    """
    from .evaluate import evaluate_model

    device = torch.device(device)
    model, state = load_model(checkpoint, device)
    config = state["config"]
    data = config["data"]["file"] if data is None else data
    batch_size = batch_size or config["train"]["eval_batch_size"]
    with open_data(data, trust_pickle) as file:
        positions = split_positions(file, {**config["data"], "max_train": 0, "max_val": 0}, part)
        if not len(positions):
            raise ValueError(f"{file.path}: the {part!r} part of the split is empty ({len(file)} rows in all)")
        xc = str(file.metadata.get("xc", "b3lyp5"))
        prepare = functools.partial(with_initial_guess, cache={}, xc=xc) if model.residual else None
        summary, predictions = evaluate_model(
            model.predict, QH9Dataset(file, positions, transform=prepare), batch_size, device,
            keep_predictions=keep_predictions, progress=progress,
        )
        scheme = default_scheme(file.catalog()) if config["data"]["split_by"] == "auto" else config["data"]["split_by"]
    summary.update(part=part, split_by=scheme, data=str(data), phase=model.sparsity.phase, dense=model.dense,
                   residual=model.residual)
    return summary, predictions
