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

With ``shard``, a run computes only its share of the job and records which share it is; see
:mod:`metaham.qh9.shards` for the partition and for merging the shard files.
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
from metaham.text import bar_disabled

from .basis import N_AO, UnsupportedError, check_elements, n_orbitals, normalize_basis
from .shards import Shard, assign, brief, job_record


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


# Atoms closer than this (Angstrom) are a broken geometry (the shortest bond, H2's, is 0.74 A), not chemistry.
MIN_DISTANCE = 0.3
# pyscf B3LYP/def2-SVP SCF seconds on one core ~ SCF_SECONDS_24 * (norb / 24) ** SCF_EXPONENT: fitted to water
# (24 AOs, 0.98 s, 9 cycles) and benzene (114 AOs, 26.7 s, 9 cycles) with QH9's settings on this project's 2-core
# VM, one pyscf thread (2026-12-05; `run_scf` timed). A guide for refusing and for the ETA, not a promise.
SCF_SECONDS_24, SCF_EXPONENT = 0.98, 2.1
# Refused above this many atomic orbitals unless raised: ~15 min per geometry by the estimate (QH9's largest
# molecules have ~230). A 200-atom molecule (~1,500 AOs) would take hours per geometry.
MAX_ORBITALS = 600


def _check_molecule(Z: np.ndarray, where: str) -> None:
    if len(Z) == 0:
        raise InvalidValueError(f"{where}: no atoms")
    check_elements(Z, where)
    if int(Z.sum()) % 2:
        raise UnsupportedError(f"{where}: odd number of electrons ({int(Z.sum())}); only closed shells are supported")


def check_geometry(Z: np.ndarray, pos: np.ndarray, where: str) -> None:
    """Refuse a geometry no SCF should be started on: no atoms, a non-finite coordinate, coincident atoms
    (closer than :data:`MIN_DISTANCE`); the :class:`~metaham.errors.InvalidValueError` names the atoms."""
    _check_molecule(Z, where)
    pos = np.asarray(pos, dtype=np.float64)
    if pos.shape != (len(Z), 3):
        raise InvalidValueError(f"{where}: positions of shape {pos.shape} for {len(Z)} atoms")
    bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
    if bad.size:
        raise InvalidValueError(f"{where}: atom {int(bad[0])} has a non-finite coordinate {pos[bad[0]].tolist()}")
    distance = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.diag(np.full(len(Z), np.inf))
    i, j = np.unravel_index(int(np.argmin(distance)), distance.shape) if len(Z) > 1 else (0, 0)
    if len(Z) > 1 and distance[i, j] < MIN_DISTANCE:
        raise InvalidValueError(
            f"{where}: atoms {min(i, j)} and {max(i, j)} are {distance[i, j]:.3g} A apart (< {MIN_DISTANCE} A): "
            "coincident atoms"
        )


def estimated_scf_seconds(norb: int) -> float:
    """Rough one-core seconds of one SCF of a molecule with ``norb`` atomic orbitals (see :data:`SCF_EXPONENT`)."""
    return SCF_SECONDS_24 * (norb / 24) ** SCF_EXPONENT


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
        check_geometry(Z, atoms.positions, f"{path} frame {i}" if len(frames) > 1 else str(path))
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


class _CostClock:
    """Time left, by estimated cost: geometries differ ~100x in SCF time, so a count-based ETA misleads. The
    estimates give the shares; the measured pace (elapsed per estimated second done) gives the scale."""

    def __init__(self, costs: list[float]):
        self.costs, self.done, self.started = costs, 0, time.perf_counter()

    def step(self) -> str:
        self.done += 1
        done = sum(self.costs[: self.done])
        left = sum(self.costs[self.done :]) * (time.perf_counter() - self.started) / max(done, 1e-9)
        return f"~{left / 60:.1f} min left (cost-weighted)"


def _init_worker(parent: int) -> None:
    _exit_with_parent(parent)  # first: the parent may die while pyscf is still importing
    from pyscf import lib

    lib.num_threads(1)  # parallelism comes from the worker processes


def _exit_with_parent(parent: int) -> None:
    """End this worker when process ``parent`` dies, even by kill -9 (a pool's own clean-up never runs then): the
    kernel's parent-death signal on Linux, else a thread that watches the parent's pid. A parent already gone
    (this process was re-parented before getting here) ends it at once."""
    import signal
    import threading

    if os.getppid() != parent:
        os._exit(1)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0 and os.getppid() == parent:
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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
        if stored and ("shard" in stored) != ("shard" in settings_record):
            was = f"as shard {stored['shard']}" if "shard" in stored else "without --shard"
            raise ValueError(f"{out}: was generated {was}; use another --out (one file holds one shard or a whole job)")
        for key, value in settings_record.items():
            if key == "pyscf_version" or key not in stored:
                continue
            if stored[key] != value:
                raise ValueError(
                    f"{out}: was generated with {key}={brief(stored[key])}, this run asks for {brief(value)}; "
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


def _store(
    db: sqlite3.Connection, name: str, k: int, Z: np.ndarray, pos: np.ndarray, result, row_id: int | None
) -> bool:
    """One committed transaction per geometry; ``False`` when the geometry failed (recorded in ``failed``).

    ``row_id`` ``None`` numbers the row after the last one (an unsharded file); a shard gives its job position.
    """
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
            "INSERT INTO data (id, N, Z, pos, Ham, H_init, energy, scf_cycles, name, conformer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row_id,
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
    progress: bool | None = True,
    shard: Shard | None = None,
    max_orbitals: int = MAX_ORBITALS,
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
        progress: a progress bar with ETA on stderr (None: only when stderr is a terminal).
        shard: compute only this share of the job (:mod:`metaham.qh9.shards`); rows then carry their job
            position + 1 as id, and the file records the shard and the job.
        max_orbitals: refuse molecules with more atomic orbitals (cost grows ~ norb^2.1, see
            :func:`estimated_scf_seconds`) before any SCF starts.

    Every geometry (each conformer) is checked by :func:`check_geometry` before any SCF starts.

    Returns:
        ``{"out", "total", "existing", "computed", "failed", "seconds"}``: geometries asked for (this shard's
        share with ``shard``), already in the file, newly stored, and newly failed (non-converged or erroring
        SCF) in this run; with ``shard`` also ``"shard"`` (``"K/N"``) and ``"job_total"``.
    """
    settings = DFTSettings(**{**asdict(settings), "basis": normalize_basis(settings.basis)})
    if conformers < 1 or workers < 1 or seed < 0 or not np.isfinite(displacement) or displacement < 0:
        raise ValueError("conformers and workers must be >= 1, seed >= 0 and displacement a finite number >= 0")
    duplicates = sorted(n for n, count in Counter(m.name for m in molecules).items() if count > 1)
    if duplicates:
        raise ValueError(f"molecule names must be unique; repeated: {', '.join(duplicates)}")
    for m in molecules:
        _check_molecule(m.Z, f"molecule {m.name}")
        norb = n_orbitals(m.Z)
        if norb > max_orbitals:
            hours = estimated_scf_seconds(norb) / 3600
            raise InvalidValueError(
                f"molecule {m.name}: {norb} atomic orbitals ({len(m.Z)} atoms) is more than max_orbitals "
                f"{max_orbitals}; one SCF would take ~{hours:.1f} h on one core (estimate); raise the limit "
                "(--max-orbitals) to run it anyway"
            )
    _validate_xc(settings.xc)

    job = [(m, k) for m in molecules for k in range(conformers)]  # position p (id p + 1 when nothing fails)
    record = _settings_record(settings, displacement, seed)
    extra = {}
    if shard is None:
        positions = [(m, k, None) for m, k in job]
    else:
        shard_of = assign([n_orbitals(m.Z) ** 3 for m, _ in job], shard.count)
        positions = [(m, k, p + 1) for p, (m, k) in enumerate(job) if shard_of[p] == shard.index]
        names = [m.name for m in molecules]
        record.update(
            job=job_record(names, [m.Z for m in molecules], [m.pos for m in molecules], conformers),
            shard=str(shard), shard_geometries=len(positions), job_molecules=names,
        )
        extra = {"shard": str(shard), "job_total": len(job)}

    for m, k, _ in positions:  # before the file exists: a refused job writes nothing
        check_geometry(m.Z, conformer(m, k, displacement, seed), f"molecule {m.name} conformer {k}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    db = _open_output(out, record)
    started = time.perf_counter()
    try:
        done = set(db.execute("SELECT name, conformer FROM data UNION SELECT name, conformer FROM failed"))
        todo = [(m, k, row_id) for m, k, row_id in positions if (m.name, k) not in done]
        jobs = [(m.name, k, m.Z, conformer(m, k, displacement, seed), settings) for m, k, _ in todo]
        total = len(positions)
        stats = {"out": str(out), "total": total, "existing": total - len(jobs), "computed": 0, "failed": 0, **extra}
        from tqdm import tqdm

        bar = tqdm(
            total=total, initial=stats["existing"], unit="geom", desc="SCF", file=sys.stderr,
            disable=bar_disabled(progress),
        )
        eta = _CostClock([estimated_scf_seconds(n_orbitals(job[2])) for job in jobs])
        try:
            for (_, _, row_id), (name, k, Z, pos, result) in zip(todo, _run(jobs, workers)):
                stats["computed" if _store(db, name, k, Z, pos, result, row_id) else "failed"] += 1
                bar.set_postfix_str(eta.step(), refresh=False)
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
    """``function(job)`` for every job, results in job order, in ``workers`` processes (this one when ``workers ==
    1`` or there is one job), each running pyscf on one thread. ``function`` must be a module-level function (it
    is pickled). One thread everywhere keeps results independent of the worker count and of the run: with several
    OpenMP threads pyscf sums in a varying order, and two runs of one geometry can differ in their last digits.

    The pool's processes are daemons and stop when the iteration ends, fails or is abandoned, and with the
    parent process: no pyscf worker outlives the run that started it.
    """
    if workers == 1 or len(jobs) <= 1:
        from pyscf import lib

        for job in jobs:
            with lib.with_omp_threads(1):
                result = function(job)
            yield result  # outside the block: the caller's own work keeps its thread count
        return
    import multiprocessing

    # spawn, not fork: a forked child of a process that already ran OpenMP code can hang in pyscf.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        yield from pool.imap(function, jobs, chunksize=1)
