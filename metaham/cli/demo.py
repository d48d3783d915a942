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

from metaham.atomic import check_output
from metaham.errors import UsageError
from metaham.text import table

from ._common import add_json_flag, emit

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
    check_output(out, "--out", folder=True)
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


# A small but real meta-training with mass_spring held out, shrunk to fit a few minutes. (The pendulum is
# a poor demo target: its vector fields are ~25x larger, plain SGD diverged on some of its tasks, see
# docs/results_meta.md.)
_HELD_OUT = "mass_spring"
_META_OVERRIDES = (
    "train.outer_steps=800", "model.hidden=32", "tasks.tasks_per_system=100",
    "train.validate_every=0", "train.checkpoint_every=200",
)


def _meta(out: Path) -> tuple[str, dict]:
    """Meta-train (and pre-train) on pendulum, henon_heiles, magnetic_mirror; adapt to the unseen mass_spring."""
    run_dir = out / "meta_run"
    sets = [arg for o in _META_OVERRIDES for arg in ("--set", o)]
    resume = ["--resume"] if (run_dir / "meta.pt").exists() else []
    trained = _metaham("meta-train", "--config", _config(f"meta_train_leave_{_HELD_OUT}"), *sets, "--out", str(run_dir), *resume)
    adapted = _metaham(
        "adapt", "--checkpoint", str(run_dir), "--system", _HELD_OUT, "--shots", "50", "--steps", "10",
        "--tasks", "10", "--seed", "0", "--plot", str(out / f"adapt_{_HELD_OUT}.png"),
    )
    rows = []
    for name, res in adapted["models"].items():
        curve = res["vf_mse"]
        rows.append([name, curve["0"], curve["1"], curve["5"], curve["10"], res["rollout_rel_err"], res["energy_rel_err"]])
    summary = (
        f"Few-shot adaptation to the held-out {_HELD_OUT} (K = 50 support points, safeguarded SGD, 10 tasks); "
        "query vector-field MSE after n steps:\n"
        + table(rows, ["model", "0 steps", "1", "5", "10", "rollout rel. err", "energy rel. err"])
    )
    return summary, {"meta_train": trained, "adapt": adapted}


def _qh9(out: Path) -> tuple[str, dict]:
    """Generate a few B3LYP/def2-SVP molecules with pyscf, train the sparse model briefly, evaluate it."""
    data = out / "qh9_small.db"
    run_dir = out / "qh9_run"
    generated = _metaham(
        "qh9", "generate", "--out", str(data), "--molecules", "H2O", "NH3", "CH4", "HCN", "CO",
        "--conformers", "8", "--workers", "2", "--seed", "0",
    )
    resume = ["--resume"] if (run_dir / "last.pt").exists() else []
    trained = _metaham(
        "qh9", "train", "--config", _config("qh9"), "--data", str(data), "--out", str(run_dir),
        "--set", "train.max_minutes=1.5", "--set", "data.split_by=stable-id", "--set", "model.random_steps=20", "--set", "model.adaptive_steps=10",
        *resume,
    )
    evaluated = _metaham("qh9", "eval", "--checkpoint", str(run_dir), "--data", str(data), "--split", "test")
    baseline = _metaham("qh9", "baseline", "--data", str(data), "--split", "test", "--split-by", "stable-id")
    rows = [["sparse model", evaluated["n"], evaluated["h_mae_ueh"], evaluated["eps_mae_ueh"], evaluated["psi_cos_pct"]]]
    for name, res in _baseline_rows(baseline):
        rows.append([name, res["n"], res["h_mae_ueh"], res["eps_mae_ueh"], res["psi_cos_pct"]])
    summary = "QH9 metrics on the test split (micro-Hartree; psi in %):\n" + table(
        rows, ["model", "molecules", "H MAE", "eps MAE", "psi cos"]
    )
    return summary, {"generate": generated, "train": trained, "eval": evaluated, "baseline": baseline}


def _baseline_rows(result: dict):
    """(name, metrics) pairs from ``metaham qh9 baseline --json``."""
    for name, res in result.get("baselines", {}).items():
        if isinstance(res, dict) and "h_mae_ueh" in res:
            yield name, res


def _config(name: str) -> str:
    """A shipped config by name (``configs/<name>.yaml``, installed with metaham): the printed command then runs
    from any directory, as the demo does."""
    from metaham.train.config import ConfigError, shipped_config

    try:
        shipped_config(name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return name
