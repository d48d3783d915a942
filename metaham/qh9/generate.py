"""Generate QH9-style data with pyscf: restricted Kohn-Sham Fock matrices of small molecules.

QH9's settings: B3LYP (``b3lyp5``: pyscf >= 2.3 reads ``b3lyp`` as the VWN-RPA variant, QH9 used VWN5),
def2-SVP, integration grid level 3, SCF tolerance 1e-13, DIIS with 8 vectors. Stored per geometry, in the
QH9-stable SQLite schema (:mod:`metaham.qh9.formats`): ``Z``, ``pos`` (Angstrom) and ``Ham = mf.get_fock()``
in pyscf AO order, plus ``H_init`` (the Fock matrix of pyscf's MINAO initial-guess density, what SPHNet-style
models learn a correction to), the total ``energy`` (Hartree), ``scf_cycles``, and the ``name`` and
``conformer`` of the geometry.

Molecules: ase's G2 collection restricted to closed-shell molecules of H, C, N, O, F (:func:`g2_molecules`),
or XYZ files (:func:`read_xyz`). Conformer 0 is the given geometry; conformer ``k > 0`` displaces every
coordinate by an independent Gaussian of standard deviation ``displacement`` (Angstrom), drawn from a
generator seeded by ``(seed, molecule name, k)`` -- so a geometry never depends on worker scheduling or on
which other molecules are in the run.

Every geometry is one committed SQLite transaction: an interrupted run leaves a valid file, and a rerun
skips the ``(name, conformer)`` pairs already stored. A geometry whose SCF does not converge is recorded in
the ``failed`` table (not in ``data``) and skipped by reruns too. The file's ``meta`` table holds the
settings; a rerun with different settings is refused rather than mixed into one file.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from metaham.errors import InvalidValueError

from .basis import N_AO, UnsupportedError, check_elements, normalize_basis


@dataclass(frozen=True)
class DFTSettings:
    """The electronic-structure settings stored with every generated file (QH9's by default)."""

    xc: str = "b3lyp5"
    basis: str = "def2-svp"
    grid_level: int = 3
    conv_tol: float = 1e-13
    diis_space: int = 8
    max_cycle: int = 100

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "DFTSettings":
        """The settings a file was generated with, from its ``meta`` table (``QH9File.metadata``), so that
        later pyscf runs on its geometries (initial guesses, SCF restarts) match its matrices. Fields the file
        does not record keep QH9's values: QH9's own files have no ``meta`` table and used QH9's settings.
        Other metadata keys (seed, pyscf version, ...) are ignored.

        >>> DFTSettings.from_metadata({"xc": "pbe", "seed": 3}).xc
        'pbe'
        """
        values = {}
        for field in fields(cls):
            if field.name in metadata:
                kind = type(field.default)
                try:
                    values[field.name] = kind(metadata[field.name])
                except (TypeError, ValueError):
                    raise InvalidValueError(
                        f"file metadata {field.name}={metadata[field.name]!r} is not of type {kind.__name__}"
                    ) from None
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Molecule:
    """A named geometry: ``Z`` ``(n_atoms,)`` int64, ``pos`` ``(n_atoms, 3)`` float64 Angstrom."""

    name: str
    Z: np.ndarray
    pos: np.ndarray


@dataclass(frozen=True, eq=False)
class SCFResult:
    """``H`` and ``H_init`` ``(norb, norb)`` float64 pyscf order; ``energy`` Hartree."""

    H: np.ndarray
    H_init: np.ndarray
    energy: float
    converged: bool
    cycles: int


# ------------------------------------------------------------------------------------------- molecules


def _check_molecule(Z: np.ndarray, where: str) -> None:
    check_elements(Z, where)
    if int(Z.sum()) % 2:
        raise UnsupportedError(f"{where}: odd number of electrons ({int(Z.sum())}); only closed shells are supported")


def g2_molecules(names: Sequence[str] | None = None) -> list[Molecule]:
    """ase's G2 molecules that are closed-shell, neutral, have 2+ atoms and only H, C, N, O, F (73 of them).

    Args:
        names: a subset by G2 name (e.g. ``["H2O", "CH4"]``); ``None`` for all. An unknown or unsupported
            name raises ``ValueError`` naming it.
    """
    from ase.build import molecule as build
    from ase.collections import g2

    def usable(atoms) -> bool:
        Z = atoms.numbers
        return (
            len(Z) > 1
            and set(Z.tolist()) <= set(N_AO)
            and int(Z.sum()) % 2 == 0
            and not np.any(atoms.get_initial_magnetic_moments())
        )

    if names is None:
        chosen = [n for n in g2.names if usable(build(n))]
    else:
        chosen = []
        for n in names:
            if n not in g2.names:
                raise ValueError(f"{n!r} is not a molecule of ase's G2 collection (see ase.collections.g2.names)")
            if not usable(build(n)):
                raise ValueError(f"G2 molecule {n!r} is open-shell, one atom, or has elements other than H C N O F")
            chosen.append(n)
    out = []
    for n in chosen:
        atoms = build(n)
        out.append(Molecule(n, atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64)))
    return out


def read_xyz(path: str | os.PathLike) -> list[Molecule]:
    """Molecules of an XYZ file (Angstrom); several frames give ``stem:0``, ``stem:1``, ... names."""
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such XYZ file")
    try:
        frames = read(path, index=":", format="xyz")
    except Exception as exc:  # ase raises many types for malformed files
        raise ValueError(f"{path}: not a readable XYZ file ({type(exc).__name__}: {exc})") from exc
    out = []
    for i, atoms in enumerate(frames):
        name = path.stem if len(frames) == 1 else f"{path.stem}:{i}"
        Z = atoms.numbers.astype(np.int64)
        _check_molecule(Z, f"{path} frame {i}" if len(frames) > 1 else str(path))
        out.append(Molecule(name, Z, atoms.positions.astype(np.float64)))
    return out


def conformer(molecule: Molecule, k: int, displacement: float, seed: int) -> np.ndarray:
    """``(n_atoms, 3)`` positions of conformer ``k``: the geometry itself for ``k = 0``, else displaced."""
    if k == 0:
        return molecule.pos.copy()
    rng = np.random.default_rng([seed, zlib.crc32(molecule.name.encode()), k])
    return molecule.pos + rng.normal(0.0, displacement, size=molecule.pos.shape)


# ------------------------------------------------------------------------------------------- pyscf


def _mean_field(Z: np.ndarray, pos: np.ndarray, settings: DFTSettings):
    from pyscf import dft, gto

    mol = gto.M(
        atom=[[int(z), tuple(p)] for z, p in zip(Z, pos)], basis=settings.basis, unit="Angstrom", verbose=0
    )
    mf = dft.RKS(mol)
    mf.xc = settings.xc
    mf.grids.level = settings.grid_level
    mf.conv_tol = settings.conv_tol
    mf.diis_space = settings.diis_space
    mf.max_cycle = settings.max_cycle
    return mf


def initial_guess_fock(Z: np.ndarray, pos: np.ndarray, settings: DFTSettings = DFTSettings()) -> np.ndarray:
    """``(norb, norb)`` Fock matrix of pyscf's MINAO initial-guess density (no SCF; ~0.1-2 s)."""
    mf = _mean_field(np.asarray(Z), np.asarray(pos, dtype=np.float64), settings)
    return mf.get_fock(dm=mf.get_init_guess(key="minao"))


def run_scf(Z: np.ndarray, pos: np.ndarray, settings: DFTSettings = DFTSettings()) -> SCFResult:
    """Restricted Kohn-Sham SCF of one geometry (Angstrom) with ``settings``; ``H = mf.get_fock()``."""
    mf = _mean_field(np.asarray(Z), np.asarray(pos, dtype=np.float64), settings)
    energy = mf.kernel()
    H = mf.get_fock()
    H_init = mf.get_fock(dm=mf.get_init_guess(key="minao"))
    return SCFResult(H, H_init, float(energy), bool(mf.converged), int(getattr(mf, "cycles", -1)))


def _init_worker() -> None:
    from pyscf import lib

    lib.num_threads(1)  # parallelism comes from the worker processes


def _compute(job: tuple) -> tuple:
    """Worker body: ``(name, k, Z, pos, settings)`` -> ``(name, k, Z, pos, SCFResult | error text)``."""
    name, k, Z, pos, settings = job
    try:
        return name, k, Z, pos, run_scf(Z, pos, settings)
    except Exception as exc:  # pyscf raises many types (e.g. linear dependence); record and move on
        return name, k, Z, pos, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------- the file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data (
    id INTEGER PRIMARY KEY, N INTEGER NOT NULL, Z BLOB NOT NULL, pos BLOB NOT NULL, Ham BLOB NOT NULL,
    H_init BLOB, energy REAL, scf_cycles INTEGER, name TEXT NOT NULL, conformer INTEGER NOT NULL,
    UNIQUE (name, conformer));
CREATE TABLE IF NOT EXISTS failed (
    name TEXT NOT NULL, conformer INTEGER NOT NULL, reason TEXT, energy REAL, PRIMARY KEY (name, conformer));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _settings_record(settings: DFTSettings, displacement: float, seed: int) -> dict:
    import pyscf

    return {
        "generator": "metaham qh9 generate",
        **asdict(settings),
        "displacement_angstrom": displacement,
        "seed": seed,
        "pyscf_version": pyscf.__version__,
    }


def _open_output(out: Path, settings_record: dict) -> sqlite3.Connection:
    """Create ``out`` or reopen it for resuming; refuse foreign files and changed settings."""
    existed = out.exists()
    if existed:
        with open(out, "rb") as fh:
            if not fh.read(16).startswith(b"SQLite format 3"):
                raise ValueError(f"{out}: exists and is not an SQLite database; refusing to overwrite it")
    db = sqlite3.connect(out)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if existed and tables and "meta" not in tables:
            raise ValueError(f"{out}: exists and was not written by metaham qh9 generate; choose another --out")
        db.executescript(_SCHEMA)
        stored = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        for key, value in settings_record.items():
            if key == "pyscf_version" or key not in stored:
                continue
            if stored[key] != value:
                raise ValueError(
                    f"{out}: was generated with {key}={stored[key]!r}, this run asks for {value!r}; "
                    "use another --out (one file holds one set of settings)"
                )
        with db:
            db.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in settings_record.items()],
            )
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ValueError(f"{out}: unreadable SQLite database ({exc})") from exc
    except BaseException:
        db.close()
        raise
    return db


def _store(db: sqlite3.Connection, name: str, k: int, Z: np.ndarray, pos: np.ndarray, result) -> bool:
    """One committed transaction per geometry; ``False`` when the geometry failed (recorded in ``failed``)."""
    with db:
        if isinstance(result, str) or not result.converged:
            reason = result if isinstance(result, str) else f"SCF not converged after {result.cycles} cycles"
            energy = None if isinstance(result, str) else result.energy
            db.execute(
                "INSERT OR REPLACE INTO failed (name, conformer, reason, energy) VALUES (?, ?, ?, ?)",
                (name, k, reason, energy),
            )
            return False
        db.execute(
            "INSERT INTO data (N, Z, pos, Ham, H_init, energy, scf_cycles, name, conformer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                len(Z),
                np.ascontiguousarray(Z, dtype=np.int32).tobytes(),
                np.ascontiguousarray(pos, dtype=np.float64).tobytes(),
                np.ascontiguousarray(result.H, dtype=np.float64).tobytes(),
                np.ascontiguousarray(result.H_init, dtype=np.float64).tobytes(),
                result.energy,
                result.cycles,
                name,
                k,
            ),
        )
    return True


def generate(
    out: str | os.PathLike,
    molecules: Sequence[Molecule],
    conformers: int = 1,
    displacement: float = 0.05,
    settings: DFTSettings = DFTSettings(),
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Compute and store every ``(molecule, conformer)`` not yet in ``out`` (see the module docstring).

    Args:
        out: the SQLite file to create or resume.
        molecules: geometries to start from; names must be unique.
        conformers: geometries per molecule (conformer 0 is the given one).
        displacement: standard deviation (Angstrom) of the Gaussian displacement of each coordinate.
        settings: pyscf settings (QH9's by default; only def2-SVP is supported).
        workers: processes; each runs pyscf on one thread when ``workers > 1``.
        seed: seed of the displacements.
        progress: show a progress bar with ETA on stderr.

    Returns:
        ``{"out", "total", "existing", "computed", "failed", "seconds"}``: geometries asked for, already in
        the file, newly stored, and newly failed (non-converged or erroring SCF) in this run.
    """
    settings = DFTSettings(**{**asdict(settings), "basis": normalize_basis(settings.basis)})
    if conformers < 1 or workers < 1 or seed < 0 or not np.isfinite(displacement) or displacement < 0:
        raise ValueError("conformers and workers must be >= 1, seed >= 0 and displacement a finite number >= 0")
    duplicates = sorted(n for n, count in Counter(m.name for m in molecules).items() if count > 1)
    if duplicates:
        raise ValueError(f"molecule names must be unique; repeated: {', '.join(duplicates)}")
    for m in molecules:
        _check_molecule(m.Z, f"molecule {m.name}")
    _validate_xc(settings.xc)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    db = _open_output(out, _settings_record(settings, displacement, seed))
    started = time.perf_counter()
    try:
        done = set(db.execute("SELECT name, conformer FROM data UNION SELECT name, conformer FROM failed"))
        jobs = [
            (m.name, k, m.Z, conformer(m, k, displacement, seed), settings)
            for m in molecules
            for k in range(conformers)
            if (m.name, k) not in done
        ]
        total = len(molecules) * conformers
        stats = {"out": str(out), "total": total, "existing": total - len(jobs), "computed": 0, "failed": 0}
        from tqdm import tqdm

        bar = tqdm(
            total=total, initial=stats["existing"], unit="geom", desc="SCF", file=sys.stderr, disable=not progress
        )
        try:
            for name, k, Z, pos, result in _run(jobs, workers):
                stats["computed" if _store(db, name, k, Z, pos, result) else "failed"] += 1
                bar.update(1)
        finally:
            bar.close()
    finally:
        db.close()
    stats["seconds"] = time.perf_counter() - started
    return stats


def _validate_xc(xc: str) -> None:
    from pyscf.dft import libxc

    try:
        libxc.parse_xc(xc)
    except Exception as exc:  # libxc raises KeyError/ValueError for unknown names
        raise ValueError(f"xc {xc!r} is not a functional pyscf knows ({exc})") from None


def _run(jobs: list[tuple], workers: int) -> Iterable[tuple]:
    """Results in job order: rows get ids in the same order whatever the scheduling."""
    return pyscf_map(_compute, jobs, workers)


def pyscf_map(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterable[Any]:
    """``function(job)`` for every job, results in job order, in ``workers`` processes of one pyscf thread each
    (in this process when ``workers == 1``). ``function`` must be a module-level function (it is pickled).

    The pool's processes are daemons and stop when the iteration ends, fails or is abandoned, and with the
    parent process: no pyscf worker outlives the run that started it.
    """
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield function(job)
        return
    import multiprocessing

    # spawn, not fork: a forked child of a process that already ran OpenMP code can hang in pyscf.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap(function, jobs, chunksize=1)
