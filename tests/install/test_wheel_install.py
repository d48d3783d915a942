"""A regular (non-editable) wheel install finds its default configs and named splits from any directory.

The wheel is built from this checkout and installed with ``pip --target`` into a temporary folder that is put
first on ``PYTHONPATH``; every command then runs in an empty directory, so nothing can be read from the
repository by accident (the first check proves which copy of the package was imported).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Small enough for seconds of work; every other value comes from the shipped configs.
TINY_META = ("tasks.tasks_per_system=6", "tasks.trajectories_per_task=2", "tasks.points_per_trajectory=20",
             "tasks.k_support=10", "tasks.k_query=10", "model.hidden=8", "train.meta_batch=3",
             "train.outer_steps=2", "train.pretrain=false", "train.validate_every=0")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """``{"env": ..., "cwd": ...}`` for running the installed wheel in an empty directory."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and *.egg-info/ beside the sources it builds.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "demo_out", "runs"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    # No build isolation: the build uses this environment's setuptools (a test dependency), so it works offline.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(source)],
                   check=True, capture_output=True)
    wheel = next((base / "dist").glob("metaham-*.whl"))
    target = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    cwd = base / "empty"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "METAHAM_CACHE": str(base / "cache"), "OMP_NUM_THREADS": "1"}
    return {"env": env, "cwd": cwd, "target": target}


def _metaham(installed: dict, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "metaham", *argv, "--json"], cwd=installed["cwd"],
                          env=installed["env"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_installed_copy_is_the_one_imported_and_it_holds_every_shipped_config(installed):
    probe = "import metaham, tasks, systems; print(metaham.__file__); print(tasks.__file__); print(systems.__file__)"
    files = subprocess.run([sys.executable, "-c", probe], cwd=installed["cwd"], env=installed["env"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(f).is_relative_to(installed["target"]) for f in files), files
    listed = _metaham(installed, "config", "list")
    assert Path(listed["directory"]).is_relative_to(installed["target"])
    in_repo = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    in_repo += sorted(f"splits/{p.stem}" for p in (ROOT / "configs" / "splits").glob("*.yaml"))
    assert listed["configs"] == in_repo
    shown = _metaham(installed, "config", "show", "qh9")
    assert shown["yaml"] == (ROOT / "configs" / "qh9.yaml").read_text()


def test_meta_train_runs_on_the_default_config_and_its_named_split(installed):
    sets = [arg for s in TINY_META for arg in ("--set", s)]
    result = _metaham(installed, "meta-train", "--out", "meta_run", "--no-progress", *sets)
    assert result["split"] == "leave_pendulum"  # configs/meta_train.yaml's split, found by name
    assert result["learners"]["meta"]["steps"] == 2
    assert (installed["cwd"] / "meta_run" / "meta.pt").is_file()


def test_qh9_train_runs_on_the_default_config(installed):
    from metaham.qh9 import generate as gen

    data = installed["cwd"] / "h2.db"
    # 10 conformers: the default split (dynamic-geo, 80/10/10 of each molecule's geometries) leaves 1 for val.
    gen.generate(data, gen.g2_molecules(["H2"]), conformers=10, displacement=0.05, progress=False, workers=1)
    result = _metaham(installed, "qh9", "train", "--data", str(data), "--out", "qh9_run", "--set", "train.epochs=1")
    saved = (installed["cwd"] / "qh9_run" / "config.yaml").read_text()
    assert "tp_sparsity: 0.7" in saved  # the shipped configs/qh9.yaml's value
    assert result["epochs"] == 1, result


def test_demo_runs_from_the_installed_package(installed):
    # The systems part (seconds); meta and qh9 read their configs the way the two tests above check.
    result = _metaham(installed, "demo", "--only", "systems", "--out", "demo_run")
    simulated = set(result["systems"]["simulations"])
    assert {"pendulum", "mass_spring", "henon_heiles", "magnetic_mirror"} <= simulated
    assert all((installed["cwd"] / "demo_run" / f"simulate_{name}.png").is_file() for name in simulated)
