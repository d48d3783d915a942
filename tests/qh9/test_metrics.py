"""QH9 metrics: equal to an independent scipy.linalg.eigh(H, S) computation, to QH9's test route, exact on truth."""
import numpy as np
import pytest
import scipy.linalg
import torch
from pyscf import gto

from metaham.qh9.evaluate import Evaluator, evaluate_predictions
from metaham.qh9.formats import open_qh9
from metaham.qh9.metrics import SUMMARY_NAMES, molecule_errors, reference_errors


def _noisy(records, scale, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        E = rng.normal(0.0, scale, r.H.shape)
        out.append(r.H + 0.5 * (E + E.T))
    return out


def _scipy_errors(H_pred, record):
    """QH9's definitions written out independently with pyscf's overlap and scipy's generalized eigh."""
    atoms = [[int(z), tuple(p)] for z, p in zip(record.Z, record.pos)]
    mol = gto.M(atom=atoms, basis="def2-svp", unit="Angstrom", verbose=0)
    S = mol.intor("int1e_ovlp")
    eps_p, C_p = scipy.linalg.eigh(H_pred, S)
    eps_t, C_t = scipy.linalg.eigh(record.H, S)
    nocc = int(record.Z.sum()) // 2
    atom = np.concatenate([[a] * (stop - start) for a, (_, _, start, stop) in enumerate(mol.aoslice_by_atom())])
    diag = atom[:, None] == atom[None, :]
    err = np.abs(H_pred - record.H)
    cos = [
        abs(C_p[:, i] @ C_t[:, i]) / (np.linalg.norm(C_p[:, i]) * np.linalg.norm(C_t[:, i])) for i in range(nocc)
    ]
    homo_p, homo_t, lumo_p, lumo_t = eps_p[nocc - 1], eps_t[nocc - 1], eps_p[nocc], eps_t[nocc]
    return {
        "h_mae": err.mean(),
        "h_diag_mae": err[diag].mean(),
        "h_offdiag_mae": err[~diag].mean(),
        "eps_mae": np.abs(eps_p[:nocc] - eps_t[:nocc]).mean(),
        "psi_cos": np.mean(cos),
        "homo_err": abs(homo_p - homo_t),
        "lumo_err": abs(lumo_p - lumo_t),
        "gap_err": abs((lumo_p - homo_p) - (lumo_t - homo_t)),
    }


def _core_hamiltonian_records(names, conformers):
    """Records of displaced G2 conformers (1, 2, ...) of ``names`` with their def2-SVP core Hamiltonians as H."""
    from metaham.qh9.formats import Record
    from metaham.qh9.generate import conformer, g2_molecules

    records = []
    for m in g2_molecules(names):
        for k in range(conformers):
            pos = conformer(m, k + 1, 0.05, seed=0)
            atoms = [[int(z), tuple(p)] for z, p in zip(m.Z, pos)]
            mol = gto.M(atom=atoms, basis="def2-svp", unit="Angstrom", verbose=0)
            H_core = mol.intor("int1e_kin") + mol.intor("int1e_nuc")
            records.append(Record(len(records), np.asarray(m.Z), pos, H_core, None, m.name, k))
    return records


def _assert_evaluator_equals_scipy(records, predictions):
    """Every metric of every molecule, scored by one Evaluator, equals :func:`_scipy_errors`."""
    evaluator = Evaluator()
    evaluator.add_records(records, predictions)
    ours = evaluator.per_molecule()
    for i, (record, H_pred) in enumerate(zip(records, predictions)):
        expected = _scipy_errors(H_pred, record)
        for key in SUMMARY_NAMES:
            assert ours[key][i] == pytest.approx(expected[key], rel=1e-9, abs=1e-13), (record.molecule, key)


def test_metrics_equal_independent_scipy_computation(generated):
    path, _ = generated
    with open_qh9(path) as f:
        records = list(f)
    predictions = _noisy(records, 2e-3)
    evaluator = Evaluator(group_size=2)  # several batched calls, mixed sizes
    evaluator.add_records(records, predictions)
    ours = evaluator.per_molecule()
    assert ours["id"].tolist() == [r.id for r in records]
    for i, (record, H_pred) in enumerate(zip(records, predictions)):
        expected = _scipy_errors(H_pred, record)
        for key in SUMMARY_NAMES:
            assert ours[key][i] == pytest.approx(expected[key], rel=1e-9, abs=1e-13), key
        assert expected["eps_mae"] > 1e-5 and expected["psi_cos"] < 1 - 1e-8  # the noise is visible to every metric
        official = reference_errors(H_pred, record.H, record.Z, record.pos)  # QH9's own route
        for key in SUMMARY_NAMES:
            assert official[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-13), key


def test_true_matrix_scores_zero_and_full_similarity(generated):
    path, _ = generated
    with open_qh9(path) as f:
        records = list(f)
    summary = evaluate_predictions(records, [r.H for r in records])
    assert summary["n"] == 4
    for name in SUMMARY_NAMES.values():
        expected = 100.0 if name == "psi_cos_pct" else 0.0
        assert summary[name] == pytest.approx(expected, abs=1e-9), name
    noisy = evaluate_predictions(records, [torch.from_numpy(h) for h in _noisy(records, 1e-3)])
    assert 100 < noisy["h_mae_ueh"] < 2000 and noisy["psi_cos_pct"] < 100.0


def test_prediction_shape_and_singular_overlap_are_errors(generated):
    path, _ = generated
    with open_qh9(path) as f:
        record = f[0]
    with pytest.raises(ValueError, match=r"row 1: prediction has shape \(10, 10\), target \(24, 24\)"):
        Evaluator().add(record.id, record.Z, record.pos, record.H, np.zeros((10, 10)))
    S = torch.eye(3, dtype=torch.float64).repeat(1, 1, 1)
    S[0, 0, 1] = S[0, 1, 0] = 1.0  # two identical functions: not positive definite
    with pytest.raises(ValueError, match="not positive definite"):
        zeros = torch.zeros(1, 3, 3)
        molecule_errors(zeros, zeros, S, torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]))
    # A diverged model's NaN (or inf) is named, with its row, not left to fail inside an eigensolver.
    evaluator = Evaluator(group_size=2)
    evaluator.add(record.id, record.Z, record.pos, record.H, record.H)
    with pytest.raises(ValueError, match=r"rows \[1, 7\]: predicted matrix holds a non-finite value \(NaN or inf\) "
                       r"for molecule\(s\) \[1\] of the batch"):
        evaluator.add(7, record.Z, record.pos, record.H, np.where(np.eye(record.norb) > 0, np.inf, record.H))


def test_evaluate_model_and_saved_predictions(generated, tmp_path):
    from metaham.qh9.baselines import minao_predictor
    from metaham.qh9.dataset import QH9Dataset
    from metaham.qh9.evaluate import evaluate_model, save_predictions

    path, _ = generated
    data = QH9Dataset(path)
    summary, kept = evaluate_model(minao_predictor(), data, batch_size=3, keep_predictions=True, progress=False)
    records = list(data.file)
    assert summary == evaluate_predictions(records, [r.H_init for r in records])
    save_predictions(tmp_path / "pred.npz", kept)
    with np.load(tmp_path / "pred.npz") as saved:
        assert saved["ids"].tolist() == [r.id for r in records]
        for r in records:
            assert saved[f"H_{r.id}"].tobytes() == r.H_init.tobytes()


def test_equal_size_molecules_with_different_occupation_in_one_call():
    """H2CO and H2O2 both have 38 AOs but 8 and 9 occupied orbitals: one batched call scores each with its own.
    Displaced geometries: no symmetry, so no degenerate orbitals whose basis LAPACK may choose freely."""
    records = _core_hamiltonian_records(["H2CO", "H2O2"], conformers=1)
    assert [r.norb for r in records] == [38, 38]
    _assert_evaluator_equals_scipy(records, _noisy(records, 1e-2, seed=3))


def test_molecules_large_enough_for_the_tridiagonal_route_equal_scipy(monkeypatch):
    """Benzene (114 AOs) and acetone (86), displaced, two conformers each: the CPU route that computes only
    the lowest eigenpairs (from 80 AOs on) gives scipy's generalized eigh's metrics."""
    from metaham.qh9 import eigensolve

    routed = []
    original = eigensolve._lapack_lowest
    monkeypatch.setattr(eigensolve, "_lapack_lowest", lambda *a: routed.append(a[0].shape) or original(*a))
    records = _core_hamiltonian_records(["C6H6", "CH3COCH3"], conformers=2)
    assert sorted({r.norb for r in records}) == [86, 114]
    _assert_evaluator_equals_scipy(records, _noisy(records, 1e-2, seed=5))
    assert sorted(shape[-1] for shape in routed) == [86, 114]


def test_lapack_and_torch_reductions_agree():
    """The CPU route (LAPACK's dsygst) and the route of other devices (torch's triangular solves) give the same
    factor and reduced matrices, and both name the molecule whose overlap is not positive definite."""
    from metaham.qh9.eigensolve import _lapack_reduction, _torch_reduction

    rng = np.random.default_rng(0)
    B = rng.normal(size=(3, 12, 12))
    S = torch.from_numpy(B @ B.transpose(0, 2, 1) / 12 + np.eye(12))
    E = rng.normal(size=(2, 3, 12, 12))
    H = torch.from_numpy(E + E.transpose(0, 1, 3, 2))
    L1, A1 = _lapack_reduction(H, S)
    L2, A2 = _torch_reduction(H, S)
    lower = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.allclose(L1, L2, rtol=0, atol=1e-12)
    assert torch.allclose(A1[..., lower], A2[..., lower], rtol=0, atol=1e-11)
    assert torch.allclose(L1 @ L1.mT, S, rtol=0, atol=1e-12)
    S[1, 0, 1] = S[1, 1, 0] = 5.0  # no longer positive definite
    for reduction in (_lapack_reduction, _torch_reduction):
        with pytest.raises(ValueError, match=r"not positive definite for molecule\(s\) \[1\]"):
            reduction(H, S)
