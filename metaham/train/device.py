"""Where a run computes: the device of a config's ``device`` key and torch's CPU thread count."""
from __future__ import annotations

import torch

from .config import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as named.

    :class:`ConfigError` for a spec torch does not parse and for CUDA on a machine without it, so a bad
    ``--device`` fails before any data is read.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r}: expected {DEVICE_CHOICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch's intra-op work; 0 keeps torch's default (all cores)."""
    if n > 0:
        torch.set_num_threads(n)
