"""glibc's malloc set up for tensor work: large tensors are served from the heap, not from fresh pages.

By default glibc hands every allocation above a small threshold (128 KiB, raised only as such blocks are
freed) to ``mmap`` and gives it back to the kernel on ``free``; memory freed at the top of the heap is also
returned as soon as 128 KiB of it is free. A CPU forward pass allocates and frees tensors of several MiB
hundreds of times, so each new one lands on pages the kernel must map and zero again: evaluating the QH9
model at one thread, its forward pass got about a sixth faster without that work (docs/benchmarks.md, "The
CPU allocator"). :func:`tune_cpu_allocator` raises both thresholds, as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` would (or as jemalloc / tcmalloc would do by design): blocks up to 32 MiB (glibc's
largest threshold) come from the heap, and up to 256 MiB of freed heap stays mapped for reuse. The price is a
resident size that does not shrink below the run's peak use by more than that.

Every ``metaham`` command calls it once at start-up; ``METAHAM_MALLOC=default`` keeps glibc's defaults
(``tuned``, or unset, raises them; any other value is a :class:`~metaham.errors.UsageError`). On other C
libraries (macOS, musl) it does nothing.

>>> from metaham.allocator import tune_cpu_allocator
>>> tune_cpu_allocator()  # doctest: +SKIP
'glibc: mmap threshold 32 MiB, trim threshold 256 MiB'
"""
from __future__ import annotations

import ctypes
import os

from metaham.errors import UsageError

MIB = 1 << 20
MMAP_THRESHOLD = 32 * MIB  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 256 * MIB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
ENV = "METAHAM_MALLOC"

_state = "default"


def tune_cpu_allocator() -> str:
    """Raise glibc's mmap and trim thresholds (see the module docstring) unless ``METAHAM_MALLOC=default``.

    Returns the allocator's state as :func:`allocator_state` reports it. Calling it again changes nothing.
    :class:`~metaham.errors.UsageError` for a value of ``METAHAM_MALLOC`` other than ``default`` or ``tuned``.
    """
    global _state
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "tuned", "default"):
        raise UsageError(f"{ENV}={os.environ[ENV]!r}: expected 'default' (glibc's own malloc thresholds) or 'tuned'")
    if choice == "default":
        return _state
    libc = _glibc()
    if libc is None:
        return _state
    # Setting either turns off glibc's dynamic thresholds, so both are set: the mmap threshold alone would
    # leave the trim threshold at 128 KiB and make things worse.
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        _state = f"glibc: mmap threshold {MMAP_THRESHOLD // MIB} MiB, trim threshold {TRIM_THRESHOLD // MIB} MiB"
    return _state


def allocator_state() -> str:
    """``"default"`` or what :func:`tune_cpu_allocator` set in this process (benchmarks report it)."""
    return _state


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, its C library's among them
    except (OSError, TypeError):  # TypeError: Windows, which has no "this process" handle
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc: its malloc has its own policy (and no such knobs)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
