"""Real kill -9 at seeded random moments, then resume: the result equals an uninterrupted run's.

For ``meta-train``, ``qh9 train`` and ``qh9 generate`` the same command runs once to the end (the reference)
and once killed with SIGKILL at a moment drawn from a seeded generator (after the first checkpoint or row
exists, so that there is something to resume), then resumed. Weights, optimizer state, logs and data must
equal the reference exactly: the runs are the same computation on the same machine with one thread, so any
difference is a resume bug, not round-off. No temporary file of an interrupted write may remain.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaham.qh9.generate import g2_molecules, generate

ROOT = Path(__file__).resolve().parents[2]
TINY_META = str(ROOT / "tests" / "meta" / "tiny_meta_train.yaml")
META_SETS = ["train.outer_steps=10", "train.checkpoint_every=1", "train.log_every=1", "train.validate_every=0",
             "train.pretrain=false"]
QH9_SETS = ["model.node_irreps=8x0e+4x1o+4x2e+2x3o+2x4e", "model.layers=2", "model.lmax_sh=2",
            "model.radial_hidden=16", "model.pair_channels=4", "model.head_mul=4", "model.head_hidden=16",
            "model.random_steps=3", "model.adaptive_steps=3", "train.epochs=4", "train.batch_size=4",
            "train.checkpoint_every=1", "train.warmup_steps=2", "data.split_by=stable-id", "threads=1", "device=cpu"]


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "metaham", *argv]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "METAHAM_CACHE": str(tmp / "cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_at_random(argv: list[str], env: dict[str, str], ready: Path, seed: int, window: float) -> None:
    """Start ``argv``, wait until ``ready`` exists, then SIGKILL it after a seeded delay in [0, window) s."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, window))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "an interrupted write left a file"


def _log(path: Path) -> list[dict[str, str]]:
    """A CSV log's rows without its wall-clock columns (the only values a resume may change)."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if "second" not in k} for row in csv.DictReader(fh)]


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.get("step") == y.get("step") and x.get("progress", {}).get("step") == y.get("progress", {}).get("step")
    for name, value in x["model"].items():
        assert torch.equal(value, y["model"][name]), name
    for slot, state in x["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(y["optimizer"]["state"][slot][key])), (slot, key)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_meta_train_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, seed):
    env = _env(tmp_path)
    sets = [a for s in META_SETS for a in ("--set", s)]
    _run(_command("meta-train", "--config", TINY_META, "--out", str(tmp_path / "full"), "--no-progress", *sets), env)
    cut = tmp_path / "cut"
    _kill_at_random(_command("meta-train", "--config", TINY_META, "--out", str(cut), "--no-progress", *sets), env,
                    ready=cut / "meta.pt", seed=seed, window=1.0)
    _run(_command("meta-train", "--resume", "--out", str(cut), "--no-progress"), env)
    _assert_same_checkpoint(tmp_path / "full" / "meta.pt", cut / "meta.pt")
    assert _log(cut / "meta.csv") == _log(tmp_path / "full" / "meta.csv")
    _no_temporaries(cut)


@pytest.fixture(scope="module")
def h2_file(tmp_path_factory) -> Path:
    """Ten H2 geometries (stable-id: 8 train, 1 val, 1 test)."""
    path = tmp_path_factory.mktemp("h2") / "h2.db"
    generate(path, g2_molecules(["H2"]), conformers=10, displacement=0.05, progress=False)
    return path


@pytest.mark.slow
def test_qh9_train_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, h2_file):
    env = _env(tmp_path)
    sets = [a for s in QH9_SETS for a in ("--set", s)]
    _run(_command("qh9", "train", "--data", str(h2_file), "--out", str(tmp_path / "full"), *sets), env)
    cut = tmp_path / "cut"
    _kill_at_random(_command("qh9", "train", "--data", str(h2_file), "--out", str(cut), *sets), env,
                    ready=cut / "last.pt", seed=2, window=1.5)
    _run(_command("qh9", "train", "--resume", "--out", str(cut)), env)
    _assert_same_checkpoint(tmp_path / "full" / "last.pt", cut / "last.pt")
    assert _log(cut / "log.csv") == _log(tmp_path / "full" / "log.csv")
    _no_temporaries(cut)


@pytest.mark.slow
def test_qh9_generate_killed_and_rerun_equals_an_uninterrupted_run(tmp_path):
    env = _env(tmp_path)
    args = ["qh9", "generate", "--molecules", "H2", "HF", "--conformers", "4"]
    _run(_command(*args, "--out", str(tmp_path / "full.db")), env)
    cut = tmp_path / "cut.db"
    _kill_at_random(_command(*args, "--out", str(cut)), env, ready=cut, seed=3, window=2.0)
    _run(_command(*args, "--out", str(cut)), env)

    def rows(path: Path) -> list[tuple]:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT id, name, conformer, Z, pos, Ham, H_init FROM data ORDER BY id").fetchall()

    assert rows(cut) == rows(tmp_path / "full.db") and len(rows(cut)) == 8
