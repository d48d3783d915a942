"""The eigen-aware loss: zero at the truth, right gradients, invariant where it must be, and it sees what the
metrics see (orbital energies to first order, spurious low eigenvalues)."""
import math

import numpy as np
import pytest
import torch

from metaham.qh9.basis import n_occupied, n_orbitals
from metaham.qh9.eigen_loss import eigen_loss, true_eigenbasis
from metaham.qh9.orbitals import wigner_D

Z = np.array([8, 1, 1])  # water's def2-SVP layout: 24 AOs, 5 occupied orbitals


def _problem(seed: int = 0):
    """A symmetric 'Fock' matrix and an SPD 'overlap' of water's size (the loss is pure linear algebra)."""
    g = torch.Generator().manual_seed(seed)
    n = n_orbitals(Z)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    S = torch.eye(n, dtype=torch.float64) + 0.1 * (A @ A.T) / n
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = 0.5 * (B + B.T) + torch.diag(torch.linspace(-20.0, 5.0, n, dtype=torch.float64))
    return H, S, n_occupied(Z)


def _symmetric_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(like.shape, generator=g, dtype=torch.float64)
    return 0.5 * (noise + noise.T)


def test_zero_at_the_truth_and_positive_elsewhere():
    H, S, nocc = _problem()
    basis = true_eigenbasis(H, S, nocc)
    torch.testing.assert_close(basis.C.T @ S @ basis.C, torch.eye(len(H), dtype=torch.float64))
    alignment, virtual, density, hinge = eigen_loss(H, basis)
    assert float(alignment) < 1e-24 and float(virtual) < 1e-24 and float(density) < 1e-24 and float(hinge) == 0.0
    terms = eigen_loss(H + 1e-3 * _symmetric_noise(H, 10), basis)
    assert float(terms.alignment) > 0 and float(terms.virtual) > 0 and float(terms.density) > 0


def test_density_is_the_first_order_error_of_the_start_density():
    """tr(dD S dD S) = 8 nocc * density + O(|dH|^3), dD the change of D = 2 C_occ C_occ^T (the SCF start)."""
    from metaham.qh9.scf import predicted_density

    H, S, nocc = _problem(11)
    basis = true_eigenbasis(H, S, nocc)
    dH = _symmetric_noise(H, 12)
    D = predicted_density(H.numpy(), S.numpy(), nocc)
    for size in (1e-3, 1e-4):
        P = H + size * dH
        dD = predicted_density(P.numpy(), S.numpy(), nocc) - D
        exact = float(np.trace(dD @ S.numpy() @ dD @ S.numpy()))
        first_order = 8 * nocc * float(eigen_loss(P, basis).density)
        assert abs(exact / first_order - 1) < 5 * size  # measured 0.64 * size: the next order


def test_alignment_and_virtual_see_their_own_blocks_of_the_error():
    """An error confined to the virtual-virtual block of M is invisible to alignment and seen by virtual; one in
    the occupied block the other way round: together they cover the whole spectrum (Weyl's inequality)."""
    H, S, nocc = _problem(9)
    basis = true_eigenbasis(H, S, nocc)
    SC = S @ basis.C  # H' = SC M' (SC)^T has M' = C^T H' C in the true basis
    for block, seen in ((slice(basis.kept + 1, None), "virtual"), (slice(0, nocc), "alignment")):  # diagonal blocks
        M = torch.diag(basis.eps).clone()
        M[block, block] += 1e-2 * torch.eye(len(H), dtype=torch.float64)[block, block]
        terms = eigen_loss(SC @ M @ SC.T, basis)._asdict()
        assert float(terms[seen]) > 1e-6
        unseen = "alignment" if seen == "virtual" else "virtual"
        assert float(terms[unseen]) < 1e-20 and float(terms["density"]) < 1e-20  # no occupied-virtual mixing


def test_gradient_matches_finite_differences():
    H, S, nocc = _problem(1)
    basis = true_eigenbasis(H, S, nocc)
    g = torch.Generator().manual_seed(2)
    P = H + 0.5 * torch.randn(H.shape, generator=g, dtype=torch.float64)
    P[-1, -1] = float(basis.midgap) - 3.0  # a virtual direction below the gap: the hinge is active too
    P.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: torch.stack(eigen_loss(x, basis, scale=0.7)), (P,), eps=1e-6, atol=1e-6)


def test_first_order_orbital_energies_are_the_diagonal_in_the_true_basis():
    """eps_pred_i = M_ii + O(|dH|^2): the alignment term's diagonal is the orbital-energy error to first order."""
    H, S, nocc = _problem(3)
    basis = true_eigenbasis(H, S, nocc)
    dH = _symmetric_noise(H, 4)
    for size in (1e-3, 1e-4):
        predicted = true_eigenbasis(H + size * dH, S, nocc).eps
        M = basis.C.T @ (H + size * dH) @ basis.C
        error = (predicted[:nocc] - M.diagonal()[:nocc]).abs().max()
        assert error < 50 * size**2  # second order: 100x smaller for a 10x smaller perturbation


def test_invariant_under_rotating_the_molecule():
    H, S, nocc = _problem(5)
    g = torch.Generator().manual_seed(6)
    P = H + 0.1 * torch.randn(H.shape, generator=g, dtype=torch.float64)
    angle = 0.9
    R = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                      [0.0, 0.0, 1.0]], dtype=torch.float64)
    D = wigner_D(Z, R)
    here = eigen_loss(P, true_eigenbasis(H, S, nocc), scale=0.3)
    rotated = eigen_loss(D @ P @ D.T, true_eigenbasis(D @ H @ D.T, D @ S @ D.T, nocc), scale=0.3)
    for a, b in zip(here, rotated):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_the_hinge_sees_a_spurious_low_eigenvalue_and_its_gradient_lifts_it():
    H, S, nocc = _problem(7)
    basis = true_eigenbasis(H, S, nocc)
    # Lower one true virtual orbital's energy far below the occupied ones: a spurious eigenvalue.
    c = S @ basis.C[:, -1]
    P = (H - 40.0 * torch.outer(c, c)).requires_grad_(True)
    spurious = float(true_eigenbasis(P.detach(), S, nocc).eps[0])
    assert spurious < float(basis.eps[0])
    hinge = eigen_loss(P, basis).hinge
    assert float(hinge.detach()) > 0
    hinge.backward()
    lifted = true_eigenbasis(P.detach() - 1.0 * P.grad, S, nocc).eps[0]
    assert float(lifted) > spurious


def test_a_degenerate_lumo_level_is_kept_whole_and_needs_a_virtual_space():
    H, S, nocc = _problem(8)
    basis = true_eigenbasis(H, S, nocc)
    # Make the LUMO doubly degenerate: H' = S C diag(eps') C^T S with eps'[nocc + 1] = eps'[nocc].
    eps = basis.eps.clone()
    eps[nocc + 1] = eps[nocc]
    SC = S @ basis.C
    degenerate = true_eigenbasis(SC @ torch.diag(eps) @ SC.T, S, nocc)
    assert basis.kept == nocc + 1 and degenerate.kept == nocc + 2
    with pytest.raises(ValueError, match="nocc"):
        true_eigenbasis(H, S, len(H))


def test_the_config_switch_adds_the_terms_for_the_full_predicted_matrices(tmp_path, monkeypatch):
    """With train.eigen_loss on, every training step adds batch_eigen_loss of H_init + the network's part (the
    matrices the model predicts), and the updates differ from a run without it."""
    from metaham.qh9 import generate as gen
    from metaham.qh9 import train as qh9_train
    from metaham.qh9.eigen_loss import EigenWeights, batch_eigen_loss
    from tests.qh9.test_qh9_train import _sets

    data = tmp_path / "water.db"
    gen.generate(data, gen.g2_molecules(["H2O"]), conformers=10, displacement=0.1, progress=False)
    calls = []

    def spy(H_pred, H_true, Z, pos, weights, scale):
        calls.append((weights, [h.detach().clone() for h in H_pred], [h.clone() for h in H_true]))
        return batch_eigen_loss(H_pred, H_true, Z, pos, weights, scale)

    monkeypatch.setattr(qh9_train, "batch_eigen_loss", spy)
    runs = {}
    for name, weight in (("plain", 0.0), ("eigen", 1.0)):
        sets = {"train.epochs": 2, "data.file": data, "train.eigen_loss.alignment": weight,
                "train.eigen_loss.virtual": weight, "train.eigen_loss.density": weight,
                "train.eigen_loss.hinge": weight}
        qh9_train.train(qh9_train.load_train_config(None, _sets(sets)), tmp_path / name, progress=False)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    steps = 2 * 1  # 8 training rows, batch 8: one step per epoch
    assert len(calls) == steps and all(w == EigenWeights(1.0, 1.0, 1.0, 1.0) for w, _, _ in calls)
    # The spied matrices are full Kohn-Sham matrices: near the truth (the residual model starts at MINAO's
    # guess), far from the residual target H - H_init whose entries are small.
    _, predicted, true = calls[0]
    assert max(float((p - t).abs().max()) for p, t in zip(predicted, true)) < 1.0
    changed = [k for k in runs["plain"] if not torch.equal(runs["plain"][k], runs["eigen"][k])]
    assert changed, "the eigen terms did not change the updates"
