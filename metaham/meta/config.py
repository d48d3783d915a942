"""The meta-training config and what it builds: schema and validation, the split, the model, the learners.

A run is configured by one YAML file validated against :data:`SCHEMA` (unknown keys and wrong types are
:class:`~metaham.train.ConfigError` that name the key)::

    split: leave_pendulum        # a split of configs/splits/, a YAML path, or an inline split mapping
    data_seed: 0                 # seeds the simulated task pools (kept apart from train.seed: pools are cached)
    tasks: {...}                 # tasks.TaskConfig fields (K, trajectories, ground-truth integrator, dtype)
    model: {backbone: gcn, hidden: 64, layers: 2, options: {}}   # HamiltonianGNN arguments
    maml: {inner_lr: 0.3, inner_steps: 1, first_order: false, anil: false, meta_sgd: false}
    train: {outer_steps, meta_batch, lr, loss, task_scale, seed, pretrain, checkpoint_every, log_every, validate_*,
            sparsity: {random_steps: 300, adaptive_steps: 300}}
    device: auto
    threads: 1

The loop that trains with it is :mod:`metaham.meta.training`; :mod:`metaham.meta.evaluate` rebuilds the
trained models from the same functions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from metaham.hamiltonian import HamiltonianGNN, backbone_names
from metaham.hamiltonian.backbones import current_name
from metaham.nn import SparseTensorProduct, SparsityScheduler
from metaham.train import ConfigError, load_config
from metaham.train.run import RunSpec
from metaham.train.run import saved_config as _saved_config
from tasks import Split, TaskConfig, load_split

from .batching import TASK_SCALES
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
        # Each task's units in the inner loop, the outer loop, validation and adaptation
        # (metaham.meta.batching.task_units): none; support_rms (the field in units of its support-set RMS);
        # support_state (q, p and the field each in units of their support-set RMS; the default, chosen on
        # held-in systems: docs/meta-learning.md).
        "task_scale": "support_state",
        "seed": 0,
        "pretrain": True,
        "checkpoint_every": 250,
        "log_every": 10,
        "validate_every": 500,
        "validate_tasks": 12,
        "validate_steps": 10,
        # The three-phase schedule of the backbone's sparse tensor-product gates, in outer steps: used only when
        # a gate drops paths (model.options.tp_sparsity > 0); random, then adaptive, then fixed.
        "sparsity": {"random_steps": 300, "adaptive_steps": 300},
    },
    "device": "auto",
    "threads": 1,
}

# Keys that may change when a run is resumed: they change neither the data, the model nor the updates.
RESUMABLE = frozenset(
    {"train.outer_steps", "train.checkpoint_every", "train.log_every", "train.validate_every", "train.pretrain",
     "device", "threads"}
)


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
    if current_name(model["backbone"]) not in backbone_names():
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
    for key, steps in train_["sparsity"].items():
        _require(steps >= 0, source, f"train.sparsity.{key}", ">= 0 (outer steps)", steps)
    if train_["loss"] not in LOSSES:
        raise ConfigError(f"{source}: key 'train.loss' must be one of {', '.join(LOSSES)}, got {train_['loss']!r}")
    if train_["task_scale"] not in TASK_SCALES:
        raise ConfigError(f"{source}: key 'train.task_scale' must be one of {', '.join(TASK_SCALES)}, "
                          f"got {train_['task_scale']!r}")
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
    """The training loss of a task (``train.loss``), used by the inner and outer loops alike."""
    return VectorFieldLoss(config["train"]["loss"])


def sparsity_scheduler(model: HamiltonianGNN, config: Mapping[str, Any]) -> SparsityScheduler | None:
    """The scheduler of ``model``'s sparse tensor-product gates with the phases of ``train.sparsity`` (counted in
    outer steps), or ``None`` when no gate drops paths (``model.options.tp_sparsity`` 0, or a backbone without
    gates): a gate left undriven would stay in its random phase for the whole run."""
    if not any(isinstance(m, SparseTensorProduct) and m.sparsity > 0 for m in model.modules()):
        return None
    schedule = config["train"]["sparsity"]
    return SparsityScheduler(model, schedule["random_steps"], schedule["adaptive_steps"])


def make_learner(kind: str, model: HamiltonianGNN, config: Mapping[str, Any]) -> MAML | Pretrain:
    """``MAML`` for ``meta``, ``Pretrain`` for ``pretrained``, with the config's loss and MAML settings."""
    if kind == "meta":
        return MAML(model, task_loss(config), **config["maml"])
    if kind == "pretrained":
        return Pretrain(model, task_loss(config))
    raise ValueError(f"unknown learner {kind!r}; choose one of {', '.join(LEARNERS)}")


# How `metaham meta-train` keeps its run directories (metaham.train.run).
RUN = RunSpec(
    command="metaham meta-train",
    schema=SCHEMA,
    validate=validate_config,
    checkpoint_format=CHECKPOINT_FORMAT,
    checkpoints=tuple(f"{kind}.pt" for kind in LEARNERS),
    resumable=RESUMABLE,
    # An inline split is one value: a changed split is reported as `split`, not as its inner keys.
    whole_keys=frozenset({"split"}),
)


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The validated config saved in a meta-train run directory."""
    return _saved_config(run_dir, RUN)
