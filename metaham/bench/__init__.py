"""Benchmarks: ours vs the baseline, side by side in one run, medians over repeats.

Each module here defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> (summary, result)``;
``metaham bench NAME`` runs one and ``metaham bench all`` runs every one. Speed targets live here, never in
unit tests: a benchmark reports measured ratios, and says whether each target was met.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import statistics
import time
from typing import Callable, Iterator


def discover() -> dict:
    """Benchmark modules by name, in alphabetical order."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        out[module.NAME] = module
    return out


@contextlib.contextmanager
def backend_errors(flag: str) -> Iterator[None]:
    """A tensor-product backend that is not installed (ImportError), or cannot run these products (a CUDA kernel
    refusing a shape: NotImplementedError), is a usage error naming the command-line ``flag`` and its value."""
    from metaham.errors import UsageError

    try:
        yield
    except (ImportError, NotImplementedError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``; the previous count is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median times of several functions measured in alternation, so that machine noise hits all alike;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call, so that queued GPU work
    is counted where it was launched."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
