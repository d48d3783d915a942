"""Streaming readers for the released QH9 file formats, behind one record type.

:func:`open_qh9` detects the format from the file's first bytes and returns a :class:`QH9File`: iterate it
(one row in memory at a time; a 30 GB file is never loaded), index it by position (``f[i]``, for
DataLoaders) or by row id (``f.get(id)``), or list every row's atoms without reading a matrix
(:meth:`QH9File.catalog`, for splits and statistics).

Formats:

``qh9-stable`` (SQLite)
    ``data(id INTEGER PRIMARY KEY, N, Z BLOB int32 (N,), pos BLOB float64 (N, 3) Angstrom,
    Ham BLOB float64 (norb, norb))``. Files written by ``metaham qh9 generate`` are of this kind, with extra
    columns after ``Ham`` (``H_init``, ``energy``, ``scf_cycles``, ``name``, ``conformer``) and a ``meta`` table
    of generation settings; QH9's own loaders read them unchanged.
``qh9-dynamic`` (SQLite)
    ``data(id, geo_id, N, Z, pos, ekin, epot, etot, time, Ham, converged)``: ``id`` is the molecule (its QM9
    index, an integer or an int64 BLOB), ``geo_id`` the MD frame, and ``pos`` is in **Bohr**. The reader
    converts it to Angstrom (``pos * BOHR``, pyscf's constant, the one the generating pyscf run used), so every
    record has Angstrom positions whatever the file.
``qhbench-lmdb``
    QHBench's processed LMDB (a directory holding ``data.mdb``, or the file itself): 4-byte big-endian
    integer keys, each value a pickled dict with ``id``, ``num_nodes``, ``atoms`` (int32 bytes), ``pos``
    (float64 bytes) and ``Ham`` (float64 bytes); numpy arrays instead of bytes and an optional ``Ham_init``
    (SPHNet's variant) are accepted, other keys such as ``length`` are skipped. A record with ``geo_id`` comes
    from QH9-dynamic and its ``pos`` is in Bohr (converted as above). Unpickling runs code chosen by whoever
    wrote the file, so these files open only with ``trust_pickle=True`` (``--trust-pickle``).

Every error names the file, and the row when one row is at fault.
"""
from __future__ import annotations

import json
import os
import pickle
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from metaham.errors import UserError

from .basis import check_elements, n_orbitals

BOHR = 0.52917721092  # Angstrom per Bohr: pyscf.lib.param.BOHR, the constant of the pyscf that wrote QH9-dynamic

_SQLITE_MAGIC = b"SQLite format 3\x00"
_LMDB_MAGIC = b"\xde\xc0\xef\xbe"  # MDB_meta.mm_magic (0xBEEFC0DE, little-endian) after the 16-byte page header


class QH9FormatError(UserError, ValueError):
    """A file or row that is not readable QH9 data; the message names the file (and the row)."""


@dataclass(frozen=True, eq=False)
class Record:
    """One geometry of one molecule with its Kohn-Sham matrix.

    Attributes:
        id: the row's key in its file (SQLite rowid, which is QH9-stable's ``id``; the LMDB key).
        Z: ``(n_atoms,)`` int64 atomic numbers.
        pos: ``(n_atoms, 3)`` float64 positions in Angstrom.
        H: ``(norb, norb)`` float64 Kohn-Sham (Fock) matrix in Hartree, pyscf AO order, def2-SVP.
        H_init: ``(norb, norb)`` float64 Fock matrix of the MINAO initial-guess density, or ``None`` when the
            file does not store it.
        molecule: the molecule this geometry belongs to (QH9-dynamic's ``id``, a generated file's ``name``;
            the row id where every row is its own molecule). Splits by molecule group on it.
        geometry: the geometry's index within its molecule (MD frame ``geo_id``, conformer; 0 otherwise).
    """

    id: int
    Z: np.ndarray
    pos: np.ndarray
    H: np.ndarray
    H_init: np.ndarray | None
    molecule: str
    geometry: int

    @property
    def norb(self) -> int:
        return int(self.H.shape[0])


@dataclass(frozen=True, eq=False)
class Catalog:
    """Every row's atoms and grouping keys, in file order, read without any matrix.

    Attributes:
        ids: ``(n,)`` int64 row ids.
        Z: ``n`` arrays of atomic numbers.
        molecule: ``(n,)`` str molecule keys.
        geometry: ``(n,)`` int64 geometry indices within each molecule.
    """

    ids: np.ndarray
    Z: list[np.ndarray]
    molecule: np.ndarray
    geometry: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_atoms(self) -> np.ndarray:
        """``(n,)`` int64 atoms per row."""
        return np.array([len(z) for z in self.Z], dtype=np.int64)

    @property
    def n_orbitals(self) -> np.ndarray:
        """``(n,)`` int64 def2-SVP AOs per row."""
        return np.array([n_orbitals(z) for z in self.Z], dtype=np.int64)


class QH9File:
    """A QH9 file opened for reading (see the module docstring). Use :func:`open_qh9` to get one.

    ``len(f)`` rows; ``f[i]`` the i-th row (file order); ``f.get(id)`` by id; ``iter(f)`` streams every row;
    ``f.records(indices)`` streams the given positions. ``f.metadata`` holds a generated file's settings
    (``{}`` for QH9's own files) and ``f.failed`` the geometries whose SCF failed (``name``, ``conformer``,
    ``reason``); ``f.has_H_init`` says whether records carry ``H_init``.

    Safe to hand to DataLoader workers: the connection is reopened in each process.
    """

    format: str = ""

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, Any] = {}
        self.failed: list[dict[str, Any]] = []
        self.has_H_init = False
        self.ids: np.ndarray = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Record:
        n = len(self.ids)
        if not -n <= int(index) < n:
            raise IndexError(f"{self.path}: index {index} out of range for {n} rows")
        return self.get(int(self.ids[int(index)]))

    def __iter__(self) -> Iterator[Record]:
        raise NotImplementedError

    def get(self, row_id: int) -> Record:
        """The row with id ``row_id`` (``KeyError`` naming the file if there is none)."""
        raise NotImplementedError

    def catalog(self) -> Catalog:
        """Every row's atoms, molecule and geometry keys, without reading the matrices."""
        raise NotImplementedError

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        """Stream the rows at the given positions (file order positions, not ids)."""
        for index in indices:
            yield self[int(index)]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "QH9File":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {str(self.path)!r}: {len(self)} rows>"


def open_qh9(path: str | os.PathLike, trust_pickle: bool = False) -> QH9File:
    """Open a QH9 SQLite database or QHBench LMDB for streaming reads; the format is detected.

    Args:
        path: an SQLite file (QH9-stable, QH9-dynamic, or written by ``metaham qh9 generate``), or an LMDB
            directory / ``data.mdb`` file in QHBench's layout.
        trust_pickle: required to open an LMDB, whose records are pickles (unpickling runs code).

    Raises:
        QH9FormatError: missing, truncated or foreign file, or an untrusted LMDB; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "data.mdb").is_file():
            raise QH9FormatError(f"{path}: a directory without data.mdb is not a QH9 file")
        return _LMDBFile(path, subdir=True, trust_pickle=trust_pickle)
    if not path.is_file():
        raise QH9FormatError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(20)
    if head.startswith(_SQLITE_MAGIC):
        return _SQLiteFile(path)
    if len(head) == 20 and head[16:20] == _LMDB_MAGIC:
        return _LMDBFile(path, subdir=False, trust_pickle=trust_pickle)
    what = "an empty file" if not head else "neither an SQLite database nor an LMDB"
    raise QH9FormatError(f"{path}: not a QH9 file ({what})")


# --------------------------------------------------------------------------------------------- decoding


def _ints(value: Any, n: int | None, where: str) -> np.ndarray:
    """``n`` atomic numbers from a BLOB (int32 as QH9 writes them; int64 if the length says so) or an array."""
    if isinstance(value, np.ndarray):
        z = value.astype(np.int64).ravel()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if n is not None and len(raw) == 8 * n:
            z = np.frombuffer(raw, dtype=np.int64).copy()
        elif len(raw) % 4 == 0:
            z = np.frombuffer(raw, dtype=np.int32).astype(np.int64)
        else:
            raise QH9FormatError(f"{where}: Z has {len(raw)} bytes, not a whole number of int32 values")
    else:
        raise QH9FormatError(f"{where}: Z is a {type(value).__name__}, expected int32 bytes")
    if n is not None and len(z) != n:
        raise QH9FormatError(f"{where}: Z holds {len(z)} atoms but N = {n}")
    return z


def _floats(value: Any, count: int, name: str, where: str, explain: str = "") -> np.ndarray:
    """``count`` float64 values from a BLOB or an array (a copy, writable)."""
    if isinstance(value, np.ndarray):
        out = value.astype(np.float64).ravel()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) % 8:
            raise QH9FormatError(f"{where}: {name} has {len(raw)} bytes, not a whole number of float64 values")
        out = np.frombuffer(raw, dtype=np.float64).copy()
    else:
        raise QH9FormatError(f"{where}: {name} is a {type(value).__name__}, expected float64 bytes")
    if out.size != count:
        raise QH9FormatError(f"{where}: {name} has {out.size} values, expected {count}{explain}")
    finite = np.isfinite(out)
    if not finite.all():  # a NaN would otherwise surface far away, as a failed eigensolve or a dropped metric
        raise QH9FormatError(f"{where}: {name} holds a non-finite value (NaN or inf) at entry {int(np.argmin(finite))}")
    return out


def _make_record(
    where: str,
    row_id: int,
    n: int | None,
    z_raw: Any,
    pos_raw: Any,
    h_raw: Any,
    h_init_raw: Any,
    molecule: str,
    geometry: int,
    pos_scale: float = 1.0,
) -> Record:
    Z = _ints(z_raw, n, where)
    check_elements(Z, where)
    pos = _floats(pos_raw, 3 * len(Z), "pos", where).reshape(len(Z), 3)
    if pos_scale != 1.0:
        pos = pos * pos_scale
    norb = n_orbitals(Z)
    explain = f" (= {norb} x {norb} for the {len(Z)} atoms of Z in def2-SVP)"
    H = _floats(h_raw, norb * norb, "Ham", where, explain).reshape(norb, norb)
    H_init = None
    if h_init_raw is not None:
        H_init = _floats(h_init_raw, norb * norb, "H_init", where, explain).reshape(norb, norb)
    return Record(int(row_id), Z, pos, H, H_init, molecule, int(geometry))


def _molecule_key(value: Any) -> str:
    """QH9-dynamic stores the molecule index as an int64 BLOB (numpy scalar written by apsw) or an integer."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 8:
        return str(int(np.frombuffer(bytes(value), dtype=np.int64)[0]))
    return str(value)


# --------------------------------------------------------------------------------------------- SQLite


class _SQLiteFile(QH9File):
    def __init__(self, path: Path):
        super().__init__(path)
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        tables = {row[0] for row in self._fetch("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "data" not in tables:
            raise QH9FormatError(f"{path}: SQLite database without a 'data' table is not a QH9 file")
        columns = {row[1] for row in self._fetch("PRAGMA table_info(data)")}
        missing = {"N", "Z", "pos", "Ham"} - columns
        if missing:
            raise QH9FormatError(f"{path}: table 'data' lacks column(s) {', '.join(sorted(missing))}: not a QH9 file")
        self.has_H_init = "H_init" in columns
        if "geo_id" in columns:
            self.format, self._pos_scale = "qh9-dynamic", BOHR
            self._key_columns = "id, geo_id"
        else:
            self.format, self._pos_scale = "qh9-stable", 1.0
            self._key_columns = "name, conformer" if {"name", "conformer"} <= columns else "NULL, NULL"
        h_init = "H_init" if self.has_H_init else "NULL"
        self._select = f"SELECT rowid, N, Z, pos, Ham, {h_init}, {self._key_columns} FROM data"
        if "meta" in tables:
            self.metadata = {k: json.loads(v) for k, v in self._fetch("SELECT key, value FROM meta")}
        if "failed" in tables:
            query = "SELECT name, conformer, reason FROM failed ORDER BY name, conformer"
            self.failed = [dict(name=n, conformer=k, reason=r) for n, k, r in self._fetch(query)]
        self.ids = np.array([row[0] for row in self._fetch("SELECT rowid FROM data ORDER BY rowid")], dtype=np.int64)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # a forked DataLoader worker needs its own connection
            uri = self.path.resolve().as_uri() + "?mode=ro"
            try:
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise QH9FormatError(f"{self.path}: cannot open ({exc})") from exc
            self._pid = os.getpid()
        return self._db

    def _fetch(self, sql: str, params: tuple = (), what: str = "") -> Iterator[tuple]:
        try:
            yield from self._connect().execute(sql, params)
        except sqlite3.DatabaseError as exc:
            where = f"{self.path}{': ' + what if what else ''}"
            raise QH9FormatError(f"{where}: unreadable SQLite data ({exc}); is the file truncated or foreign?") from exc

    def _keys(self, rowid: int, key: Any, geometry: Any) -> tuple[str, int]:
        """(molecule, geometry) of a row: dynamic ``(id, geo_id)``, generated ``(name, conformer)``, else the row."""
        if self.format == "qh9-dynamic":
            return _molecule_key(key), int(geometry)
        return (str(rowid), 0) if key is None else (str(key), int(geometry))

    def _record(self, row: tuple) -> Record:
        rowid, n, z, pos, ham, h_init, key, geometry = row
        molecule, geometry = self._keys(rowid, key, geometry)
        where = f"{self.path}: row {rowid}"
        return _make_record(where, rowid, n, z, pos, ham, h_init, molecule, geometry, self._pos_scale)

    def __iter__(self) -> Iterator[Record]:
        for row in self._fetch(self._select + " ORDER BY rowid"):
            yield self._record(row)

    def get(self, row_id: int) -> Record:
        rows = list(self._fetch(self._select + " WHERE rowid = ?", (int(row_id),), what=f"row {row_id}"))
        if not rows:
            raise KeyError(f"{self.path}: no row with id {row_id}")
        return self._record(rows[0])

    def catalog(self) -> Catalog:
        ids, Zs, molecules, geometries = [], [], [], []
        query = f"SELECT rowid, N, Z, {self._key_columns} FROM data ORDER BY rowid"
        for rowid, n, z, key, geometry in self._fetch(query):
            where = f"{self.path}: row {rowid}"
            Z = _ints(z, n, where)
            check_elements(Z, where)
            molecule, geometry = self._keys(rowid, key, geometry)
            ids.append(rowid)
            Zs.append(Z)
            molecules.append(molecule)
            geometries.append(geometry)
        return Catalog(
            np.array(ids, dtype=np.int64), Zs, np.array(molecules, dtype=object), np.array(geometries, dtype=np.int64)
        )

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_db"], state["_pid"] = None, -1
        return state


# --------------------------------------------------------------------------------------------- LMDB


class _LMDBFile(QH9File):
    format = "qhbench-lmdb"

    def __init__(self, path: Path, subdir: bool, trust_pickle: bool):
        super().__init__(path)
        if not trust_pickle:
            raise QH9FormatError(
                f"{path}: QHBench LMDB records are Python pickles, and unpickling runs code chosen by whoever "
                "wrote the file; open it only if you trust its source, with --trust-pickle (trust_pickle=True)"
            )
        try:
            import lmdb  # noqa: F401  (optional dependency: pip install lmdb)
        except ImportError as exc:
            raise QH9FormatError(f"{path}: reading LMDB needs the lmdb package (pip install lmdb)") from exc
        self._subdir = subdir
        self._env = None
        self._pid = -1
        keys = []
        with self._txn() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if len(key) == 4:  # QHBench's keys; SPHNet also stores b"length"
                    keys.append(int.from_bytes(key, "big"))
        self.ids = np.array(sorted(keys), dtype=np.int64)
        if len(self.ids):
            self.has_H_init = "Ham_init" in self._load(int(self.ids[0]))

    def _txn(self):
        import lmdb

        if self._env is None or self._pid != os.getpid():
            try:
                self._env = lmdb.open(
                    str(self.path), subdir=self._subdir, readonly=True, lock=False, readahead=False, max_readers=2048
                )
            except lmdb.Error as exc:
                raise QH9FormatError(f"{self.path}: unreadable LMDB ({exc}); truncated or foreign?") from exc
            self._pid = os.getpid()
        try:
            return self._env.begin(buffers=False)
        except lmdb.Error as exc:
            raise QH9FormatError(f"{self.path}: unreadable LMDB ({exc})") from exc

    def _load(self, row_id: int, txn=None) -> dict:
        import lmdb

        where = f"{self.path}: entry {row_id}"
        try:
            if txn is None:
                with self._txn() as own:
                    raw = own.get(int(row_id).to_bytes(4, "big"))
            else:
                raw = txn.get(int(row_id).to_bytes(4, "big"))
        except lmdb.Error as exc:
            raise QH9FormatError(f"{where}: unreadable ({exc}); is the file truncated?") from exc
        if raw is None:
            raise KeyError(f"{self.path}: no entry with key {row_id}")
        try:
            obj = pickle.loads(raw)
        except Exception as exc:  # any unpickling failure means a damaged or foreign value
            raise QH9FormatError(f"{where}: value is not a readable pickle ({type(exc).__name__}: {exc})") from exc
        if not isinstance(obj, dict) or not {"atoms", "pos", "Ham"} <= set(obj):
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise QH9FormatError(f"{where}: expected a dict with atoms, pos and Ham, found {found}")
        return obj

    @staticmethod
    def _keys(row_id: int, obj: dict) -> tuple[str, int]:
        """(molecule, geometry): a QH9-dynamic record (with ``geo_id``) belongs to molecule ``id``."""
        if "geo_id" in obj:
            return str(obj.get("id", row_id)), int(obj["geo_id"])
        return str(int(row_id)), 0

    def _record(self, row_id: int, obj: dict) -> Record:
        molecule, geometry = self._keys(row_id, obj)
        where = f"{self.path}: entry {row_id}"
        scale = BOHR if "geo_id" in obj else 1.0
        return _make_record(
            where, row_id, obj.get("num_nodes"), obj["atoms"], obj["pos"], obj["Ham"], obj.get("Ham_init"),
            molecule, geometry, scale,
        )

    def __iter__(self) -> Iterator[Record]:
        with self._txn() as txn:
            for row_id in self.ids:
                yield self._record(int(row_id), self._load(int(row_id), txn))

    def get(self, row_id: int) -> Record:
        return self._record(int(row_id), self._load(int(row_id)))

    def catalog(self) -> Catalog:
        Zs, molecules, geometries = [], [], []
        with self._txn() as txn:
            for row_id in self.ids:
                obj = self._load(int(row_id), txn)
                where = f"{self.path}: entry {row_id}"
                Z = _ints(obj["atoms"], obj.get("num_nodes"), where)
                check_elements(Z, where)
                molecule, geometry = self._keys(int(row_id), obj)
                Zs.append(Z)
                molecules.append(molecule)
                geometries.append(geometry)
        return Catalog(self.ids.copy(), Zs, np.array(molecules, dtype=object), np.array(geometries, dtype=np.int64))

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, -1
        return state


def check_rows(file: QH9File, limit: int = 20) -> tuple[int, list[str]]:
    """Read every row as the loaders do (sizes, elements, finite values): ``(rows read, problems)``, the
    problems one message per bad row naming it, at most ``limit`` of them."""
    problems, n = [], len(file)
    for index in range(n):
        try:
            file[index]
        except QH9FormatError as exc:
            problems.append(str(exc))
            if len(problems) >= limit:
                break
    return n, problems


def describe(file: QH9File) -> dict[str, Any]:
    """What a file holds: ``format``, ``n`` rows, ``elements`` (symbols), ``atoms`` and ``orbitals`` per molecule
    (``min``/``mean``/``max``), distinct ``molecules``, ``has_H_init``, generation ``metadata`` and ``failed``
    geometries (generated files). Streams the file once without reading any matrix (LMDB: unpickles each row)."""
    from .basis import SYMBOLS

    catalog = file.catalog()

    def stats(values: np.ndarray) -> dict[str, float | None]:
        if not len(values):
            return {"min": None, "mean": None, "max": None}
        return {"min": int(values.min()), "mean": float(values.mean()), "max": int(values.max())}

    present = sorted({int(z) for Z in catalog.Z for z in Z})
    return {
        "path": str(file.path),
        "format": file.format,
        "n": len(catalog),
        "elements": [SYMBOLS[z] for z in present],
        "atoms": stats(catalog.n_atoms),
        "orbitals": stats(catalog.n_orbitals),
        "molecules": int(len(set(catalog.molecule.tolist()))),
        "has_H_init": file.has_H_init,
        "metadata": file.metadata,
        "failed": len(file.failed),
    }
