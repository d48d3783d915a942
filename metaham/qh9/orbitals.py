"""The def2-SVP orbital layout in e3nn's language: irreps, Wigner matrices, and block assembly.

Conventions (checked numerically in ``tests/qh9/test_orbitals.py``):

* **e3nn order.** Each atom's AOs in the order of its irreps -- H ``2x0e+1x1o`` (1s 2s 2p), C/N/O/F
  ``3x0e+2x1o+1x2e`` -- which is pyscf's order except that every p shell is permuted from pyscf's
  (x, y, z) to e3nn's (y, z, x): index ``[1, 2, 0]``, no sign changes; s and d shells are unchanged.
  Geometric vectors fed to e3nn are permuted the same way: ``vec[..., XYZ_TO_E3NN]``.
* **Rotations.** Rotating a molecule, ``pos -> pos @ R.T``, transforms its Kohn-Sham and overlap matrices
  (pyscf order) as ``D H D^T`` with ``D = wigner_D(Z, R)``: per atom, the e3nn matrix
  ``irreps.D_from_matrix(P R P^T)`` (``P`` the permutation above) taken back to pyscf order. In pyscf order the
  p blocks are ``R`` itself.
* **Padded blocks.** A head predicts every atom's block in the 14 slots of ``PADDED_IRREPS =
  3x0e+2x1o+1x2e`` (e3nn order). Heavy atoms fill all 14; H fills slots ``[0, 1, 3, 4, 5]`` (1s, 2s, 2p),
  the others are ignored on assembly and zero on decomposition. Diagonal blocks are ``(n_atoms, 14, 14)``;
  pair blocks ``(n_pairs, 14, 14)`` for ``pairs[:, k] = (i, j)``, rows belonging to atom ``i``, columns to
  atom ``j``.

Batches concatenate molecules (PyG style): ``Z`` ``(n_atoms,)`` of all molecules, ``ptr`` ``(B + 1,)`` the
atom offsets of each molecule, ``pairs`` global atom indices within one molecule.

>>> import torch
>>> from metaham.qh9.orbitals import assemble, decompose
>>> Z, ptr = torch.tensor([8, 1, 1]), torch.tensor([0, 3])           # water
>>> pairs = torch.tensor([[1, 2, 2, 0, 0, 1], [0, 0, 1, 1, 2, 2]])     # all ordered pairs i != j
>>> diag, off = torch.randn(3, 14, 14), torch.randn(6, 14, 14)
>>> H, = assemble(Z, ptr, diag, pairs, off)                           # (24, 24), symmetric, pyscf order
>>> H.shape, bool((H - H.T).abs().max() < 1e-6)
(torch.Size([24, 24]), True)
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import numpy as np
import torch
from e3nn import o3
from torch import Tensor

from .basis import N_AO, SHELLS, check_elements

PADDED_IRREPS = o3.Irreps("3x0e+2x1o+1x2e")
N_SLOTS = PADDED_IRREPS.dim  # 14
XYZ_TO_E3NN = [1, 2, 0]  # e3nn's l = 1 components are (y, z, x)
_P = torch.eye(3, dtype=torch.float64)[XYZ_TO_E3NN]  # P @ v == v[XYZ_TO_E3NN]


def atom_irreps(z: int) -> o3.Irreps:
    """Irreps of the AO block of element ``z``: ``2x0e+1x1o`` (H) or ``3x0e+2x1o+1x2e`` (C, N, O, F)."""
    check_elements(np.array([z]))
    counts = [SHELLS[z].count(l) for l in range(3)]
    return o3.Irreps([(n, (l, (-1) ** l)) for l, n in enumerate(counts) if n])


@lru_cache(maxsize=None)
def _element_tables(z: int) -> tuple[np.ndarray, np.ndarray]:
    """(e3nn order -> pyscf index within the atom, padded slot -> pyscf index within the atom or -1)."""
    start = {0: 0, 1: 3, 2: 9}  # first slot of each l in PADDED_IRREPS
    e3nn_to_pyscf, slots = [], np.full(N_SLOTS, -1, dtype=np.int64)
    seen = {0: 0, 1: 0, 2: 0}
    offset = 0
    for l in SHELLS[z]:
        order = XYZ_TO_E3NN if l == 1 else list(range(2 * l + 1))
        for m, k in enumerate(order):
            slots[start[l] + seen[l] * (2 * l + 1) + m] = offset + k
        seen[l] += 1
        offset += 2 * l + 1
    # e3nn order is the pyscf shell order with each p shell permuted: read it off the padded slots.
    e3nn_to_pyscf = slots[slots >= 0]
    return e3nn_to_pyscf, slots


def _tables() -> tuple[Tensor, Tensor]:
    """Lookup by atomic number: AOs per element ``(10,)`` and padded slot -> local pyscf AO ``(10, 14)``."""
    n_ao = torch.zeros(10, dtype=torch.long)
    slots = torch.full((10, N_SLOTS), -1, dtype=torch.long)
    for z in SHELLS:
        n_ao[z] = N_AO[z]
        slots[z] = torch.from_numpy(_element_tables(z)[1])
    return n_ao, slots


_N_AO_BY_Z, _SLOTS_BY_Z = _tables()


def pyscf_to_e3nn(Z: np.ndarray | Tensor) -> Tensor:
    """``(norb,)`` long index ``idx`` with ``H_e3nn = H_pyscf[idx][:, idx]`` for a molecule with atoms ``Z``."""
    Z = np.asarray(Z.cpu() if isinstance(Z, Tensor) else Z).ravel()
    check_elements(Z)
    parts, offset = [], 0
    for z in Z:
        parts.append(_element_tables(int(z))[0] + offset)
        offset += N_AO[int(z)]
    return torch.from_numpy(np.concatenate(parts))


def e3nn_to_pyscf(Z: np.ndarray | Tensor) -> Tensor:
    """The inverse of :func:`pyscf_to_e3nn`: ``H_pyscf = H_e3nn[idx][:, idx]``."""
    return torch.argsort(pyscf_to_e3nn(Z))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # e3nn builds its SO(3) generators in the default dtype: in float32 a float64 D carries 1e-7 errors.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def wigner_D(Z: np.ndarray | Tensor, R: np.ndarray | Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(norb, norb)`` block-diagonal rotation of a molecule's AO space, pyscf order.

    For ``pos' = pos @ R.T`` (``R`` a ``(3, 3)`` rotation or improper rotation), the matrices of the rotated
    molecule are ``D @ H @ D.T``.
    """
    R = torch.as_tensor(np.asarray(R.cpu() if isinstance(R, Tensor) else R), dtype=torch.float64)
    Z = np.asarray(Z.cpu() if isinstance(Z, Tensor) else Z).ravel()
    check_elements(Z)
    with _default_dtype(torch.float64):
        rotation = _P @ R @ _P.T
        per_element = {int(z): atom_irreps(int(z)).D_from_matrix(rotation) for z in set(Z.tolist())}
    D_e3nn = torch.block_diag(*[per_element[int(z)] for z in Z])
    back = e3nn_to_pyscf(Z)
    return D_e3nn[back][:, back].to(dtype)


def _slot_layout(Z: Tensor, ptr: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Per batch: AO index (within its molecule, pyscf order) of every padded slot ``(n_atoms, 14)`` (-1 empty),
    the molecule of every atom ``(n_atoms,)``, each molecule's offset in a flat buffer of all matrices
    ``(B,)``, and the AO counts ``[norb_b]``."""
    device = Z.device
    Z = Z.long()
    if Z.numel() and (Z.min() < 0 or Z.max() >= len(_N_AO_BY_Z) or (_N_AO_BY_Z.to(device)[Z] == 0).any()):
        check_elements(Z.cpu().numpy())  # raises, naming the element
    sizes = _N_AO_BY_Z.to(device)[Z]
    ptr = ptr.long().to(device)
    counts = ptr[1:] - ptr[:-1]
    if int(ptr[0]) != 0 or int(ptr[-1]) != len(Z) or (counts <= 0).any():
        raise ValueError(f"ptr {ptr.tolist()} must rise from 0 to n_atoms = {len(Z)} with no empty molecule")
    molecule = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    starts_global = torch.cumsum(sizes, 0) - sizes
    atom_start = starts_global - starts_global[ptr[:-1]][molecule]
    local = _SLOTS_BY_Z.to(device)[Z]
    slot_ao = torch.where(local >= 0, local + atom_start[:, None], local)
    norb = torch.zeros(len(counts), dtype=torch.long, device=device).index_add_(0, molecule, sizes)
    flat_offset = torch.cumsum(norb * norb, 0) - norb * norb
    return slot_ao, molecule, flat_offset, norb.tolist()


def _block_indices(Z: Tensor, ptr: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Where the filled entries of the padded blocks (diagonal blocks first, then pairs) ``(A + P, 14, 14)`` go:
    their mask, their positions in the flattened blocks ``(F,)`` (ascending), the flat index of each in the
    batch's concatenated matrices ``(F,)`` and that of its transposed position; and the AO counts."""
    slot_ao, molecule, flat_offset, norb = _slot_layout(Z, ptr)
    pairs = pairs.long()
    if pairs.numel():
        if (pairs[0] == pairs[1]).any():
            raise ValueError("pairs must join two different atoms (diagonal blocks are passed separately)")
        if (molecule[pairs[0]] != molecule[pairs[1]]).any():
            raise ValueError("pairs must join atoms of the same molecule")
    atoms = torch.arange(len(Z), device=Z.device)
    rows, cols = torch.cat([atoms, pairs[0]]), torch.cat([atoms, pairs[1]])
    row_slots, col_slots = slot_ao[rows], slot_ao[cols]  # (A + P, 14): AO of each slot, -1 empty
    valid = (row_slots[:, :, None] >= 0) & (col_slots[:, None, :] >= 0)
    # Index arithmetic on the filled entries only: one nonzero, then gathers. (A boolean mask per tensor ran
    # nonzero again for each, which dominated the assembly of a batch; integer division is slow on CPUs.)
    block, r_slot, c_slot = torch.nonzero(valid).unbind(1)
    row_slot = block * N_SLOTS + r_slot
    entry = row_slot * N_SLOTS + c_slot
    r = row_slots.reshape(-1).index_select(0, row_slot)
    c = col_slots.reshape(-1).index_select(0, block * N_SLOTS + c_slot)
    block_molecule = molecule[rows].index_select(0, block)
    n = torch.tensor(norb, dtype=torch.long, device=Z.device).index_select(0, block_molecule)
    base = flat_offset.index_select(0, block_molecule)
    return valid, entry, base + r * n + c, base + c * n + r, norb


def assemble(Z: Tensor, ptr: Tensor, diag: Tensor, pairs: Tensor, offdiag: Tensor) -> list[Tensor]:
    """Full symmetric Kohn-Sham matrices in pyscf order from padded e3nn-order blocks (differentiable).

    Args:
        Z: ``(n_atoms,)`` atomic numbers of all molecules of the batch, concatenated.
        ptr: ``(B + 1,)`` atom offsets: molecule ``b`` is atoms ``ptr[b]:ptr[b + 1]``.
        diag: ``(n_atoms, 14, 14)`` per-atom blocks (irreps ``PADDED_IRREPS`` on both sides).
        pairs: ``(2, n_pairs)`` ordered atom pairs ``(i, j)``, ``i != j``, within one molecule. Each unordered
            pair may appear once (block ``(j, i)`` is then the transpose) or in both orders (the two are
            averaged, ``(B_ij + B_ji^T) / 2``); pairs that never appear stay zero.
        offdiag: ``(n_pairs, 14, 14)`` pair blocks, rows of atom ``i``, columns of atom ``j``.

    Returns:
        ``B`` matrices ``(norb_b, norb_b)`` in pyscf AO order, symmetric (diagonal blocks are symmetrised).
    """
    _, entry, index, index_t, norb = _block_indices(Z, ptr, pairs)
    values = torch.cat([diag, offdiag]).reshape(-1).index_select(0, entry)
    where = torch.cat([index, index_t])
    total = sum(n * n for n in norb)
    sums = torch.zeros(total, dtype=values.dtype, device=values.device).index_add(0, where, torch.cat([values, values]))
    counts = torch.bincount(where, minlength=total).to(values.dtype)
    flat = sums / counts.clamp(min=1)
    return [m.view(n, n) for m, n in zip(flat.split([n * n for n in norb]), norb)]


def decompose(H: list[Tensor], Z: Tensor, ptr: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inverse of :func:`assemble`: padded e3nn-order blocks of pyscf-order matrices (training targets).

    Args:
        H: ``B`` matrices ``(norb_b, norb_b)``, pyscf order.
        Z, ptr, pairs: as in :func:`assemble`.

    Returns:
        ``(diag, offdiag, diag_mask, offdiag_mask)``: blocks ``(n_atoms, 14, 14)`` and ``(n_pairs, 14, 14)``
        (zero in empty slots) and boolean masks of the filled entries, same shapes.
    """
    valid, entry, index, _, norb = _block_indices(Z, ptr, pairs)
    flat = torch.cat([h.reshape(-1) for h in H])
    if flat.numel() != sum(n * n for n in norb):
        raise ValueError(f"matrices hold {flat.numel()} entries, but Z needs {[f'{n}x{n}' for n in norb]}")
    blocks = torch.zeros(valid.numel(), dtype=flat.dtype, device=flat.device)
    blocks[entry] = flat.index_select(0, index)
    blocks = blocks.view(valid.shape)
    n_atoms = len(Z)
    return blocks[:n_atoms], blocks[n_atoms:], valid[:n_atoms], valid[n_atoms:]
