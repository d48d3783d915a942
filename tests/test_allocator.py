"""The CPU allocator set-up: with it, a large block comes from the heap and stays there for reuse once freed;
without it (``METAHAM_MALLOC=default``, or before the call) glibc maps fresh pages for it. Each case runs in a
fresh process, since malloc's settings are global to a process and cannot be put back."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
from metaham.allocator import MIB, allocator_state, tune_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
state = tune_cpu_allocator() if sys.argv[1] == "tune" else allocator_state()
mapped = libc.mallinfo2().hblkhd
block = libc.malloc(24 * MIB)
mapped_for_block = libc.mallinfo2().hblkhd - mapped
libc.free(block)
print(json.dumps({"state": state, "mapped_mib": mapped_for_block / MIB, "free_heap_mib": libc.mallinfo2().fordblks / MIB}))
"""


def _probe(mode: str, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc >= 2.33 only (mallinfo2)",
)


@glibc
def test_tuned_malloc_serves_large_blocks_from_the_heap_and_keeps_them():
    tuned = _probe("tune", METAHAM_MALLOC="")
    assert tuned["state"] == "glibc: mmap threshold 32 MiB, trim threshold 256 MiB"
    assert tuned["mapped_mib"] == 0  # from the heap, not a fresh mapping
    assert tuned["free_heap_mib"] >= 24  # freed, but kept for the next tensor instead of given back


@glibc
def test_default_malloc_maps_large_blocks_and_the_opt_out_keeps_it():
    for mode, env in (("leave", ""), ("tune", "default")):
        default = _probe(mode, METAHAM_MALLOC=env)
        assert default["state"] == "default"
        assert default["mapped_mib"] >= 24  # glibc's own policy: a fresh mapping, unmapped on free
        assert default["free_heap_mib"] < 24
