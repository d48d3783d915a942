"""Atomic file output: a file is either its old self or completely new, never half-written.

Every writer of results (checkpoints, configs, data files, figures) goes through :func:`atomic_output`: the
content goes to a temporary file in the destination's folder (same file system, so the rename is atomic), is
flushed to disk, and is renamed over the destination only when complete. An interrupted job leaves the previous
file intact; the temporary file a killed writer left behind is removed by the next write of the same file. A
rewritten file keeps its permission bits. :func:`check_output` refuses an unusable location before the work
that produces the file starts.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from glob import escape as glob_escape
from collections.abc import Iterator
from pathlib import Path

from metaham.errors import UserError


class OutputError(UserError):
    """An output location that cannot be written (the message names the flag, the path and why)."""


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output(path: str | os.PathLike, name: str = "output", folder: bool = False) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written as a file (a folder with ``folder=True``).

    Checks without creating anything: ``path`` is not the wrong kind of thing (a folder where a file goes, or
    the reverse), its nearest existing ancestor is a folder (not a regular file) and is writable. ``name`` is
    how the user gave the path (e.g. ``"--out"``), for the message.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise OutputError(f"{name} {path}: is {kind}; expected {'a folder' if folder else 'a file name'}")
    # The folder the file (or the new folder) goes into: what must exist as a folder, or be creatable.
    ancestor = path if folder and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{name} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{name} {path}: {ancestor} is not writable")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    The temporary file keeps ``path``'s suffix (writers such as matplotlib pick the format from it) and gets
    ``path``'s permissions where it exists, else those an ordinary ``open(path, "w")`` would (``mkstemp`` alone
    makes files private, 0600). On any exception the temporary file is removed and ``path`` is left as it was.

    Example::

        with atomic_output("runs/a/result.npz") as tmp:
            np.savez(tmp, x=x)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name}.", path.suffix or ".tmp"
    # A writer killed between mkstemp and the rename (kill -9, power loss) leaves its temporary file: only this
    # module makes names of this shape, and one file has one writer at a time, so any such file is stale.
    for stale in path.parent.glob(f"{glob_escape(prefix)}*{glob_escape(suffix)}"):
        stale.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as exc:  # name the file the user asked for, not the temporary one that could not be made
        raise OutputError(f"{path}: cannot create a file in {path.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush the content to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)  # after the flush: the mode may be read-only
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
