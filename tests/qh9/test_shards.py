"""``generate --shard K/N`` and ``merge``: shards of a job merge into the unsharded run's file, or are refused.

One test runs real pyscf (a small job unsharded and in 2 shards); the others swap
``_compute`` for a fake SCF whose matrices depend only on the geometry, so they test the partition, ids, resume
and refusals in milliseconds.
"""
import json
import shutil
import sqlite3

import numpy as np
import pytest

from metaham.cli import main
from metaham.qh9 import generate as gen
from metaham.qh9 import shards
from metaham.qh9.basis import n_orbitals
from metaham.qh9.formats import open_qh9
from metaham.qh9.shards import MergeError, Shard


def _rows(path):
    with open_qh9(path) as f:
        return list(f), f.failed


def _assert_same_rows(got, expected, atol=0.0):
    assert [(r.id, r.molecule, r.geometry) for r in got] == [(r.id, r.molecule, r.geometry) for r in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.Z, b.Z)
        np.testing.assert_array_equal(a.pos, b.pos)  # seeded displacements: bit for bit
        np.testing.assert_allclose(a.H, b.H, rtol=0, atol=atol)
        np.testing.assert_allclose(a.H_init, b.H_init, rtol=0, atol=atol)


@pytest.fixture
def one_thread():
    """pyscf on one thread for the duration of a test, restored afterwards."""
    from pyscf import lib

    before = lib.num_threads()
    lib.num_threads(1)
    yield
    lib.num_threads(before)


def test_sharded_job_merges_into_the_unsharded_file(tmp_path, one_thread):
    """Real pyscf: HF and H2, 2 conformers each, unsharded and as 2 shards, merged, compared row by row.

    Tolerance 1e-10 Eh on H and H_init: on one thread the same code on the same machine repeats its sums in
    the same order, so the runs agree to round-off (bit for bit in practice). With several threads pyscf's
    reductions run in varying order and, amplified by the SCF iterations, repeated runs differ by up to ~1e-10
    on core elements (|H| ~ 20 Eh) -- hence one thread here. A wrong geometry, setting or row order changes H
    by 1e-4 Eh or more.
    """
    molecules = gen.g2_molecules(["HF", "H2"])
    whole = tmp_path / "whole.db"
    gen.generate(whole, molecules, conformers=2, progress=False)
    parts = [tmp_path / f"part_{k}.db" for k in (1, 2)]
    for k, part in enumerate(parts, start=1):
        stats = gen.generate(part, molecules, conformers=2, progress=False, shard=Shard(k, 2))
        assert (stats["total"], stats["job_total"], stats["shard"]) == (2, 4, f"{k}/2")
    with open_qh9(parts[0]) as f:  # the two HF geometries (equal cost) go to different shards
        assert f.ids.tolist() == [1, 3] and f.metadata["shard"] == "1/2"
    result = shards.merge(tmp_path / "merged.db", parts[::-1])
    assert (result["rows"], result["failed"], result["complete"]) == (4, 0, True)
    merged, _ = _rows(tmp_path / "merged.db")
    expected, _ = _rows(whole)
    _assert_same_rows(merged, expected, atol=1e-10)
    with open_qh9(tmp_path / "merged.db") as f, open_qh9(whole) as g:
        assert {k: v for k, v in f.metadata.items() if k not in ("job", "merged_shards")} == g.metadata


def test_assign_balances_cost_and_is_deterministic():
    costs = [1000] * 4 + [13824] * 2 + [1] * 5  # 4 H2, 2 H2O, 5 cheap
    shard_of = shards.assign(costs, 3)
    assert shard_of == shards.assign(list(costs), 3)
    loads = [sum(c for c, s in zip(costs, shard_of) if s == k) for k in (1, 2, 3)]
    assert max(loads) - min(loads) <= max(costs)  # the greedy rule's guarantee
    assert shard_of[4] != shard_of[5]  # the two expensive ones apart
    assert sorted(set(shards.assign([5] * 6, 3))) == [1, 2, 3]  # equal costs: round-robin
    assert shards.assign([5] * 6, 3) == [1, 2, 3, 1, 2, 3]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "-1/2", "2", "a/b", "1/2/3", ""])
def test_bad_shard_values_are_refused(text, capsys):
    with pytest.raises(ValueError, match=f"shard {text!r}: expected K/N with 1 <= K <= N"):
        Shard.parse(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["qh9", "generate", "--out", "x.db", "--molecules", "H2", f"--shard={text}"])
    assert exit_info.value.code == 2
    assert f"argument --shard: shard {text!r}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ fake SCF: fast tests


@pytest.fixture
def fake_scf(monkeypatch):
    """Replace pyscf by a deterministic fake; geometries named in the returned set fail."""
    failing = set()

    def compute(job):
        name, k, Z, pos, settings = job
        if (name, k) in failing:
            return name, k, Z, pos, "RuntimeError: fake SCF failure"
        n = n_orbitals(Z)
        H = np.full((n, n), float(pos.sum())) + np.eye(n) * k
        return name, k, Z, pos, gen.SCFResult(H, 2 * H, -float(k), True, 7)

    monkeypatch.setattr(gen, "_compute", compute)
    return failing


MOLECULES = ["H2", "H2O", "HF"]


def _job(out, shard=None, conformers=3, **kwargs):
    return gen.generate(out, gen.g2_molecules(MOLECULES), conformers=conformers, progress=False, shard=shard, **kwargs)


def _shard_files(tmp_path, count, **kwargs):
    parts = [tmp_path / f"part_{k}.db" for k in range(1, count + 1)]
    for k, part in enumerate(parts, start=1):
        _job(part, Shard(k, count), **kwargs)
    return parts


def test_failed_geometries_get_the_unsharded_ids(fake_scf, tmp_path):
    fake_scf.update({("H2", 1), ("H2O", 0)})  # ids after these shift down in an unsharded file
    _job(tmp_path / "whole.db")
    parts = _shard_files(tmp_path, 3)
    assert shards.merge(tmp_path / "merged.db", parts)["failed"] == 2
    (merged, merged_failed), (whole, whole_failed) = _rows(tmp_path / "merged.db"), _rows(tmp_path / "whole.db")
    assert [r.id for r in whole] == list(range(1, 8))
    _assert_same_rows(merged, whole)
    assert merged_failed == whole_failed


def test_interrupted_shard_resumes_into_the_same_file(fake_scf, tmp_path, monkeypatch, capsys):
    fresh = _shard_files(tmp_path, 2)
    resumed = tmp_path / "resumed_2.db"
    real, calls = gen._compute, []

    def interrupted(job):
        calls.append(job[:2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the array task is killed during its third geometry
        return real(job)

    monkeypatch.setattr(gen, "_compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _job(resumed, Shard(2, 2))
    assert main(["qh9", "merge", "--out", str(tmp_path / "m.db"), str(fresh[0]), str(resumed)]) == 2
    err = capsys.readouterr().err
    assert f"unfinished shard(s) {resumed} (2 of 4 geometries)" in err and not (tmp_path / "m.db").exists()
    monkeypatch.setattr(gen, "_compute", real)
    stats = _job(resumed, Shard(2, 2))
    assert (stats["existing"], stats["computed"]) == (2, 2)
    (got, _), (expected, _) = _rows(resumed), _rows(fresh[1])
    _assert_same_rows(got, expected)
    with pytest.raises(ValueError, match="was generated with shard='2/2', this run asks for '1/2'"):
        _job(resumed, Shard(1, 2))
    with pytest.raises(ValueError, match="was generated as shard 2/2; use another --out"):
        _job(resumed)
    _job(tmp_path / "whole.db")
    with pytest.raises(ValueError, match="was generated without --shard"):
        _job(tmp_path / "whole.db", Shard(1, 2))


def test_merge_cli_summary_json_and_refusals(fake_scf, tmp_path, capsys):
    parts = _shard_files(tmp_path, 2)
    out = tmp_path / "merged.db"

    def refused(*argv):
        assert main(["qh9", "merge", *map(str, argv)]) == 2
        return capsys.readouterr().err

    assert main(["qh9", "merge", "--out", str(out), *map(str, parts), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert (result["rows"], result["count"], result["complete"], result["out"]) == (9, 2, True, str(out))
    assert f"{out}: 9 rows (0 failed geometries) from 2 of 2 shards" in lines[0]

    assert f"{out}: exists; choose another output or pass --force" in refused("--out", out, *parts)
    assert main(["qh9", "merge", "--out", str(out), *map(str, parts), "--force"]) == 0
    capsys.readouterr()

    copy = tmp_path / "copy_1.db"
    shutil.copy(parts[0], copy)
    duplicate = refused("--out", tmp_path / "d.db", parts[0], copy, parts[1])
    assert f"duplicate shard 1/2: {parts[0]} and {copy}" in duplicate

    relabelled = tmp_path / "relabelled_2.db"  # shard 1's rows under the label 2/2: every geometry twice
    shutil.copy(parts[0], relabelled)
    with sqlite3.connect(relabelled) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'shard'", (json.dumps("2/2"),))
    db.close()
    twice = refused("--out", tmp_path / "d.db", parts[0], relabelled)
    assert f"duplicate geometry H2 conformer 0 (id 1) in {parts[0]} and {relabelled}" in twice

    missing = refused("--out", tmp_path / "p.db", parts[0])
    assert "incomplete set of 2 shards (4 geometries absent): missing shard(s) 2/2" in missing
    assert main(["qh9", "merge", "--out", str(tmp_path / "p.db"), str(parts[0]), "--allow-partial", "--json"]) == 0
    partial = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (partial["rows"], partial["missing_shards"], partial["complete"]) == (5, ["2/2"], False)

    pbe = tmp_path / "pbe_2.db"
    _job(pbe, Shard(2, 2), settings=gen.DFTSettings(xc="pbe"))
    assert f"mismatched settings: {parts[0]} has xc='b3lyp5', {pbe} has xc='pbe'" in refused(
        "--out", tmp_path / "x.db", parts[0], pbe
    )
    other_job = tmp_path / "c2_2.db"
    _job(other_job, Shard(2, 2), conformers=2)
    other = refused("--out", tmp_path / "x.db", parts[0], other_job)
    assert f"different jobs (molecules, geometries or conformers): {parts[0]} has job=" in other
    three = tmp_path / "three_2.db"
    _job(three, Shard(2, 3))
    assert f"different jobs: {parts[0]} is shard 1/2, {three} is shard 2/3" in refused(
        "--out", tmp_path / "x.db", parts[0], three
    )
    absent = refused("--out", tmp_path / "x.db", parts[0], tmp_path / "whole.db")
    assert f"{tmp_path / 'whole.db'}: no such file" in absent
    _job(tmp_path / "whole.db")
    assert "not a shard file" in refused("--out", tmp_path / "x.db", parts[0], tmp_path / "whole.db")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left behind
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "d.db").exists()


def test_merge_failure_while_writing_leaves_nothing(fake_scf, tmp_path, monkeypatch):
    parts = _shard_files(tmp_path, 2)
    out = tmp_path / "merged.db"
    out.write_bytes(b"old")

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "replace", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        shards.merge(out, parts, force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.db", "part_1.db", "part_2.db"]
    with pytest.raises(MergeError, match="is also one of the shard files"):
        shards.merge(parts[0], parts, force=True)
