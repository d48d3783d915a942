"""SCF acceleration: how many fewer Kohn-Sham SCF cycles a predicted Hamiltonian needs than pyscf's MINAO guess.

A predicted H is worth something to DFT users if it starts an SCF close to its answer. For every molecule this
module runs pyscf's restricted Kohn-Sham SCF twice with exactly the file's settings (:class:`DFTSettings`,
read from the file by :meth:`DFTSettings.from_metadata`): once from MINAO's guess (pyscf's default) and once
from the density of the predicted H -- the lowest ``N/2`` orbitals of ``H C = S C e``, ``D = 2 C_occ C_occ^T``
-- and records cycles, wall time, convergence and the converged energy of each. The ratio
``cycles_pred / cycles_minao`` is the relative iteration count (RIC): below 1 the prediction saves work.
Both runs must reach the same energy (:data:`ENERGY_TOL`): the metric measures speed, never the answer, so
a larger ``|dE|`` or a run that does not converge is a failure of the measurement, reported as such.

Every SCF runs on one pyscf thread, in this process or in a worker process (``workers``): the cycles and
energies of a molecule never depend on how many workers there are.

>>> from metaham.qh9.formats import open_qh9
>>> from metaham.qh9.generate import DFTSettings
>>> from metaham.qh9.scf import scf_acceleration
>>> with open_qh9("small.db") as f:                                       # doctest: +SKIP
...     records = list(f)
...     settings = DFTSettings.from_metadata(f.metadata)
>>> summary, per_molecule = scf_acceleration(records, [r.H for r in records], settings)  # doctest: +SKIP
>>> summary["scf_ric_mean"] < 1, summary["scf_max_abs_de"] <= 1e-8        # doctest: +SKIP
(True, True)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import numpy as np

from metaham.errors import InvalidValueError, NonFiniteError
from metaham.text import bar_disabled

from .basis import n_occupied
from .formats import Record
from .generate import DFTSettings, _mean_field, pyscf_map

ENERGY_TOL = 1e-8  # Hartree: both starts must converge to the same energy within this


@dataclass(frozen=True)
class SCFStarts:
    """One molecule's two SCF runs: from MINAO's guess (``*_minao``) and from the predicted H (``*_pred``).
    Cycles are SCF iterations (Fock builds after the initial one); seconds are wall time of ``mf.kernel``;
    energies in Hartree."""

    cycles_minao: int
    cycles_pred: int
    seconds_minao: float
    seconds_pred: float
    converged_minao: bool
    converged_pred: bool
    energy_minao: float
    energy_pred: float


def predicted_density(H: np.ndarray, S: np.ndarray, nocc: int) -> np.ndarray:
    """``(norb, norb)`` closed-shell density ``2 C_occ C_occ^T`` of the ``nocc`` lowest solutions of
    ``H C = S C e`` (``C^T S C = 1``): the SCF start a predicted Hamiltonian gives."""
    from scipy.linalg import eigh

    _, C = eigh(0.5 * (H + H.T), S, subset_by_index=[0, nocc - 1])
    return 2.0 * C @ C.T


def _kernel(mf, dm0: np.ndarray | None) -> tuple[int, float, bool, float]:
    """``(cycles, seconds, converged, energy)`` of ``mf.kernel(dm0=dm0)``; cycles counted by a callback that
    pyscf calls once per iteration (every pyscf version has it, unlike ``mf.cycles``)."""
    cycles = 0

    def count(_env: dict) -> None:
        nonlocal cycles
        cycles += 1

    mf.callback = count
    started = time.perf_counter()
    energy = mf.kernel(dm0=dm0)
    seconds = time.perf_counter() - started
    return cycles, seconds, bool(mf.converged), float(energy)


def scf_starts(Z: np.ndarray, pos: np.ndarray, H_pred: np.ndarray, settings: DFTSettings = DFTSettings()) -> SCFStarts:
    """Run one molecule's SCF from MINAO's guess and from ``H_pred`` (``(norb, norb)`` pyscf order, Hartree),
    ``pos`` in Angstrom, both with ``settings``, each on a fresh mean-field object (its own grids: the two wall
    times cover the same work) and one pyscf thread."""
    from pyscf import lib

    Z = np.asarray(Z, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.float64)
    with lib.with_omp_threads(1):
        c_minao, t_minao, ok_minao, e_minao = _kernel(_mean_field(Z, pos, settings), None)
        mf = _mean_field(Z, pos, settings)
        dm0 = predicted_density(np.asarray(H_pred, dtype=np.float64), mf.mol.intor("int1e_ovlp"), n_occupied(Z))
        c_pred, t_pred, ok_pred, e_pred = _kernel(mf, dm0)
    return SCFStarts(c_minao, c_pred, t_minao, t_pred, ok_minao, ok_pred, e_minao, e_pred)


def _job(job: tuple) -> SCFStarts:
    """Worker body: ``(Z, pos, H_pred, settings)`` -> :class:`SCFStarts`."""
    return scf_starts(*job)


def summarize_scf(per_molecule: Mapping[str, np.ndarray]) -> dict[str, float | int]:
    """Aggregates of :func:`scf_acceleration`'s per-molecule arrays.

    Keys: ``scf_n`` molecules; ``scf_ric_mean`` / ``scf_ric_median`` of ``cycles_pred / cycles_minao``;
    ``scf_slower_fraction`` the share of molecules with more cycles from the prediction than from MINAO;
    ``scf_time_ratio`` the median over molecules of ``seconds_pred / seconds_minao`` (a median: one molecule's
    wall time on a shared machine can be off by a factor); ``scf_cycles_minao_mean`` / ``scf_cycles_pred_mean``;
    ``scf_max_abs_de`` the largest ``|energy_pred - energy_minao|`` (Hartree) over molecules where both runs
    converged (NaN if none did); ``scf_unconverged`` molecules where at least one run did not converge;
    ``scf_energy_ok`` whether every molecule converged twice to within :data:`ENERGY_TOL`.
    """
    ratio = np.asarray(per_molecule["ratio"], dtype=np.float64)
    both = np.asarray(per_molecule["converged_minao"]) & np.asarray(per_molecule["converged_pred"])
    de = np.asarray(per_molecule["abs_de"], dtype=np.float64)[both]
    max_de = float(de.max()) if de.size else float("nan")
    time_ratio = np.asarray(per_molecule["seconds_pred"]) / np.asarray(per_molecule["seconds_minao"])
    return {
        "scf_n": int(ratio.size),
        "scf_ric_mean": float(ratio.mean()),
        "scf_ric_median": float(np.median(ratio)),
        "scf_slower_fraction": float(np.mean(per_molecule["cycles_pred"] > per_molecule["cycles_minao"])),
        "scf_time_ratio": float(np.median(time_ratio)),
        "scf_cycles_minao_mean": float(np.mean(per_molecule["cycles_minao"])),
        "scf_cycles_pred_mean": float(np.mean(per_molecule["cycles_pred"])),
        "scf_max_abs_de": max_de,
        "scf_unconverged": int(np.sum(~both)),
        "scf_energy_ok": bool(both.all() and max_de <= ENERGY_TOL),
    }


def scf_acceleration(
    records: Sequence[Record],
    predictions: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    settings: DFTSettings,
    workers: int = 1,
    progress: bool | None = True,
) -> tuple[dict[str, float | int], dict[str, np.ndarray]]:
    """SCF from MINAO's guess and from each predicted H, for every record (see the module docstring).

    Args:
        records: the molecules (a file's rows: ``id``, ``Z``, ``pos`` in Angstrom).
        predictions: ``{row_id: (norb, norb)}`` or a list aligned with ``records``; pyscf AO order, Hartree.
        settings: the file's DFT settings (:meth:`DFTSettings.from_metadata`); the SCF runs with exactly these.
        workers: processes running pyscf (one thread each); results do not depend on it. With ``workers > 1``
            a script must call this under ``if __name__ == "__main__":`` (the processes are spawned).
        progress: a progress bar on stderr (None: only when stderr is a terminal).

    Returns:
        ``(summary, per_molecule)``: :func:`summarize_scf`'s keys, and arrays in record order: ``id``, the
        fields of :class:`SCFStarts`, ``ratio`` (``cycles_pred / cycles_minao``) and ``abs_de``.

    Raises:
        InvalidValueError: no records, ``workers < 1``, a missing prediction or one of the wrong shape.
        NonFiniteError: a prediction holding NaN or inf (named by row id).
    """
    from tqdm import tqdm

    if not len(records):
        raise InvalidValueError("SCF acceleration needs at least one molecule; none was given")
    if workers < 1:
        raise InvalidValueError(f"SCF workers must be >= 1, got {workers}")
    if not isinstance(predictions, Mapping):
        if len(predictions) != len(records):
            raise InvalidValueError(f"{len(predictions)} predictions for {len(records)} molecules")
        predictions = {r.id: H for r, H in zip(records, predictions)}
    jobs = []
    for r in records:
        if r.id not in predictions:
            raise InvalidValueError(f"row {r.id}: no predicted Hamiltonian")
        H = np.asarray(predictions[r.id], dtype=np.float64)
        if H.shape != (r.norb, r.norb):
            raise InvalidValueError(f"row {r.id}: prediction has shape {H.shape}, the molecule has {r.norb} AOs")
        if not np.isfinite(H).all():
            raise NonFiniteError(f"row {r.id}: the predicted Hamiltonian holds NaN or inf")
        jobs.append((r.Z, r.pos, H, settings))
    results = []
    with tqdm(total=len(jobs), desc="SCF", unit="mol", file=sys.stderr, disable=bar_disabled(progress)) as bar:
        for result in pyscf_map(_job, jobs, workers):
            results.append(result)
            bar.update(1)
    per_molecule = {"id": np.array([r.id for r in records], dtype=np.int64)}
    for field in fields(SCFStarts):
        per_molecule[field.name] = np.array([getattr(result, field.name) for result in results])
    per_molecule["ratio"] = per_molecule["cycles_pred"] / per_molecule["cycles_minao"]
    per_molecule["abs_de"] = np.abs(per_molecule["energy_pred"] - per_molecule["energy_minao"])
    return summarize_scf(per_molecule), per_molecule


def file_scf_acceleration(
    path: str | os.PathLike,
    predictions: Mapping[int, np.ndarray],
    workers: int = 1,
    progress: bool | None = True,
    trust_pickle: bool = False,
) -> tuple[dict[str, float | int], dict[str, np.ndarray]]:
    """:func:`scf_acceleration` of predictions ``{row_id: H}`` for rows of the QH9 file at ``path``, with the
    file's own DFT settings (what ``metaham qh9 eval --scf`` runs after scoring a model)."""
    from .formats import open_qh9

    with open_qh9(path, trust_pickle=trust_pickle) as file:
        try:
            settings = DFTSettings.from_metadata(file.metadata)
        except InvalidValueError as exc:
            raise InvalidValueError(f"{file.path}: {exc}") from None
        records = [file.get(row_id) for row_id in sorted(predictions)]
    return scf_acceleration(records, predictions, settings, workers, progress)


def scf_report(summary: Mapping[str, float | int]) -> str:
    """A few human lines about :func:`summarize_scf`'s keys, with a warning when the energies disagree or a
    run did not converge (then the cycle counts are not a fair comparison)."""
    s = summary
    lines = [
        f"SCF from MINAO vs predicted H ({s['scf_n']} molecules): {s['scf_cycles_minao_mean']:.1f} vs "
        f"{s['scf_cycles_pred_mean']:.1f} cycles on average",
        f"  cycle ratio pred/MINAO: mean {s['scf_ric_mean']:.3f}, median {s['scf_ric_median']:.3f}; slower than "
        f"MINAO: {100 * s['scf_slower_fraction']:.0f}%; wall-time ratio (median) {s['scf_time_ratio']:.3f}",
        f"  max |dE| of the converged energies: {s['scf_max_abs_de']:.2e} Eh (must be <= {ENERGY_TOL:.0e})",
    ]
    if not s["scf_energy_ok"]:
        lines.append(
            f"  WARNING: {s['scf_unconverged']} molecule(s) did not converge from both starts, or |dE| exceeds "
            f"{ENERGY_TOL:.0e} Eh: the cycle counts do not compare like with like"
        )
    return "\n".join(lines)
