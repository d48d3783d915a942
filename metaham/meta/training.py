"""Meta-training: one loop that trains the meta-learner (MAML) and the pre-trained baseline alike.

A run is configured by one YAML file validated against :data:`SCHEMA` (unknown keys and wrong types are
:class:`~metaham.train.ConfigError` that name the key)::

    split: leave_pendulum        # a split of configs/splits/, a YAML path, or an inline split mapping
    data_seed: 0                 # seeds the simulated task pools (kept apart from train.seed: pools are cached)
    tasks: {...}                 # tasks.TaskConfig fields (K, trajectories, ground-truth integrator, dtype)
    model: {backbone: gcn, hidden: 64, layers: 2, options: {}}   # HamiltonianGNN arguments
    maml: {inner_lr: 0.3, inner_steps: 1, first_order: false, anil: false, meta_sgd: false}
    train: {outer_steps, meta_batch, lr, loss, seed, pretrain, checkpoint_every, log_every, validate_*}
    device: auto
    threads: 1

:func:`train` trains the learners ``meta`` (``MAML.meta_loss``) and, unless ``train.pretrain`` is false,
``pretrained`` (``Pretrain.meta_loss``) one after the other, from the same initialisation, on the same
meta-batches (batch ``b`` depends only on ``(train.seed, b)``), with the same Adam optimizer and number of
outer steps: the fair comparison of Song and Jeong (ICLR 2024).

A run directory holds::

    config.yaml                  the resolved config (what --resume and `metaham adapt` read)
    meta.pt, pretrained.pt       checkpoints: plain dicts loadable with weights_only=True, rewritten atomically
                                 every train.checkpoint_every steps and at the end (model, Adam state, Meta-SGD
                                 rates, step, config, RNG state)
    meta.csv, pretrained.csv     the training log (step, mean outer loss, seconds, held-in validation MSE)
    tensorboard/                 the same curves, when tensorboard is installed

Resuming reloads the checkpoint and continues with the next meta-batch, so a resumed run is identical to an
uninterrupted one. The held-in validation (optional) adapts on tasks of the *training* systems drawn from
fresh pools (never the held-out system), so hyper-parameters can be chosen without looking at it.
"""
from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from tqdm.auto import tqdm

from metaham.hamiltonian import HamiltonianGNN, backbone_names
from metaham.train import ConfigError, atomic_write_bytes, load_checkpoint, load_config, save_checkpoint
from metaham.train.config import CONFIG_FILE, load_saved_config
from tasks import Split, Task, TaskConfig, TaskDistribution, load_split
from tasks.cache import derive_seed

from .adapt import adapt_tasks
from .batching import to_meta_tasks
from .losses import LOSSES, VectorFieldLoss
from .maml import MAML
from .pretrain import Pretrain

LEARNERS = ("meta", "pretrained")
DEFAULT_CONFIG = "meta_train"  # the shipped configs/meta_train.yaml (see metaham.train.config.shipped_config)
CHECKPOINT_FORMAT = "metaham-meta-train"

SCHEMA: dict[str, Any] = {
    "split": None,  # a name, a path or a mapping: checked by _resolve_split
    "data_seed": 0,
    "tasks": TaskConfig.schema(),
    "model": {"backbone": "gcn", "hidden": 64, "layers": 2, "options": None},
    "maml": {"inner_lr": 0.3, "inner_steps": 1, "first_order": False, "anil": False, "meta_sgd": False},
    "train": {
        "outer_steps": 3000,
        "meta_batch": 10,
        "lr": 5e-4,
        "loss": "logcosh",
        "seed": 0,
        "pretrain": True,
        "checkpoint_every": 250,
        "log_every": 10,
        "validate_every": 500,
        "validate_tasks": 12,
        "validate_steps": 10,
    },
    "device": "auto",
    "threads": 1,
}

# Keys that may change when a run is resumed: they change neither the data, the model nor the updates.
RESUMABLE = frozenset(
    {"train.outer_steps", "train.checkpoint_every", "train.log_every", "train.validate_every", "train.pretrain",
     "device", "threads"}
)

_CSV_FIELDS = ("step", "loss", "seconds", "val_query_mse")


# -- config --------------------------------------------------------------------------------------------------
def load_meta_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The validated config: :data:`SCHEMA` defaults, the YAML file at ``path``, then ``key=value`` overrides.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types and bad values.
    """
    config = load_config(SCHEMA, path, overrides)
    validate_config(config, source=str(path) if path is not None else "config")
    return config


def validate_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Check the values the schema's types cannot (ranges, names); :class:`ConfigError` names the key."""
    resolve_split(config["split"], source)
    task_config(config)
    model = config["model"]
    if model["backbone"] not in backbone_names():
        raise ConfigError(
            f"{source}: key 'model.backbone': unknown backbone {model['backbone']!r}; known: {', '.join(backbone_names())}"
        )
    if model["options"] is not None and not isinstance(model["options"], Mapping):
        raise ConfigError(f"{source}: key 'model.options' must be a mapping of backbone options, got {model['options']!r}")
    _require(model["hidden"] >= 1, source, "model.hidden", ">= 1", model["hidden"])
    _require(model["layers"] >= 0, source, "model.layers", ">= 0", model["layers"])
    maml, train_ = config["maml"], config["train"]
    _require(math.isfinite(maml["inner_lr"]) and maml["inner_lr"] > 0, source, "maml.inner_lr", "> 0", maml["inner_lr"])
    _require(maml["inner_steps"] >= 1, source, "maml.inner_steps", ">= 1", maml["inner_steps"])
    _require(math.isfinite(train_["lr"]) and train_["lr"] > 0, source, "train.lr", "> 0", train_["lr"])
    for key in ("outer_steps", "meta_batch", "checkpoint_every", "log_every", "validate_tasks", "validate_steps"):
        _require(train_[key] >= 1, source, f"train.{key}", ">= 1", train_[key])
    _require(train_["validate_every"] >= 0, source, "train.validate_every", ">= 0 (0: off)", train_["validate_every"])
    if train_["loss"] not in LOSSES:
        raise ConfigError(f"{source}: key 'train.loss' must be one of {', '.join(LOSSES)}, got {train_['loss']!r}")
    _require(config["threads"] >= 0, source, "threads", ">= 0 (0: torch's default)", config["threads"])
    device = config["device"]
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"{source}: key 'device' must be auto, cpu, cuda or cuda:N, got {device!r}") from None


def _require(ok: bool, source: str, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{source}: key {key!r} must be {rule}, got {value!r}")


def resolve_split(value: Any, source: str = "config") -> Split:
    """The :class:`~tasks.Split` named by the config's ``split`` (name, YAML path or inline mapping)."""
    if value is None:
        raise ConfigError(f"{source}: key 'split' is missing: name a split of configs/splits/ or write one inline")
    if isinstance(value, str):
        try:
            return load_split(value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'split': {exc}") from None
    if isinstance(value, Mapping):
        return Split.from_dict(value, source=f"{source}: key 'split'", default_name="inline")
    raise ConfigError(f"{source}: key 'split' must be a split name or a mapping, got {value!r}")


def task_config(config: Mapping[str, Any]) -> TaskConfig:
    """The config's ``tasks`` section as a validated :class:`~tasks.TaskConfig`."""
    return TaskConfig.from_dict(config["tasks"], source="config: key 'tasks'")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build_model(model_config: Mapping[str, Any]) -> HamiltonianGNN:
    """A fresh :class:`HamiltonianGNN` from the config's ``model`` section (initialised by torch's global RNG)."""
    options = dict(model_config.get("options") or {})
    return HamiltonianGNN(
        backbone=model_config["backbone"], hidden=model_config["hidden"], layers=model_config["layers"], **options
    )


def initial_model(config: Mapping[str, Any], seed: int) -> HamiltonianGNN:
    """The model of the config, initialised from ``seed`` (global RNG untouched), in the tasks' dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config["model"])
    return model.to(task_config(config).torch_dtype)


def task_loss(config: Mapping[str, Any]) -> VectorFieldLoss:
    return VectorFieldLoss(config["train"]["loss"])


def make_learner(kind: str, model: HamiltonianGNN, config: Mapping[str, Any]) -> MAML | Pretrain:
    """``MAML`` for ``meta``, ``Pretrain`` for ``pretrained``, with the config's loss and MAML settings."""
    if kind == "meta":
        return MAML(model, task_loss(config), **config["maml"])
    if kind == "pretrained":
        return Pretrain(model, task_loss(config))
    raise ValueError(f"unknown learner {kind!r}; choose one of {', '.join(LEARNERS)}")


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and key != "split":
            out += differing_keys(va, vb, prefix=f"{name}.")
        elif va != vb:
            out.append(name)
    return out


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass
class LearnerResult:
    """What one learner's training produced."""

    kind: str
    steps: int
    outer_steps: int
    final_loss: float | None
    seconds: float
    checkpoint: Path
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "outer_steps": self.outer_steps,
            "final_loss": self.final_loss,
            "seconds": self.seconds,
            "checkpoint": str(self.checkpoint),
            "resumed_from": self.resumed_from,
        }


def prepare_run(run_dir: str | Path, config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Check ``run_dir`` against ``resume`` and write ``config.yaml``; return the config to train with.

    A fresh run needs a directory without checkpoints. A resumed one needs the saved config, and may differ
    from it only in :data:`RESUMABLE` keys (a :class:`ConfigError` names any other key that changed).
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG_FILE
    existing = [run_dir / f"{kind}.pt" for kind in LEARNERS if (run_dir / f"{kind}.pt").exists()]
    if resume:
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {saved_path} not found; is {run_dir} a meta-train run directory?")
        saved = load_config(SCHEMA, saved_path)
        changed = [key for key in differing_keys(saved, config) if key not in RESUMABLE]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"--resume: key {key!r} differs from the saved run in {saved_path} ({_lookup(saved, key)!r} vs "
                f"{_lookup(config, key)!r}); only {', '.join(sorted(RESUMABLE))} may change when resuming"
            )
    elif existing:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); pass --resume to continue it "
            "or choose another --out"
        )
    atomic_write_bytes(saved_path, yaml.safe_dump(config, sort_keys=False).encode())
    return config


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The validated config saved in a run directory."""
    return load_saved_config(run_dir, SCHEMA, validate_config, 'meta-train')


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def train(
    config: dict[str, Any],
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, LearnerResult]:
    """Meta-train (and pre-train) as ``config`` says, writing checkpoints and logs into ``run_dir``.

    Args:
        config: a validated config (:func:`load_meta_config`).
        run_dir: the run directory (created); see the module docstring for its files.
        resume: continue the run in ``run_dir`` from its checkpoints (learners already finished are skipped).
        progress: show progress bars on stderr (None: only on a terminal).
        cache_dir: where the task pools are cached (default :func:`tasks.default_cache_dir`).

    Returns:
        learner name -> :class:`LearnerResult`.
    """
    run_dir = Path(run_dir)
    config = prepare_run(run_dir, copy.deepcopy(config), resume)
    split = resolve_split(config["split"])
    device = resolve_device(config["device"])
    distribution = split.train_distribution(task_config(config), seed=config["data_seed"], cache_dir=cache_dir,
                                            progress=progress)
    validation = _validation_tasks(config, split, cache_dir, progress)
    kinds = LEARNERS if config["train"]["pretrain"] else LEARNERS[:1]
    return {
        kind: _train_learner(kind, config, split, distribution, validation, run_dir, device, resume, progress)
        for kind in kinds
    }


def _validation_tasks(config, split: Split, cache_dir, progress) -> list[Task]:
    """Held-in validation tasks: the training systems, fresh parameter draws (own pool seed)."""
    n = config["train"]["validate_tasks"]
    if config["train"]["validate_every"] == 0:
        return []
    base = task_config(config).to_dict()
    base.update(tasks_per_system=-(-n // len(split.train_systems)), rollouts_per_task=1)
    distribution = TaskDistribution(
        split.train_systems, TaskConfig(**base), seed=derive_seed("validate", config["data_seed"]),
        param_ranges=split.train_ranges, cache_dir=cache_dir, progress=progress,
    )
    return distribution.sample(n, seed=0)


def _train_learner(
    kind: str,
    config: dict[str, Any],
    split: Split,
    distribution: TaskDistribution,
    validation: list[Task],
    run_dir: Path,
    device: torch.device,
    resume: bool,
    progress: bool | None,
) -> LearnerResult:
    settings = config["train"]
    checkpoint_path = run_dir / f"{kind}.pt"
    # Both learners start from the same initialisation: the comparison isolates the training objective.
    model = initial_model(config, derive_seed("init", settings["seed"])).to(device)
    learner = make_learner(kind, model, config).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=settings["lr"])
    step, seconds = 0, 0.0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        _check_checkpoint(state, checkpoint_path, kind)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        step, seconds = int(state["step"]), float(state["seconds"])
    start, total = step, settings["outer_steps"]
    log = _Log(run_dir, kind, start)
    last_loss: float | None = log.last_loss
    if start == 0 and validation:
        log.write(0, None, 0.0, _validate(learner, validation, config, device))

    def save() -> None:
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": kind,
                "step": step,
                "outer_steps": total,
                "seconds": seconds,
                "model_config": dict(model.config),
                "model": model.state_dict(),
                "learner": learner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "config": config,
                "split": split.to_dict(),
                "adapt": _adapt_protocol(kind, learner, config),
                "last_loss": last_loss,
            },
            checkpoint_path,
        )

    batches = distribution.meta_batches(settings["meta_batch"], derive_seed("meta_batches", settings["seed"]),
                                        start=start, num_batches=max(0, total - start))
    window: list[float] = []
    clock = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=f"{kind:>10}", unit="step", disable=None if progress is None else not progress,
               dynamic_ncols=True, leave=True)
    consistent = True  # the weights, Adam's state and `step` agree (an interrupt may land mid-update)
    try:
        for batch in batches:
            tasks = to_meta_tasks([task.to(device) for task in batch])
            consistent = False
            optimizer.zero_grad(set_to_none=True)
            loss = learner.meta_loss(tasks)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{kind}: the outer loss became {value} at step {step + 1}; lower train.lr or maml.inner_lr"
                )
            loss.backward()
            optimizer.step()
            step += 1
            consistent = True
            window.append(value)
            bar.update(1)
            bar.set_postfix_str(f"loss {sum(window[-20:]) / len(window[-20:]):.4g}", refresh=False)
            validate_now = bool(validation) and step % settings["validate_every"] == 0
            val_loss = _validate(learner, validation, config, device) if validate_now else None
            if step % settings["log_every"] == 0 or step == total or validate_now:
                seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                last_loss = sum(window) / len(window)
                log.write(step, last_loss, seconds, val_loss)
                window = []
            if step % settings["checkpoint_every"] == 0 or step == total:
                seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                save()
    except KeyboardInterrupt:
        # Keep the finished steps: --resume continues from here with the next meta-batch. Mid-update, the last
        # periodic checkpoint stays (saving a half-applied step would break the exact resume).
        if consistent:
            seconds += time.perf_counter() - clock
            save()
        raise
    finally:
        bar.close()
        log.close()
    return LearnerResult(kind, step, total, last_loss, seconds, checkpoint_path, start)


def _adapt_protocol(kind: str, learner: MAML | Pretrain, config: Mapping[str, Any]) -> dict[str, Any]:
    """How to adapt this learner at test time: the inner-loop optimizer it was trained for."""
    protocol: dict[str, Any] = {"lr": config["maml"]["inner_lr"], "names": None, "lrs": None}
    if kind == "meta" and isinstance(learner, MAML) and (config["maml"]["anil"] or learner.inner_lrs is not None):
        protocol["names"] = list(learner.adapted_names)
        if learner.inner_lrs is not None:
            protocol["lrs"] = [lr.detach() for lr in learner.inner_lrs]
    return protocol


def _check_checkpoint(state: Mapping[str, Any], path: Path, kind: str) -> None:
    if state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != kind:
        raise ValueError(f"{path}: not a metaham meta-train checkpoint of the {kind!r} learner")


def _validate(learner, validation: list[Task], config: Mapping[str, Any], device: torch.device) -> float | None:
    """Mean query vector-field MSE of held-in tasks after ``train.validate_steps`` SGD steps at the inner lr."""
    if not validation:
        return None
    model, names, lrs = learner.model, None, config["maml"]["inner_lr"]
    if isinstance(learner, MAML):
        names, lrs = learner.adapted_names, learner.learning_rates()
    steps = config["train"]["validate_steps"]
    outcomes = adapt_tasks(model, to_meta_tasks([task.to(device) for task in validation]), steps=steps, lr=lrs,
                           eval_at=[steps], loss=task_loss(config), metric=VectorFieldLoss("mse"), names=names)
    return sum(o.query_loss[-1] for o in outcomes) / len(outcomes)


class _Log:
    """The CSV log of one learner (and its TensorBoard mirror); on resume, rows past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, kind: str, start: int) -> None:
        self.path = run_dir / f"{kind}.csv"
        rows = _read_rows(self.path) if start > 0 else []
        rows = [r for r in rows if int(r["step"]) <= start]
        losses = [float(r["loss"]) for r in rows if r["loss"]]
        self.last_loss = losses[-1] if losses else None
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=_CSV_FIELDS, lineterminator="\n")
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()
        self._tb = _summary_writer(run_dir / "tensorboard" / kind, start)

    def write(self, step: int, loss: float | None, seconds: float, val_loss: float | None) -> None:
        self._writer.writerow(
            {"step": step, "loss": "" if loss is None else f"{loss:.8g}", "seconds": f"{seconds:.3f}",
             "val_query_mse": "" if val_loss is None else f"{val_loss:.8g}"}
        )
        self._file.flush()
        if self._tb is not None:
            if loss is not None:
                self._tb.add_scalar("loss/outer", loss, step)
            if val_loss is not None:
                self._tb.add_scalar("loss/validation_query_mse", val_loss, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _summary_writer(log_dir: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV log is always written
        return None
    # purge_step drops events a crashed run logged after its last checkpoint.
    return SummaryWriter(str(log_dir), purge_step=start if start > 0 else None)


def read_log(run_dir: str | Path, kind: str) -> list[dict[str, float | None]]:
    """The CSV log of one learner as a list of rows (numbers, or None where a column is empty)."""
    return [
        {k: (float(v) if v else None) for k, v in row.items()} for row in _read_rows(Path(run_dir) / f"{kind}.csv")
    ]

