"""An eigen-aware loss: the predicted Kohn-Sham matrix seen in the eigenbasis of the true one.

Matrix MAE treats every entry alike, but orbital energies and orbitals depend on a few directions of H much
more than on others, and a small error along a high virtual direction can put a spurious eigenvalue below the
occupied ones (issue 13 measured exactly that). This loss looks at the prediction where the metrics look.

With the true generalized eigenproblem ``H* C = S C eps`` (``C^T S C = 1``), the prediction in that basis is
``M = C^T H C``. For the exact prediction ``M = diag(eps)``. Two terms, both needing no eigenvector
derivatives (``C`` comes from the target and carries no gradient):

* **alignment** (after WANet's wavefunction alignment, in our own formulation): the mean square of
  ``(M - diag(eps)) / scale`` over the rows of the occupied orbitals and the LUMO (its whole degenerate level)
  and all columns. To first order in the error, the diagonal entries are the orbital-energy errors and the
  off-diagonal ones, divided by orbital-energy gaps, the mixing of each kept orbital with every other, so the
  term targets ``eps``, ``psi``, HOMO, LUMO and gap. A mean square is invariant under the arbitrary choice of
  basis within a degenerate level of the kept rows and under the signs of eigenvectors.
* **spurious-eigenvalue hinge**: the eigenvalues of the virtual block ``M_vv`` (the prediction restricted to
  the true virtual space) must stay above the middle of the true HOMO-LUMO gap: ``mean(relu(mid - lambda))
  / scale`` over those eigenvalues. ``eigvalsh``'s gradient ``v v^T`` is finite at degenerate eigenvalues (only
  eigenvector gradients divide by gaps), so the term is stable.

Example::

    basis = true_eigenbasis(H_true, S, nocc)                     # once per molecule, no gradient
    loss = eigen_loss(H_pred, basis, scale=model.output_scale)   # (alignment, hinge), each a 0-dim tensor
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Orbital energies closer than this (Hartree) are one degenerate level: the LUMO's level is kept whole.
DEGENERATE_EH = 1e-6


@dataclass(frozen=True)
class TrueEigenbasis:
    """What the loss needs from a molecule's target: the S-orthonormal eigenvectors ``C`` ``(n, n)``
    (columns ascending in energy), the energies ``eps`` ``(n,)``, the number of kept rows ``kept`` (occupied
    orbitals plus the LUMO's level) and ``nocc``; float64, no gradient."""

    C: Tensor
    eps: Tensor
    nocc: int
    kept: int

    @property
    def midgap(self) -> Tensor:
        """The middle of the true HOMO-LUMO gap (Hartree)."""
        return 0.5 * (self.eps[self.nocc - 1] + self.eps[self.nocc])


def true_eigenbasis(H_true: Tensor, S: Tensor, nocc: int) -> TrueEigenbasis:
    """Solve ``H_true C = S C eps`` in float64 (Cholesky of ``S``, then ``eigh``); ``nocc`` occupied orbitals.

    Raises ``ValueError`` when there is no virtual orbital (no LUMO, no virtual space) or ``S`` is not positive
    definite."""
    H, S = H_true.detach().to(torch.float64), S.detach().to(torch.float64)
    n = S.shape[-1]
    if not 0 < nocc < n:
        raise ValueError(f"need 0 < nocc < n orbitals for an occupied and a virtual space, got nocc={nocc}, n={n}")
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        raise ValueError("overlap matrix not positive definite (atoms too close?)")
    A = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, H, upper=False).mT, upper=False)
    eps, V = torch.linalg.eigh(0.5 * (A + A.mT))
    C = torch.linalg.solve_triangular(L.mT, V, upper=True)
    lumo_level = (eps[nocc:] - eps[nocc]).abs() < DEGENERATE_EH
    kept = nocc + int(lumo_level.sum())
    return TrueEigenbasis(C, eps, nocc, kept)


def eigen_loss(H_pred: Tensor, basis: TrueEigenbasis, scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """``(alignment, hinge)`` of one molecule's predicted ``(n, n)`` matrix (see the module docstring), in units
    of ``scale`` (the model's output scale, as the matrix loss uses); differentiable in ``H_pred``."""
    C = basis.C.to(H_pred.device)
    H = 0.5 * (H_pred + H_pred.mT)  # the metrics symmetrise too: an antisymmetric part has no eigen-meaning
    M = C.T.to(H.dtype) @ H @ C.to(H.dtype)
    target = torch.diag(basis.eps.to(M))
    alignment = ((M[: basis.kept] - target[: basis.kept]) / scale).pow(2).mean()
    virtual = M[basis.nocc :, basis.nocc :]
    lowest = torch.linalg.eigvalsh(0.5 * (virtual + virtual.mT))
    hinge = (torch.relu(basis.midgap.to(M) - lowest) / scale).mean()
    return alignment, hinge
