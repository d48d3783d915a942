"""QH9's official train/val/test splits, applicable to any QH9 file (positions in file order).

``stable-id``
    Random 80/10/10 of the rows: ``numpy.random.RandomState(seed).permutation(n)``, ``int(0.8 n)`` train,
    ``int(0.1 n)`` val, the rest test (QH9: seed 43 -> 104,664 / 13,083 / 13,084 on QH9-stable).
``stable-ood``
    By size: train <= 20 atoms, val 21-22 atoms, test >= 23 atoms (104,001 / 17,495 / 9,335).
``dynamic-geo``
    Unseen geometries of seen molecules: each molecule's geometries split 80/10/10 (``int`` counts, rest
    test) by ``RandomState(p).permutation``, ``p`` the file position of the molecule's last row, as QH9 does
    (239,840 / 29,980 / 29,980 on QH9-dynamic-300k). ``seed`` does not enter.
``dynamic-mol``
    Unseen molecules: the molecules (in order of first appearance) shuffled by ``random.Random(seed)``,
    ``int(0.8 m)`` train, ``int(0.1 m)`` val, the rest test, each with all its rows
    (seed 43 -> 239,800 / 29,900 / 30,100 on QH9-dynamic-300k).

For a file made by ``metaham qh9 generate`` the molecule is the molecule's name and the geometry its
conformer: ``dynamic-geo`` holds out conformers (of molecules seen in training), ``dynamic-mol`` holds out
whole molecules. :func:`default_scheme` picks ``dynamic-geo`` for any file whose molecules have several
geometries, ``stable-id`` otherwise.
"""
from __future__ import annotations

import random

import numpy as np

from .formats import Catalog

SCHEMES = ("stable-id", "stable-ood", "dynamic-geo", "dynamic-mol")
PARTS = ("train", "val", "test")
QH9_SEED = 43


def default_scheme(catalog: Catalog) -> str:
    """``dynamic-geo`` when some molecule has several geometries, else ``stable-id``."""
    _, counts = np.unique(catalog.molecule.astype(str), return_counts=True)
    return "dynamic-geo" if len(counts) and counts.max() > 1 else "stable-id"


def _fractions(n: int) -> tuple[int, int]:
    """QH9's 80/10/10 counts: ``int(0.8 n)`` and ``int(0.1 n)`` (the rest is test)."""
    return int(n * 0.8), int(n * 0.1)


def _molecule_groups(catalog: Catalog) -> list[np.ndarray]:
    """Positions of each molecule's rows, molecules in order of first appearance, rows in (geometry, position)
    order."""
    keys = catalog.molecule.astype(str)
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    rank = np.argsort(np.argsort(first))  # molecule -> its order of first appearance
    positions = np.arange(len(keys), dtype=np.int64)
    order = np.lexsort((positions, catalog.geometry, rank[inverse]))
    return np.split(order, np.cumsum(counts[np.argsort(rank)])[:-1])


def split(catalog: Catalog, scheme: str, seed: int = QH9_SEED) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` -> sorted int64 positions (file order) of the rows in each part.

    Args:
        catalog: the file's :class:`~metaham.qh9.formats.Catalog`.
        scheme: one of :data:`SCHEMES` (see the module docstring).
        seed: random seed of ``stable-id`` and ``dynamic-mol`` (QH9 uses 43).
    """
    n = len(catalog)
    if scheme == "stable-id":
        order = np.random.RandomState(seed).permutation(n)
        n_train, n_val = _fractions(n)
        parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    elif scheme == "stable-ood":
        atoms = catalog.n_atoms
        parts = np.flatnonzero(atoms <= 20), np.flatnonzero((atoms >= 21) & (atoms <= 22)), np.flatnonzero(atoms >= 23)
    elif scheme == "dynamic-geo":
        train, val, test = [], [], []
        for positions in _molecule_groups(catalog):
            order = positions[np.random.RandomState(int(positions.max())).permutation(len(positions))]
            n_train, n_val = _fractions(len(positions))
            train.append(order[:n_train])
            val.append(order[n_train : n_train + n_val])
            test.append(order[n_train + n_val :])
        parts = tuple(np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in (train, val, test))
    elif scheme == "dynamic-mol":
        groups = _molecule_groups(catalog)
        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        n_train, n_val = _fractions(len(groups))
        chosen = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
        parts = tuple(
            np.concatenate([groups[g] for g in c]) if c else np.zeros(0, dtype=np.int64) for c in chosen
        )
    else:
        raise ValueError(f"unknown split scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return {name: np.sort(np.asarray(p, dtype=np.int64)) for name, p in zip(PARTS, parts)}


def select(catalog: Catalog, part: str, scheme: str, seed: int = QH9_SEED) -> np.ndarray:
    """Positions of ``part`` (``train``, ``val``, ``test``, or ``all``) under ``scheme``."""
    if part == "all":
        return np.arange(len(catalog), dtype=np.int64)
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; choose one of train, val, test, all")
    return split(catalog, scheme, seed)[part]
