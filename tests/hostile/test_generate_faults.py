"""`qh9 generate` under faults: pyscf worker processes end with a killed parent; geometries are checked first."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metaham.errors import InvalidValueError
from metaham.qh9.generate import MIN_DISTANCE, check_geometry, estimated_scf_seconds


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    """``pid``'s command line, or "" once it has exited (a short-lived child can end between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_generate_is_killed(tmp_path):
    # Two workers on benzene-sized SCFs (tens of seconds each): long enough to be killed in the middle.
    script = (
        "from metaham.qh9.generate import g2_molecules, generate\n"
        f"generate({str(tmp_path / 'g.db')!r}, g2_molecules(['C6H6', 'C2H6']), conformers=2, workers=2,"
        " progress=False)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the spawn start-up imports pyscf
            time.sleep(0.2)
            workers = [pid for pid in _children(parent.pid) if "spawn" in _cmdline(pid)]
        assert len(workers) >= 2, "the pool did not start"
        time.sleep(1.0)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "pyscf workers outlived the killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in _children(parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended meanwhile
                pass


@pytest.mark.parametrize(
    "Z, pos, message",
    [
        ([], np.zeros((0, 3)), "no atoms"),
        ([1, 1], [[0, 0, 0], [0, 0, 0.5 * MIN_DISTANCE]], "atoms 0 and 1 are 0.15 A apart"),
        ([8, 1, 1], [[0, 0, 0], [0, 0.76, 0.59], [0, 0, np.inf]], "atom 2 has a non-finite coordinate"),
        ([1, 1], [[0, 0, 0]], "positions of shape"),
    ],
)
def test_check_geometry_names_what_is_wrong(Z, pos, message):
    with pytest.raises(InvalidValueError, match=message):
        check_geometry(np.asarray(Z, dtype=np.int64), np.asarray(pos, dtype=np.float64), "molecule x")


def test_check_geometry_accepts_a_real_molecule_and_the_estimate_grows_with_size():
    check_geometry(np.array([8, 1, 1]), np.array([[0, 0, 0.12], [0, 0.76, -0.47], [0, -0.76, -0.47]]), "water")
    assert estimated_scf_seconds(24) < estimated_scf_seconds(114) < estimated_scf_seconds(600) < 3600
    assert estimated_scf_seconds(1500) > 3600  # the 200-atom case the limit exists for: hours per geometry
