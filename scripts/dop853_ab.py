"""Time the working tree's batched dop853 against the one of an earlier commit, in one process, alternating.

    OMP_NUM_THREADS=1 python scripts/dop853_ab.py ba6b38b [--n-traj 1000] [--repeats 7] [--json]

For each system at the tolerance `metaham bench simulate` picks for it at 1000 trajectories, both versions
integrate the same trajectories (200 save times on [0, 10], float64); reported are the median times, their
ratio and the largest difference of the saved states. The earlier version is `metaham/integrate.py` as `git
show COMMIT:metaham/integrate.py` prints it, loaded as a module beside the current one (both use the current
`systems`). docs/benchmarks.md ("Where the time goes") quotes it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import metaham.integrate as current
from systems import get as get_system

# The loosest tolerance of the bench's ladder that meets its 1e-7 target at 1000 trajectories (docs/benchmarks.md).
CASES = (("magnetic_mirror", 5e-10), ("pendulum", 5e-10), ("three_body", 2e-11), ("henon_heiles", 1e-8))


def load_integrator(commit: str):
    """``metaham/integrate.py`` of ``commit`` as a module of its own; ``ValueError`` if git cannot show it."""
    source = subprocess.run(["git", "show", f"{commit}:metaham/integrate.py"], capture_output=True, text=True)
    if source.returncode != 0:
        raise ValueError(f"git show {commit}:metaham/integrate.py failed: {source.stderr.strip()}")
    with tempfile.TemporaryDirectory() as folder:  # the module is executed on load, so the file can go after it
        path = Path(folder) / "integrate_before.py"
        path.write_text(source.stdout)
        spec = importlib.util.spec_from_file_location("integrate_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the earlier version (any git revision)")
    parser.add_argument("--n-traj", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        before = load_integrator(args.commit)
    except ValueError as error:
        parser.error(str(error))  # exit 2, no traceback
    t = torch.linspace(0, 10, 200, dtype=torch.float64)
    results = {}
    for name, tol in CASES:
        system = get_system(name)
        generator = torch.Generator().manual_seed(0)
        params = system.sample_params(args.n_traj, generator, dtype=torch.float64)
        q0, p0 = system.sample_initial_state(params, generator)
        times, states = {"before": [], "now": []}, {}
        for _ in range(args.repeats):
            for label, module in (("before", before), ("now", current)):
                start = time.perf_counter()
                states[label] = module.simulate(system, params, q0, p0, t, "dop853", rtol=tol, atol=tol)
                times[label].append(time.perf_counter() - start)
        diff = max(float((a - b).abs().max()) for a, b in zip(states["before"], states["now"]))
        before_s, now_s = statistics.median(times["before"]), statistics.median(times["now"])
        results[name] = {"tol": tol, "before_s": before_s, "now_s": now_s, "speedup": before_s / now_s,
                         "max_state_diff": diff}
        print(f"{name:16s} tol {tol:.0e}  {args.commit}: {1e3 * before_s:7.1f} ms  now: {1e3 * now_s:7.1f} ms  "
              f"x{before_s / now_s:.2f}  max state difference {diff:.1e}", flush=True)
    if args.json:
        print(json.dumps({"commit": args.commit, "n_traj": args.n_traj, "repeats": args.repeats, "systems": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
