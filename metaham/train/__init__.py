"""What every training loop shares: validated configs, atomic checkpoints, logs, seeding."""
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import ConfigError, load_config

__all__ = ["ConfigError", "atomic_write_bytes", "load_checkpoint", "load_config", "save_checkpoint"]
