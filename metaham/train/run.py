"""The run directory: its saved config, the rules of ``--resume``, and the one place that writes into it.

A training command describes its run directories once, as a :class:`RunSpec`; :func:`start_run` checks the
directory against ``--resume`` (a fresh run needs one without checkpoints; a resumed one may change only the
keys the spec declares resumable, and the error lists every other key that changed), saves ``config.yaml``
atomically, sets the thread count and resolves the device. The :class:`Run` it returns is the only writer of
checkpoints and logs, and writes only where its :class:`~metaham.train.distributed.World` says this process is
the main one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from metaham.atomic import atomic_write_bytes, check_output

from .checkpoint import load_checkpoint, save_checkpoint
from .config import CONFIG_FILE, ConfigError, load_saved_config
from .device import resolve_device, set_threads
from .log import CsvLog
from .distributed import SINGLE_PROCESS, World


@dataclass(frozen=True)
class RunSpec:
    """What a training command says about its run directories.

    Attributes:
        command: the command, as messages name it (``"metaham qh9 train"``).
        schema: the config schema (:func:`~metaham.train.config.load_config`).
        validate: ``validate(config, source=...)``, the command's checks beyond the schema's types.
        checkpoint_format: the ``"format"`` entry of its checkpoints.
        checkpoints: the files whose presence means the directory already holds a run.
        resumable: dotted keys that may change on ``--resume`` (they change neither model, data nor updates).
        resume_needs: a checkpoint ``--resume`` cannot do without (``None``: a missing one starts afresh).
        whole_keys: mappings compared as one value when configs are compared (an inline split).
    """

    command: str
    schema: Mapping[str, Any]
    validate: Callable[..., None]
    checkpoint_format: str
    checkpoints: tuple[str, ...]
    resumable: frozenset[str]
    resume_needs: str | None = None
    whole_keys: frozenset[str] = field(default_factory=frozenset)


def changed_keys(a: Mapping[str, Any], b: Mapping[str, Any], whole: frozenset[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between two nested configs, in sorted order; a key in ``whole``
    is compared as one value rather than entry by entry."""
    return _changed(a, b, whole, "")


def _changed(a: Mapping[str, Any], b: Mapping[str, Any], whole: frozenset[str], prefix: str) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and name not in whole:
            out += _changed(va, vb, whole, f"{name}.")
        elif va != vb:
            out.append(name)
    return out


def saved_config(run_dir: str | Path, spec: RunSpec) -> dict[str, Any]:
    """The validated config saved in ``run_dir`` by a run of ``spec``'s command."""
    return load_saved_config(run_dir, spec.schema, spec.validate, f"`{spec.command}`")


@dataclass
class Run:
    """An open run directory with its config, device and world; all writes into it go through here."""

    path: Path
    spec: RunSpec
    config: dict[str, Any]
    device: torch.device
    world: World = SINGLE_PROCESS

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def load(self, name: str) -> dict[str, Any]:
        """Checkpoint ``name`` of this run, on the run's device; ``ValueError`` for another command's file."""
        state = load_checkpoint(self.path / name, map_location=self.device)
        if state.get("format") != self.spec.checkpoint_format:
            raise ValueError(f"{self.path / name}: not a `{self.spec.command}` checkpoint")
        return state

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Write checkpoint ``name`` (the main process only), tagged with the command's format."""
        if self.world.is_main:
            save_checkpoint({"format": self.spec.checkpoint_format, **state}, self.path / name)

    def log(self, name: str, fields: Sequence[str], *, keep_through: int | None, tags: Mapping[str, str],
            tensorboard: str = "tensorboard", formats: Mapping[str, str] | None = None) -> CsvLog:
        """The CSV log ``name`` (see :class:`~metaham.train.log.CsvLog`), mirrored to ``RUN_DIR/tensorboard``
        (a sub-folder of it where several logs share a run); it writes on the main process only."""
        return CsvLog(self.path / name, fields, keep_through=keep_through, tensorboard=self.path / tensorboard,
                      tags=tags, formats=formats, enabled=self.world.is_main)


def start_run(
    run_dir: str | Path, config: dict[str, Any], spec: RunSpec, *, resume: bool, world: World = SINGLE_PROCESS
) -> Run:
    """Check ``run_dir`` against ``resume``, save ``config`` as its ``config.yaml``, set the thread count
    (``config["threads"]``) and resolve the device (``config["device"]``); :class:`ConfigError` says what
    is wrong."""
    path = Path(run_dir)
    check_output(path, "--out", folder=True)
    if resume:
        _check_resumable(path, config, spec)
    else:
        existing = [name for name in spec.checkpoints if (path / name).exists()]
        if existing:
            raise ConfigError(
                f"{path} already holds a run ({', '.join(existing)}); pass --resume to continue it or choose "
                "another --out"
            )
    device = world.device_for(resolve_device(config["device"]))  # under torchrun: one GPU per rank
    set_threads(config["threads"])
    text = yaml.safe_dump(config, sort_keys=False).encode()
    saved = path / CONFIG_FILE
    # On resume the file changes only where a resumable key did: an unchanged run directory stays untouched.
    if world.is_main and not (resume and saved.is_file() and saved.read_bytes() == text):
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(saved, text)
    return Run(path, spec, config, device, world)


def _check_resumable(path: Path, config: Mapping[str, Any], spec: RunSpec) -> None:
    saved = saved_config(path, spec)
    changed = [key for key in changed_keys(saved, config, spec.whole_keys) if key not in spec.resumable]
    if changed:
        what = "; ".join(f"{key!r}: {_lookup(saved, key)!r} -> {_lookup(config, key)!r}" for key in changed)
        raise ConfigError(
            f"--resume: {len(changed)} key(s) differ from the saved run in {path / CONFIG_FILE} ({what}); only "
            f"{', '.join(sorted(spec.resumable))} may change when resuming"
        )
    if spec.resume_needs and not (path / spec.resume_needs).is_file():
        raise ConfigError(f"--resume: {path / spec.resume_needs} not found; nothing to resume")


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
