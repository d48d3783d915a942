"""The def2-SVP orbital convention: layout vs pyscf, Wigner matrices vs rotated pyscf molecules, block assembly."""
import numpy as np
import pytest
import torch
from e3nn import o3
from pyscf import gto
from scipy.linalg import block_diag
from scipy.spatial.transform import Rotation

from metaham.qh9 import basis
from metaham.qh9.formats import open_qh9
from metaham.qh9.generate import run_scf
from metaham.qh9.orbitals import (
    PADDED_IRREPS,
    XYZ_TO_E3NN,
    assemble,
    atom_irreps,
    decompose,
    e3nn_to_pyscf,
    pyscf_to_e3nn,
    wigner_D,
)
from metaham.qh9.overlap import overlap

# A molecule with every supported element, no symmetry.
Z_ALL = np.array([6, 7, 8, 9, 1, 1, 1, 1])  # 34 electrons: closed shell
POS_ALL = np.array(
    [
        [0.0, 0.0, 0.0], [1.4, 0.1, -0.1], [-0.8, 1.1, 0.2], [-0.6, -1.2, 0.3],
        [2.0, 0.9, 0.3], [1.9, -0.8, -0.2], [0.1, 0.2, 1.1], [-1.7, 1.0, 0.4],
    ]
)
# a proper rotation and an improper one (rotation times inversion)
ROTATIONS = [Rotation.random(random_state=7).as_matrix(), -Rotation.random(random_state=8).as_matrix()]


def _pyscf_mol(Z, pos):
    return gto.M(atom=[[int(z), tuple(p)] for z, p in zip(Z, pos)], basis="def2-svp", unit="Angstrom", verbose=0)


def test_layout_matches_pyscf():
    mol = _pyscf_mol(Z_ALL, POS_ALL)
    assert basis.n_orbitals(Z_ALL) == mol.nao
    np.testing.assert_array_equal(basis.ao_slices(Z_ALL), mol.aoslice_by_atom()[:, 2:])
    labels = mol.ao_labels()
    assert [labels[k].split()[2] for k in (3, 4, 5)] == ["2px", "2py", "2pz"]  # pyscf p order is (x, y, z)
    for z in basis.SHELLS:
        assert atom_irreps(z).dim == basis.N_AO[z]
    assert str(atom_irreps(1)) == "2x0e+1x1o" and str(atom_irreps(8)) == "3x0e+2x1o+1x2e" == str(PADDED_IRREPS)
    assert basis.n_occupied(Z_ALL) == int(Z_ALL.sum()) // 2


def test_p_shell_permutation():
    np.testing.assert_array_equal(pyscf_to_e3nn([1]).numpy(), [0, 1, 3, 4, 2])
    np.testing.assert_array_equal(pyscf_to_e3nn([6])[:9].numpy(), [0, 1, 2, 4, 5, 3, 7, 8, 6])
    idx, back = pyscf_to_e3nn(Z_ALL), e3nn_to_pyscf(Z_ALL)
    np.testing.assert_array_equal(idx[back].numpy(), np.arange(basis.n_orbitals(Z_ALL)))


def test_fast_overlap_equals_pyscf():
    S = _pyscf_mol(Z_ALL, POS_ALL).intor("int1e_ovlp")
    np.testing.assert_allclose(overlap(Z_ALL, POS_ALL), S, rtol=0, atol=1e-14)


@pytest.mark.parametrize("R", ROTATIONS, ids=["proper", "improper"])
def test_overlap_of_rotated_molecule_is_D_S_DT(R):
    D = wigner_D(Z_ALL, R).numpy()
    S = _pyscf_mol(Z_ALL, POS_ALL).intor("int1e_ovlp")
    S_rot = _pyscf_mol(Z_ALL, POS_ALL @ R.T).intor("int1e_ovlp")
    np.testing.assert_allclose(S_rot, D @ S @ D.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(D @ D.T, np.eye(len(D)), atol=1e-12)


def test_without_the_p_permutation_the_convention_fails():
    """Rotating p shells with e3nn's D(R) in pyscf's (x, y, z) order is wrong: the test above can fail."""
    R = ROTATIONS[0]
    R32 = torch.tensor(R, dtype=torch.float32)
    D_naive = block_diag(*[atom_irreps(int(z)).D_from_matrix(R32).double().numpy() for z in Z_ALL])
    S = _pyscf_mol(Z_ALL, POS_ALL).intor("int1e_ovlp")
    S_rot = _pyscf_mol(Z_ALL, POS_ALL @ R.T).intor("int1e_ovlp")
    assert np.abs(S_rot - D_naive @ S @ D_naive.T).max() > 1e-2


def test_pyscf_fock_of_rotated_water_is_D_F_DT(generated):
    """pyscf's own B3LYP Fock matrix transforms with D (to the DFT grid's accuracy, ~1e-6)."""
    path, _ = generated
    with open_qh9(path) as f:
        water = next(r for r in f if r.molecule == "H2O" and r.geometry == 1)
    R = ROTATIONS[0]
    F_rot = run_scf(water.Z, water.pos @ R.T).H
    D = wigner_D(water.Z, R).numpy()
    expected = D @ water.H @ D.T
    assert np.abs(F_rot - expected).max() <= 1e-5 * np.abs(expected).max()


def test_decompose_assemble_roundtrip_and_equivariance(generated):
    path, _ = generated
    with open_qh9(path) as f:
        records = [f[0], f[2]]  # a water and an H2
    Z = torch.from_numpy(np.concatenate([r.Z for r in records]))
    ptr = torch.tensor([0, 3, 5])
    pairs = torch.tensor([[1, 2, 2, 0, 0, 1, 4, 3], [0, 0, 1, 1, 2, 2, 3, 4]])  # all ordered pairs, per molecule
    H = [torch.from_numpy(r.H) for r in records]
    diag, off, diag_mask, off_mask = decompose(H, Z, ptr, pairs)
    assert diag.shape == (5, 14, 14) and off.shape == (8, 14, 14)
    assert int(diag_mask[1].sum()) == 25 and int(off_mask[0].sum()) == 5 * 14  # H block 5x5, H-O 5x14
    for a, b in zip(assemble(Z, ptr, diag, pairs, off), H):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    one_way = pairs[:, pairs[0] > pairs[1]]  # each unordered pair once: the mirror block is the transpose
    _, off_one, _, _ = decompose(H, Z, ptr, one_way)
    for a, b in zip(assemble(Z, ptr, diag, one_way, off_one), H):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)

    # Rotating every block with e3nn's Wigner matrices (e3nn order, P R P^T) equals rotating the full matrix.
    R = ROTATIONS[1]
    P = np.eye(3)[XYZ_TO_E3NN]
    torch.set_default_dtype(torch.float64)  # e3nn builds D in the default dtype
    try:
        D_atom = PADDED_IRREPS.D_from_matrix(torch.tensor(P @ R @ P.T))
    finally:
        torch.set_default_dtype(torch.float32)
    D_atoms = D_atom.expand(len(Z), 14, 14)
    rot_diag = D_atoms @ diag @ D_atoms.mT
    rot_off = D_atoms[pairs[0]] @ off @ D_atoms[pairs[1]].mT
    for a, r in zip(assemble(Z, ptr, rot_diag, pairs, rot_off), records):
        D = wigner_D(r.Z, R)
        torch.testing.assert_close(a, D @ torch.from_numpy(r.H) @ D.T, rtol=0, atol=1e-12)


def test_assemble_is_differentiable_and_symmetric():
    Z, ptr = torch.tensor([8, 1, 1]), torch.tensor([0, 3])
    pairs = torch.tensor([[1, 2, 2], [0, 0, 1]])
    diag = torch.randn(3, 14, 14, dtype=torch.float64, requires_grad=True)
    off = torch.randn(3, 14, 14, dtype=torch.float64, requires_grad=True)
    (H,) = assemble(Z, ptr, diag, pairs, off)
    torch.testing.assert_close(H, H.T)
    H.sum().backward()
    assert diag.grad[1, 2].abs().sum() == 0  # an empty H slot gets no gradient
    assert off.grad.abs().sum() > 0


def test_unsupported_element_and_basis_are_named():
    with pytest.raises(basis.UnsupportedError, match=r"S \(Z=16\)"):
        wigner_D([8, 16], np.eye(3))
    with pytest.raises(basis.UnsupportedError, match=r"Cl \(Z=17\)"):
        no_pairs = torch.zeros(2, 0, dtype=torch.long)
        assemble(torch.tensor([17, 1]), torch.tensor([0, 2]), torch.zeros(2, 14, 14), no_pairs, torch.zeros(0, 14, 14))
    with pytest.raises(basis.UnsupportedError, match="def2-tzvp"):
        basis.normalize_basis("def2-tzvp")
    assert basis.normalize_basis("def2-SVP") == "def2-svp"
    with pytest.raises(ValueError, match="same molecule"):
        across = torch.tensor([[0], [2]])  # atom 0 of molecule 0 with atom 2 of molecule 1
        Z, ptr = torch.tensor([1, 1, 1, 1]), torch.tensor([0, 2, 4])
        assemble(Z, ptr, torch.zeros(4, 14, 14), across, torch.zeros(1, 14, 14))
