"""Atomic file output: a file is either its old self or completely new, never half-written.

Every writer of results (checkpoints, configs, data files, figures) goes through :func:`atomic_output`: the
content goes to a temporary file in the destination's folder (same file system, so the rename is atomic), is
flushed to disk, and is renamed over the destination only when complete. An interrupted job leaves the previous
file intact.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    The temporary file keeps ``path``'s suffix (writers such as matplotlib pick the format from it) and gets
    the permissions an ordinary ``open(path, "w")`` would (``mkstemp`` alone makes files private, 0600).
    On any exception the temporary file is removed and ``path`` is left as it was.

    Example::

        with atomic_output("runs/a/result.npz") as tmp:
            np.savez(tmp, x=x)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:  # flush the content to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
