"""The one training engine both halves plug into.

* :mod:`~metaham.train.config` -- configs validated against a schema of defaults; shipped configs by name.
* :mod:`~metaham.train.run` -- the run directory: saved config, the rules of ``--resume``, the one writer.
* :mod:`~metaham.train.checkpoint` -- atomic ``weights_only`` checkpoints; building and restoring their state.
* :mod:`~metaham.train.log` -- the CSV log with its TensorBoard mirror; :func:`read_log`.
* :mod:`~metaham.train.device` -- device and thread selection.
* :mod:`~metaham.train.distributed` -- the processes of a run (one, or the ranks torchrun started) and their collectives.
* :mod:`~metaham.train.loop` -- the step loop: optimizer step, progress bar, checkpoints, clock, exact resume.
"""
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import ConfigError, load_config

__all__ = ["ConfigError", "atomic_write_bytes", "load_checkpoint", "load_config", "save_checkpoint"]
