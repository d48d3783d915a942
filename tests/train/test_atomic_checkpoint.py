"""Atomic output and plain-dict checkpoints: nothing half-written, nothing private, nothing unpickled."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from metaham.atomic import atomic_output, atomic_write_bytes
from metaham.train import load_checkpoint, save_checkpoint


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.npz"]


def test_written_file_has_ordinary_permissions_and_suffix(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "sub" / "plot.png") as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path / "sub"
            tmp.write_bytes(b"x")
        atomic_write_bytes(tmp_path / "config.yaml", b"a: 1\n")
    finally:
        os.umask(old)
    for path in (tmp_path / "sub" / "plot.png", tmp_path / "config.yaml"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone would leave 0600
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_checkpoint_round_trip_and_foreign_file(tmp_path):
    state = {"step": 3, "weights": {"w": torch.arange(4.0)}, "name": "run"}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 3 and loaded["name"] == "run"
    assert torch.equal(loaded["weights"]["w"], torch.arange(4.0))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
