"""An eigen-aware loss: the predicted Kohn-Sham matrix seen in the eigenbasis of the true one.

Matrix MAE treats every entry alike, but orbital energies and orbitals depend on a few directions of H much
more than on others, and a small error along a high virtual direction can put a spurious eigenvalue below the
occupied ones (issue 13 measured exactly that). This loss looks at the prediction where the metrics look.

With the true generalized eigenproblem ``H* C = S C eps`` (``C^T S C = 1``), the prediction in that basis is
``M = C^T H C``. For the exact prediction ``M = diag(eps)``. Four terms, all needing no eigenvector
derivatives (``C`` comes from the target and carries no gradient):

* **alignment** (after WANet's wavefunction alignment, in our own formulation): the mean square of
  ``(M - diag(eps)) / scale`` over the rows of the occupied orbitals and the LUMO (its whole degenerate level)
  and all columns. To first order in the error, the diagonal entries are the orbital-energy errors and the
  off-diagonal ones, divided by orbital-energy gaps, the mixing of each kept orbital with every other, so the
  term targets ``eps``, ``psi``, HOMO, LUMO and gap. A mean square is invariant under the arbitrary choice of
  basis within a degenerate level of the kept rows and under the signs of eigenvectors.
* **virtual**: the same mean square over the virtual-virtual block. Alignment alone leaves that block free,
  and it is where a matrix loss is blind: ``C`` is S-orthonormal, so a virtual direction built on a small
  eigenvalue ``s`` of the overlap turns a matrix error into an error ``~1/s`` times larger (measured on the
  results set's plain sparse model: mean square 4.5 in this block against 0.005 for the matrix entries, in
  units of ``scale``). Such errors make spurious low virtual eigenvalues, and by Weyl's inequality the
  spectral norm of ``M - diag(eps)`` bounds every eigenvalue's error, so alignment plus this term bound them all.
* **density**: the first-order error of the density matrix an SCF would start from. An occupied orbital
  ``i`` mixes with a virtual one ``a`` by ``kappa_ia = M_ia / (eps_a - eps_i)``, and the start density
  ``D = 2 C_occ C_occ^T`` changes by ``||dD||_S^2 = tr(dD S dD S) = 8 sum_ia kappa_ia^2``; the term is
  ``sum_ia kappa_ia^2 / nocc`` (dimensionless; no ``scale``). It weighs each error by the gap it must cross,
  so the virtuals close above the HOMO count most, and it ignores mixing inside the occupied space, which does
  not change ``D``. Invariant under rotations within degenerate levels (equal gaps within a pair of levels).
* **spurious-eigenvalue hinge**: the eigenvalues of the virtual block ``M_vv`` (the prediction restricted to
  the true virtual space) must stay above the middle of the true HOMO-LUMO gap: ``mean(relu(mid - lambda))
  / scale`` over those eigenvalues. ``eigvalsh``'s gradient ``v v^T`` is finite at degenerate eigenvalues (only
  eigenvector gradients divide by gaps), so the term is stable.

In training (``train.eigen_loss: {alignment: w_a, virtual: w_v, density: w_d, hinge: w_h}``, all 0 by
default) :func:`batch_eigen_loss` adds the weighted sum of the four terms, averaged over the batch's
molecules, to the matrix loss; the true basis is solved on the fly (one overlap matrix, cached by
:mod:`metaham.qh9.overlap`, and one ``eigh`` per molecule). Measured (docs/results_qh9.md): with 240 training
conformers no weighting helped held-out ones (the terms overfit); with 1,152, alignment 0.01 cut the
orbital-energy error 2.5x for 12% more matrix error (two seeds). They stay off by default.

Example::

    basis = true_eigenbasis(H_true, S, nocc)                     # once per molecule, no gradient
    terms = eigen_loss(H_pred, basis, scale=model.output_scale)  # EigenTerms(alignment, virtual, density, hinge)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

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


class EigenTerms(NamedTuple):
    """The four terms of one molecule (see the module docstring), each a 0-dim tensor."""

    alignment: Tensor
    virtual: Tensor
    density: Tensor
    hinge: Tensor


def eigen_loss(H_pred: Tensor, basis: TrueEigenbasis, scale: Tensor | float = 1.0) -> EigenTerms:
    """The :class:`EigenTerms` of one molecule's predicted ``(n, n)`` matrix (see the module docstring), in units
    of ``scale`` (the model's output scale, as the matrix loss uses); differentiable in ``H_pred``."""
    C = basis.C.to(H_pred.device)
    H = 0.5 * (H_pred + H_pred.mT)  # the metrics symmetrise too: an antisymmetric part has no eigen-meaning
    M = C.T.to(H.dtype) @ H @ C.to(H.dtype)
    eps = basis.eps.to(M)
    error = (M - torch.diag(eps)) / scale
    alignment = error[: basis.kept].pow(2).mean()
    block = M[basis.nocc :, basis.nocc :]  # the prediction restricted to the true virtual space
    lowest = torch.linalg.eigvalsh(0.5 * (block + block.mT))
    hinge = (torch.relu(basis.midgap.to(M) - lowest) / scale).mean()
    gaps = eps[basis.nocc :] - eps[: basis.nocc, None]  # (occupied, virtual), > 0 for a non-zero true gap
    density = (M[: basis.nocc, basis.nocc :] / gaps).pow(2).sum() / basis.nocc
    return EigenTerms(alignment, error[basis.nocc :, basis.nocc :].pow(2).mean(), density, hinge)


@dataclass(frozen=True)
class EigenWeights:
    """The weights of the four terms in training (``train.eigen_loss``, the fields of :class:`EigenTerms`); all
    zero: the loss is off."""

    alignment: float = 0.0
    virtual: float = 0.0
    density: float = 0.0
    hinge: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.alignment or self.virtual or self.density or self.hinge)


def batch_eigen_loss(
    H_pred: Sequence[Tensor], H_true: Sequence[Tensor], Z: Sequence[Tensor], pos: Sequence[Tensor],
    weights: EigenWeights, scale: Tensor | float = 1.0,
) -> Tensor:
    """Mean over molecules of the weighted sum of the :class:`EigenTerms` for full predicted
    matrices ``H_pred`` (for a residual model: ``H_init`` plus the network's part) against ``H_true``."""
    from .basis import n_occupied
    from .overlap import overlap

    total = []
    for pred, true, z, r in zip(H_pred, H_true, Z, pos, strict=True):
        z_np = z.detach().cpu().numpy()
        # torch.tensor copies: the overlap matrix comes from a read-only cache.
        S = torch.tensor(overlap(z_np, r.detach().cpu().numpy()), device=true.device)
        terms = eigen_loss(pred, true_eigenbasis(true, S, n_occupied(z_np)), scale)
        total.append(sum(getattr(weights, name) * term for name, term in terms._asdict().items()))
    return torch.stack(total).mean()
