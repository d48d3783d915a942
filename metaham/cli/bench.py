"""``metaham bench``: run a benchmark (or all of them) and print its table; ``--json`` for the numbers."""
from __future__ import annotations

import argparse

from ._common import add_json_flag, emit

HELP = "run benchmarks: ours vs the reference approach, median of repeats, measured side by side"
EXAMPLES = """
  metaham bench simulate          batched integrator vs per-trajectory scipy solve_ivp
  metaham bench tp --json         sparse vs dense e3nn tensor product
  metaham bench all               every benchmark, one after the other
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.bench import discover

    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    sub.required = True
    for name, module in discover().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        add_json_flag(p)
        p.set_defaults(_bench=module)
    p = sub.add_parser("all", help="run every benchmark with its defaults")
    add_json_flag(p)
    p.set_defaults(_bench=None)


def run(args: argparse.Namespace) -> int:
    from metaham.allocator import allocator_state
    from metaham.bench import discover

    if args._bench is not None:
        summary, result = args._bench.run(args)
        # Timings depend on malloc's policy (metaham.allocator): say which one they were measured under.
        return emit(args, summary, {**result, "cpu_allocator": allocator_state()})
    results = {}
    for name, module in discover().items():
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        sub_args = p.parse_args([])
        print(f"== bench {name} ==", flush=True)
        summary, result = module.run(sub_args)
        print(summary, flush=True)
        results[name] = {**result, "cpu_allocator": allocator_state()}
    return emit(args, "", results)
