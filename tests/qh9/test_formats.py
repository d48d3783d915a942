"""Readers: generated SQLite round trip, QHBench LMDB and QH9-dynamic layouts, bad files."""
import pickle
import re
import shutil
import sqlite3

import numpy as np
import pytest

from metaham.qh9.basis import UnsupportedError, check_elements
from metaham.qh9.formats import BOHR, QH9FormatError, describe, open_qh9


def _records(path):
    with open_qh9(path) as f:
        return list(f)


def test_generate_sqlite_reader_roundtrip_is_exact(generated):
    path, computed = generated
    records = _records(path)
    assert [(r.molecule, r.geometry) for r in records] == [("H2O", 0), ("H2O", 1), ("H2", 0), ("H2", 1)]
    for r in records:
        Z, pos, result = computed[(r.molecule, r.geometry)]
        np.testing.assert_array_equal(r.Z, Z)
        assert r.pos.tobytes() == np.asarray(pos, dtype=np.float64).tobytes()  # bitwise
        assert r.H.tobytes() == result.H.tobytes()
        assert r.H_init.tobytes() == result.H_init.tobytes()
        assert r.H.dtype == np.float64 and r.H.shape == (r.norb, r.norb)
    with open_qh9(path) as f:
        assert f.format == "qh9-stable" and f.has_H_init and len(f) == 4
        assert f.metadata["xc"] == "b3lyp5" and f.metadata["grid_level"] == 3 and f.metadata["conv_tol"] == 1e-13
        assert f.get(int(f.ids[2])).H.tobytes() == records[2].H.tobytes()  # random access by id
        assert f[3].H.tobytes() == records[3].H.tobytes()  # and by position


def _write_qhbench_lmdb(path, records, dynamic=False):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for r in records:
            value = {
                "id": 7 if dynamic else r.id,
                "num_nodes": len(r.Z),
                "atoms": r.Z.astype(np.int32).tobytes(),
                "pos": (r.pos / BOHR if dynamic else r.pos).tobytes(),
                "Ham": r.H.tobytes(),
            }
            if dynamic:
                value["geo_id"] = r.geometry
            txn.put(int(r.id).to_bytes(4, "big"), pickle.dumps(value))
        txn.put(b"length", pickle.dumps(len(records)))  # SPHNet's extra key must be skipped
    env.close()


def test_qhbench_lmdb_reads_the_same(generated, tmp_path):
    path, _ = generated
    records = _records(path)
    _write_qhbench_lmdb(tmp_path / "stable.lmdb", records)
    with pytest.raises(QH9FormatError, match="stable.lmdb.*trust"):
        open_qh9(tmp_path / "stable.lmdb")
    with open_qh9(tmp_path / "stable.lmdb", trust_pickle=True) as f:
        assert f.format == "qhbench-lmdb" and len(f) == len(records)
        for a, b in zip(f, records):
            assert a.id == b.id and a.H.tobytes() == b.H.tobytes() and a.pos.tobytes() == b.pos.tobytes()
            np.testing.assert_array_equal(a.Z, b.Z)
        assert f.get(records[1].id).H.tobytes() == records[1].H.tobytes()
    # the bare data.mdb file opens too
    with open_qh9(tmp_path / "stable.lmdb" / "data.mdb", trust_pickle=True) as f:
        assert len(f) == len(records)

    # QH9-dynamic records (geo_id present) store Bohr: read back in Angstrom
    water = [r for r in records if r.molecule == "H2O"]
    _write_qhbench_lmdb(tmp_path / "dynamic.lmdb", water, dynamic=True)
    with open_qh9(tmp_path / "dynamic.lmdb", trust_pickle=True) as f:
        for a, b in zip(f, water):
            np.testing.assert_allclose(a.pos, b.pos, rtol=1e-15, atol=1e-15)
            assert a.molecule == "7" and a.geometry == b.geometry


def test_qh9_dynamic_sqlite_reads_in_angstrom(generated, tmp_path):
    path, _ = generated
    water = [r for r in _records(path) if r.molecule == "H2O"]
    db = sqlite3.connect(tmp_path / "dyn.db")
    db.execute(
        "CREATE TABLE data (id INTEGER NOT NULL, geo_id INTEGER NOT NULL, N INTEGER, Z BLOB, pos BLOB, ekin FLOAT, "
        "epot FLOAT, etot FLOAT, time FLOAT, Ham BLOB, converged INT)"
    )
    for r in water:  # QH9-dynamic writes the molecule index as an int64 BLOB and positions in Bohr
        db.execute(
            "INSERT INTO data VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (np.int64(42).tobytes(), r.geometry, len(r.Z), r.Z.astype(np.int32).tobytes(), (r.pos / BOHR).tobytes(),
             0.1, -76.0, -75.9, 50.0 * r.geometry, r.H.tobytes(), 1),
        )
    db.commit()
    db.close()
    with open_qh9(tmp_path / "dyn.db") as f:
        assert f.format == "qh9-dynamic"
        got = list(f)
        assert [(g.molecule, g.geometry) for g in got] == [("42", 0), ("42", 1)]
        for a, b in zip(got, water):
            np.testing.assert_allclose(a.pos, b.pos, rtol=1e-15, atol=1e-15)
            assert a.H.tobytes() == b.H.tobytes() and a.H_init is None
        assert list(f.catalog().molecule) == ["42", "42"]


def _copy_with(tmp_path, generated, sql, params=()):
    path, _ = generated
    out = tmp_path / "edited.db"
    shutil.copy(path, out)
    db = sqlite3.connect(out)
    db.execute(sql, params)
    db.commit()
    db.close()
    return out


def test_ham_size_mismatch_names_the_row(generated, tmp_path):
    path = _copy_with(tmp_path, generated, "UPDATE data SET Ham = ? WHERE id = 2", (np.zeros(23 * 23).tobytes(),))
    with open_qh9(path) as f:
        f[0]  # other rows are fine
        with pytest.raises(QH9FormatError, match=r"edited\.db: row 2: Ham has 529 values, expected 576 \(= 24 x 24"):
            f[1]


def test_unsupported_element_names_it_and_the_row(generated, tmp_path):
    sulfur = np.array([16, 1], np.int32).tobytes()
    path = _copy_with(tmp_path, generated, "UPDATE data SET Z = ? WHERE id = 3", (sulfur,))
    with open_qh9(path) as f:
        with pytest.raises(UnsupportedError, match=r"row 3: element S \(Z=16\)"):
            f.get(3)
        with pytest.raises(UnsupportedError, match=r"row 3: element S"):
            f.catalog()


def test_truncated_and_foreign_files_name_the_file(generated, tmp_path):
    path, _ = generated
    data = path.read_bytes()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(QH9FormatError, match="truncated.db"):
        with open_qh9(truncated) as f:
            list(f)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("id,N,Z\n1,2,3\n")
    with pytest.raises(QH9FormatError, match=r"notes\.txt: not a QH9 file"):
        open_qh9(foreign)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(QH9FormatError, match="empty.db.*empty file"):
        open_qh9(empty)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(QH9FormatError, match=r"other\.db: .*without a 'data' table"):
        open_qh9(other)
    with pytest.raises(QH9FormatError, match="missing.db: no such file"):
        open_qh9(tmp_path / "missing.db")


def test_describe(generated):
    path, _ = generated
    with open_qh9(path) as f:
        info = describe(f)
    assert info["format"] == "qh9-stable" and info["n"] == 4 and info["elements"] == ["H", "O"]
    assert info["atoms"] == {"min": 2, "mean": 2.5, "max": 3} and info["orbitals"]["max"] == 24
    assert info["molecules"] == 2 and info["failed"] == 0 and info["has_H_init"]



@pytest.mark.parametrize("Z, named", [
    ([92, 1], "element U (Z=92) not supported"),  # beyond krypton: ase's table names it too
    ([16, 26], "element S (Z=16), Fe (Z=26) not supported"),
    ([0, 1], "element Z=0 not supported"),  # not an element at all: the number alone
])
def test_an_unsupported_element_is_named_once_by_symbol_and_number(Z, named):
    with pytest.raises(UnsupportedError, match=re.escape(f"mol.xyz: {named}: def2-SVP layout covers H, C, N, O, F")):
        check_elements(np.array(Z), "mol.xyz")
