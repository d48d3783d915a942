"""Faults around writes: a killed writer's temporary file is cleaned up, a rewrite keeps the file's mode, and an
unusable output location is refused before any work."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from metaham.atomic import OutputError, atomic_output, atomic_write_bytes, check_output


def test_a_rewritten_file_keeps_its_permission_bits(tmp_path):
    target = tmp_path / "secret.yaml"
    atomic_write_bytes(target, b"a: 1\n")
    os.chmod(target, 0o600)
    atomic_write_bytes(target, b"a: 2\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "a: 2\n"
    os.chmod(target, 0o400)  # read-only: still replaceable (the folder is writable), still read-only after
    atomic_write_bytes(target, b"a: 3\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o400 and target.read_text() == "a: 3\n"


def test_the_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "meta.pt"
    # A real kill -9 in the middle of the write: the child blocks inside atomic_output until it is killed.
    script = (
        "import sys, time\nfrom metaham.atomic import atomic_output\n"
        f"with atomic_output({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 4096)\n    print('writing', flush=True)\n    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".meta.pt.") and not target.exists()
    atomic_write_bytes(target, b"complete")
    assert [p.name for p in tmp_path.iterdir()] == ["meta.pt"] and target.read_bytes() == b"complete"


def test_other_files_beside_the_target_are_left_alone(tmp_path):
    keep = [tmp_path / ".meta.pt.notes.txt", tmp_path / "meta.pt.bak", tmp_path / ".other.pt.abc.pt"]
    for path in keep:
        path.write_bytes(b"mine")
    with atomic_output(tmp_path / "meta.pt") as tmp:
        tmp.write_bytes(b"new")
    assert all(p.read_bytes() == b"mine" for p in keep)


@pytest.mark.parametrize(
    "make, target, folder, message",
    [
        (lambda d: (d / "f").write_text("x"), "f/out.npz", False, "f is a file, not a folder"),
        (lambda d: (d / "f").write_text("x"), "f/deeper/out.npz", False, "f is a file, not a folder"),
        (lambda d: (d / "sub").mkdir(), "sub", False, "is a folder; expected a file name"),
        (lambda d: (d / "f").write_text("x"), "f", True, "is a file; expected a folder"),
    ],
)
def test_check_output_refuses_unusable_locations(tmp_path, make, target, folder, message):
    make(tmp_path)
    with pytest.raises(OutputError, match=message):
        check_output(tmp_path / target, "--out", folder=folder)


def test_check_output_accepts_new_and_existing_locations_and_creates_nothing(tmp_path):
    (tmp_path / "old.npz").write_bytes(b"x")
    for target, folder in (("new/deeper/out.npz", False), ("old.npz", False), ("run", True), (".", True)):
        check_output(tmp_path / target, "--out", folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npz"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            check_output(locked / "out.npz", "--out")
    finally:
        os.chmod(locked, 0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no regular file can be made")
def test_a_folder_that_takes_no_new_file_is_reported_by_the_path_asked_for():
    # /proc passes the permission check (it is a writable folder for root) but refuses new files: the error
    # names /proc/out.npz, not the hidden temporary name that could not be created.
    with pytest.raises(OutputError, match=r"^/proc/out\.npz: cannot create a file in /proc \("):
        with atomic_output("/proc/out.npz") as tmp:
            tmp.write_bytes(b"x")


def test_two_processes_writing_one_file_at_once_do_not_delete_each_others_temporary_file(tmp_path):
    """Two runs that share a task-pool cache may write the same pool file at the same moment: the second writer
    must not take the first one's live temporary file for a killed writer's leftover (it did, and the first run
    died with 'No such file or directory' on its own temporary file)."""
    target, go = tmp_path / "pool.pt", tmp_path / "go"
    script = (
        "import time\nfrom pathlib import Path\nfrom metaham.atomic import atomic_output\n"
        f"with atomic_output({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'first')\n    print('writing', flush=True)\n"
        f"    while not Path({str(go)!r}).exists():\n        time.sleep(0.01)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        atomic_write_bytes(target, b"second")  # meanwhile, in this process
        assert target.read_bytes() == b"second"
        go.touch()
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["go", "pool.pt"]


def test_a_temporary_file_in_the_old_naming_is_still_cleaned_up(tmp_path):
    leftover = tmp_path / ".meta.pt.k2j9x_0a.pt"  # what mkstemp made before names carried their writer
    leftover.write_bytes(b"half")
    atomic_write_bytes(tmp_path / "meta.pt", b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.pt"]
