"""The def2-SVP atomic-orbital layout of QH9 molecules (elements H, C, N, O, F), in pyscf's AO order.

Facts only, in numpy (no torch), so that readers and the data generator stay light:

* per element, the angular momentum of each shell in pyscf order: H ``s s p`` (5 AOs), C/N/O/F
  ``s s s p p d`` (14 AOs). pyscf orders p functions (x, y, z) and d functions m = -2..2.
* per molecule, each atom's AO range (``ao_slices``, the same as pyscf's ``mol.aoslice_by_atom()[:, 2:]``),
  the atom each AO belongs to, and the number of occupied orbitals of the closed-shell molecule.

The e3nn view of the same layout (irreps, the p-shell permutation, Wigner matrices, block assembly) lives in
:mod:`metaham.qh9.orbitals`.
"""
from __future__ import annotations

import numpy as np

from metaham.errors import UserError

BASIS = "def2-svp"
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
# Angular momentum of each shell, pyscf order (shells sorted by l, as in pyscf's def2-SVP).
SHELLS: dict[int, tuple[int, ...]] = {1: (0, 0, 1), **{z: (0, 0, 0, 1, 1, 2) for z in (6, 7, 8, 9)}}
N_AO: dict[int, int] = {z: sum(2 * l + 1 for l in shells) for z, shells in SHELLS.items()}  # H 5, heavy 14



class UnsupportedError(UserError, ValueError):
    """An element or basis outside QH9's def2-SVP layout for H, C, N, O, F; the message names it."""


def element_label(z: int) -> str:
    """``"S (Z=16)"``, ``"U (Z=92)"`` (ase's table of the 118 elements); ``"Z=0"`` for a number that is no element."""
    from ase.data import chemical_symbols  # only when an element has to be named

    return f"{chemical_symbols[z]} (Z={z})" if 0 < z < len(chemical_symbols) else f"Z={z}"


def normalize_basis(name: str) -> str:
    """``"def2-SVP"``, ``"def2svp"``, ... -> ``"def2-svp"``; any other basis raises :class:`UnsupportedError`."""
    if name.lower().replace("-", "").replace("_", "") != "def2svp":
        raise UnsupportedError(
            f"basis {name!r} is not supported: the orbital layout (and QH9) is def2-SVP only"
        )
    return BASIS


def check_elements(Z: np.ndarray, where: str = "") -> None:
    """Raise :class:`UnsupportedError` naming the first element of ``Z`` (``(n_atoms,)``) that is not H/C/N/O/F."""
    bad = sorted({int(z) for z in np.asarray(Z).ravel()} - set(SHELLS))
    if bad:
        names = ", ".join(element_label(z) for z in bad)
        prefix = f"{where}: " if where else ""
        raise UnsupportedError(f"{prefix}element {names} not supported: def2-SVP layout covers H, C, N, O, F only")


def n_orbitals(Z: np.ndarray) -> int:
    """Number of def2-SVP AOs of a molecule with atomic numbers ``Z`` (``(n_atoms,)``)."""
    check_elements(Z)
    return int(sum(N_AO[int(z)] for z in np.asarray(Z).ravel()))


def ao_slices(Z: np.ndarray) -> np.ndarray:
    """``(n_atoms, 2)`` int64: each atom's AO range ``[start, stop)`` in pyscf order (``aoslice_by_atom()[:, 2:]``)."""
    check_elements(Z)
    sizes = np.array([N_AO[int(z)] for z in np.asarray(Z).ravel()], dtype=np.int64)
    stops = np.cumsum(sizes)
    return np.stack([stops - sizes, stops], axis=1)


def ao_atom_index(Z: np.ndarray) -> np.ndarray:
    """``(norb,)`` int64: the atom each AO belongs to (diagonal blocks are ``a[:, None] == a[None, :]``)."""
    check_elements(Z)
    sizes = [N_AO[int(z)] for z in np.asarray(Z).ravel()]
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


def n_occupied(Z: np.ndarray) -> int:
    """Doubly occupied orbitals of the neutral closed-shell molecule: ``sum(Z) / 2`` (QH9's definition)."""
    electrons = int(np.asarray(Z).sum())
    if electrons % 2:
        raise UnsupportedError(f"{electrons} electrons: only closed-shell (even-electron) molecules are supported")
    return electrons // 2

