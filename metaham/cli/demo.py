"""``metaham demo``: the main job on built-in defaults, as a user would run it, one command at a time.

The demo is a script over the public command line: every step prints the exact ``metaham`` command it runs,
so a user can copy it. Each step's JSON line feeds the final tables.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ._common import UsageError, add_json_flag, emit, table

HELP = "run the main job on built-in defaults: simulate every system, meta-train and adapt, a small QH9 run"
EXAMPLES = """
  metaham demo                       everything, outputs under demo_out/
  metaham demo --only systems        just the simulations and the energy-drift table
  metaham demo --only meta,qh9 --out /tmp/demo
"""
PARTS = ("systems", "meta", "qh9")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for every output (default: demo_out)")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts to run, from {', '.join(PARTS)} (default: all)"
    )
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"--only {args.only!r}: unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summaries, result = [], {"out": str(out)}
    for part in parts:
        t0 = time.perf_counter()
        summary, result[part] = {"systems": _systems, "meta": _meta, "qh9": _qh9}[part](out)
        result[part]["seconds"] = round(time.perf_counter() - t0, 1)
        summaries.append(summary)
    result["seconds"] = round(time.perf_counter() - started, 1)
    summaries.append(f"demo finished in {result['seconds']:.0f} s; outputs in {out}/")
    return emit(args, "\n\n".join(summaries), result)


def _metaham(*argv: str) -> dict:
    """Run one ``metaham`` command as a user would, echoing it; return its JSON result."""
    cmd = ["metaham", *argv, "--json"]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "metaham", *argv, "--json"], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.rstrip("\n").splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def _systems(out: Path) -> tuple[str, dict]:
    """Simulate every registered system with its default integrator; plot it; tabulate the energy drift."""
    listing = _metaham("systems")
    rows, entries = [], {}
    for info in listing["systems"]:
        name = info["name"]
        res = _metaham(
            "simulate", "--system", name, "--n-traj", "16", "--seed", "0",
            "--out", str(out / f"simulate_{name}.npz"), "--plot", str(out / f"simulate_{name}.png"),
        )
        entries[name] = res
        rows.append([name, info["particles"], res["integrator"], res["n_traj"], res["energy_rel_drift_max"]])
    summary = "Energy drift of every system (max over trajectories and time of |H(t) - H(0)| / |H(0)|):\n"
    summary += table(rows, ["system", "particles", "integrator", "trajectories", "max rel. energy drift"])
    return summary, {"simulations": entries}
