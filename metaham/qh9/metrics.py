"""QH9's evaluation metrics, exactly as QH9 defines them, computed for many molecules at once.

Per molecule (then averaged over molecules, as QH9's test loop does with one molecule per batch):

* ``h_mae``: mean ``|H_pred - H_true|`` over all ``norb x norb`` entries (Hartree).
* ``h_diag_mae`` / ``h_offdiag_mae``: the same mean over the entries of the atom-diagonal blocks / of all
  other blocks (QH9's diagonal and non-diagonal block MAEs).
* ``eps_mae``: mean over the occupied orbitals (``nocc = sum(Z) / 2``) of ``|eps_pred_i - eps_true_i|``, the
  orbital energies of the generalized eigenproblem ``H C = S C eps`` (ascending), ``S`` the def2-SVP overlap.
* ``psi_cos``: mean over the occupied orbitals of ``|cos(C_pred[:, i], C_true[:, i])|``, the plain cosine of
  the AO coefficient vectors (the absolute value removes the arbitrary sign of an eigenvector).
* ``homo_err``, ``lumo_err``, ``gap_err``: ``|pred - true|`` of the HOMO (``eps[nocc - 1]``), LUMO
  (``eps[nocc]``) and their difference.

Both routes solve the eigenproblem in float64. :func:`molecule_errors` does it batched for molecules of one
size: one Cholesky factor ``S = L L^T`` serves prediction and target, the lowest eigenpairs of
``L^-1 H L^-T`` (the occupied orbitals and the LUMO, :mod:`metaham.qh9.eigensolve`) are found for the stacked
pair, ``C = L^-T V`` (the same eigenpairs as QH9's Loewdin route, ``X = U s^-1/2``, up to each eigenvector's sign
and the basis chosen within a degenerate level -- which no metric that QH9 defines can tell apart except ``psi``
on exactly degenerate orbitals, where QH9's own number depends on the LAPACK build and the solver).
:func:`reference_errors` is QH9's test route, one molecule at a time (pyscf ``Mole`` for the overlap, Loewdin
with eigenvalues clamped at 1e-8, two eigensolves per matrix); the benchmark measures one against the other.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .basis import BASIS, ao_atom_index, n_occupied
from .eigensolve import lowest_eigenpairs, orthonormal_problem

MICRO = 1e6  # Hartree -> micro-Hartree
# Per-molecule error -> name of its mean in a summary (micro-Hartree; psi in percent).
SUMMARY_NAMES = {
    "h_mae": "h_mae_ueh",
    "h_diag_mae": "h_diag_mae_ueh",
    "h_offdiag_mae": "h_offdiag_mae_ueh",
    "eps_mae": "eps_mae_ueh",
    "psi_cos": "psi_cos_pct",
    "homo_err": "homo_mae_ueh",
    "lumo_err": "lumo_mae_ueh",
    "gap_err": "gap_mae_ueh",
}


def molecule_errors(H_pred: Tensor, H_true: Tensor, S: Tensor, atom_of: Tensor, nocc: Tensor) -> dict[str, Tensor]:
    """QH9 errors of ``m`` molecules with the same number of AOs ``n``, batched.

    Args:
        H_pred, H_true: ``(m, n, n)`` Kohn-Sham matrices, pyscf order (Hartree; cast to float64).
        S: ``(m, n, n)`` overlap matrices.
        atom_of: ``(m, n)`` long, the atom of each AO (for the diagonal-block mask).
        nocc: ``(m,)`` long, occupied orbitals per molecule.

    Returns:
        :data:`SUMMARY_NAMES`' keys -> ``(m,)`` float64 tensors (Hartree; ``psi_cos`` a fraction in [0, 1]).

    Raises:
        ValueError: naming the molecules (positions in the batch) whose prediction holds a NaN or an infinity, or
            whose overlap is not positive definite.
    """
    f64 = torch.float64
    H_pred, H_true, S = H_pred.to(f64), H_true.to(f64), S.to(f64)
    m, n, _ = S.shape
    nocc = nocc.to(S.device)
    bad = torch.nonzero(~torch.isfinite(H_pred).flatten(1).all(1)).flatten().tolist()
    if bad:
        raise ValueError(f"predicted matrix holds a non-finite value (NaN or inf) for molecule(s) {bad} of the batch")
    H = torch.stack([H_pred, H_true])
    # The solvers read one triangle and a prediction need not be exactly symmetric: symmetrise it first.
    L, A = orthonormal_problem(0.5 * (H + H.mT), S)
    # Only what the metrics read: the occupied orbitals' energies and coefficients, and the LUMO's energy.
    k = int(nocc.max())
    eps, V = lowest_eigenpairs(A, min(k + 1, n), k)  # (2, m, k + 1), (2, m, n, k)
    C = torch.linalg.solve_triangular(L.mT, V, upper=True)  # (2, m, n, k), columns are orbitals

    abs_err = (H_pred - H_true).abs()
    same_atom = atom_of[:, :, None] == atom_of[:, None, :]
    n_diag = same_atom.sum((1, 2)).to(f64)
    h_diag = (abs_err * same_atom).sum((1, 2)) / n_diag
    h_off = (abs_err * ~same_atom).sum((1, 2)) / (n * n - n_diag)  # 0/0 = nan for a single atom

    occupied = (torch.arange(eps.shape[-1], device=S.device)[None, :] < nocc[:, None]).to(f64)
    eps_err = (eps[0] - eps[1]).abs()
    cos = (C[0] * C[1]).sum(1).abs() / (C[0].norm(dim=1) * C[1].norm(dim=1))  # (m, k)
    rows = torch.arange(m, device=S.device)
    homo = eps[:, rows, (nocc - 1).clamp(min=0)]
    homo = torch.where(nocc > 0, homo, torch.full_like(homo, float("nan")))  # no electron pair: no HOMO
    lumo = eps[:, rows, nocc.clamp(max=n - 1)]
    lumo = torch.where(nocc < n, lumo, torch.full_like(lumo, float("nan")))  # no virtual orbital: no LUMO
    return {
        "h_mae": abs_err.mean((1, 2)),
        "h_diag_mae": h_diag,
        "h_offdiag_mae": h_off,
        "eps_mae": (eps_err * occupied).sum(1) / nocc,
        "psi_cos": (cos * occupied[:, :k]).sum(1) / nocc,
        "homo_err": (homo[0] - homo[1]).abs(),
        "lumo_err": (lumo[0] - lumo[1]).abs(),
        "gap_err": ((lumo[0] - homo[0]) - (lumo[1] - homo[1])).abs(),
    }


def summarize(per_molecule: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over molecules in QH9's units: ``n``, ``h_mae_ueh``, ``h_diag_mae_ueh``, ``h_offdiag_mae_ueh``,
    ``eps_mae_ueh``, ``psi_cos_pct``, ``homo_mae_ueh``, ``lumo_mae_ueh``, ``gap_mae_ueh``."""

    def mean(key: str) -> float:
        values = np.asarray(per_molecule[key], dtype=np.float64)
        values = values[np.isfinite(values)]  # single-atom molecules have no off-diagonal block, no LUMO ...
        return float(values.mean()) if values.size else float("nan")

    out: dict[str, float] = {"n": int(len(per_molecule["h_mae"]))}
    for key, name in SUMMARY_NAMES.items():
        out[name] = (100.0 if key == "psi_cos" else MICRO) * mean(key)
    return out


def reference_errors(H_pred: np.ndarray, H_true: np.ndarray, Z: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    """QH9's official test route for one molecule (float64): pyscf ``Mole`` overlap, Loewdin orthogonalisation
    with overlap eigenvalues clamped at 1e-8, two eigensolves per matrix, metrics as in :func:`molecule_errors`.

    Args:
        H_pred, H_true: ``(norb, norb)`` pyscf order. Z: ``(n_atoms,)``. pos: ``(n_atoms, 3)`` Angstrom.
    """
    from pyscf import gto

    mol = gto.M(atom=[[int(z), tuple(p)] for z, p in zip(Z, pos)], basis=BASIS, unit="ang", verbose=0)
    S = torch.from_numpy(mol.intor("int1e_ovlp")).unsqueeze(0)

    def orbitals(H: Tensor) -> tuple[Tensor, Tensor]:
        s, U = torch.linalg.eigh(S)
        s = torch.where(s > 1e-8, s, torch.full_like(s, 1e-8))
        X = U / torch.sqrt(s).unsqueeze(-2)
        eps, C = torch.linalg.eigh(X.mT @ H @ X)
        return eps, X @ C

    Hp = torch.as_tensor(H_pred, dtype=torch.float64).unsqueeze(0)
    Ht = torch.as_tensor(H_true, dtype=torch.float64).unsqueeze(0)
    eps_p, C_p = orbitals(Hp)
    eps_t, C_t = orbitals(Ht)
    nocc = n_occupied(Z)
    atom_of = torch.from_numpy(ao_atom_index(Z))
    diag = (atom_of[:, None] == atom_of[None, :]).unsqueeze(0)
    err = (Hp - Ht).abs()
    homo_p, homo_t = eps_p[:, nocc - 1], eps_t[:, nocc - 1]
    lumo_p, lumo_t = eps_p[:, nocc], eps_t[:, nocc]
    values = {
        "h_mae": err.mean(),
        "h_diag_mae": err[diag].mean(),
        "h_offdiag_mae": err[~diag].mean(),
        "eps_mae": (eps_p[:, :nocc] - eps_t[:, :nocc]).abs().mean(),
        "psi_cos": torch.cosine_similarity(C_p[:, :, :nocc], C_t[:, :, :nocc], dim=1).abs().mean(),
        "homo_err": (homo_p - homo_t).abs().mean(),
        "lumo_err": (lumo_p - lumo_t).abs().mean(),
        "gap_err": ((lumo_p - homo_p) - (lumo_t - homo_t)).abs().mean(),
    }
    return {k: v.item() for k, v in values.items()}
