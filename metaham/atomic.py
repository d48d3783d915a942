"""Atomic file output: a file is either its old self or completely new, never half-written.

Every writer of results (checkpoints, configs, data files, figures) goes through :func:`atomic_output`: the
content goes to a temporary file in the destination's folder (same file system, so the rename is atomic), is
flushed to disk, and is renamed over the destination only when complete. An interrupted job leaves the previous
file intact; the temporary file a killed writer left behind is removed by the next write of the same file,
while another process writing the same file at the same time (two runs filling one cache) keeps its own. A
rewritten file keeps its permission bits. :func:`check_output` refuses an unusable location before the work
that produces the file starts.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
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
    suffix = path.suffix or ".tmp"
    _remove_stale_temporaries(path, suffix)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.w{os.getpid()}-{_HOST}-", suffix=suffix)
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


# Temporary names carry their writer: ".NAME.w<pid>-<host tag>-<random><suffix>". Two processes may write the same
# file at once (two runs filling one task-pool cache), so a temporary file is stale only when its writer is gone.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_RANDOM = "[a-z0-9_]{8}"  # what mkstemp appends


def _remove_stale_temporaries(path: Path, suffix: str) -> None:
    """Remove the temporary files of ``path`` that a killed writer left (kill -9, power loss): those of a process
    of this machine that no longer runs, and unattributed ones (written before names carried their writer).
    Another live process's file, or another machine's (a shared file system), is left alone."""
    name, tail = re.escape(path.name), re.escape(suffix)
    ours = re.compile(rf"\.{name}\.w(\d+)-([0-9a-f]{{8}})-{_RANDOM}{tail}")
    legacy = re.compile(rf"\.{name}\.{_RANDOM}{tail}")
    for candidate in path.parent.glob(f"{glob_escape(f'.{path.name}.')}*{glob_escape(suffix)}"):
        match = ours.fullmatch(candidate.name)
        if match is not None:
            if match.group(2) != _HOST or _running(int(match.group(1))):
                continue
        elif legacy.fullmatch(candidate.name) is None:
            continue  # not a temporary file of this module
        candidate.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) would terminate the process: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
