"""QH9 rows as a torch ``Dataset`` and the collate function that batches molecules of any size.

>>> from torch.utils.data import DataLoader
>>> from metaham.qh9.dataset import QH9Dataset, collate
>>> data = QH9Dataset("qh9_small.db", indices=[0, 1, 2])           # doctest: +SKIP
>>> batch = next(iter(DataLoader(data, batch_size=2, collate_fn=collate)))  # doctest: +SKIP
>>> batch.Z.shape, batch.ptr, [h.shape for h in batch.H]           # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .formats import QH9File, Record, open_qh9


@dataclass
class MoleculeBatch:
    """Molecules concatenated PyG-style; matrices kept per molecule (they differ in size).

    Attributes:
        ids: ``(B,)`` long row ids in the file.
        Z: ``(n_atoms,)`` long atomic numbers of all molecules.
        pos: ``(n_atoms, 3)`` float64 positions, Angstrom.
        batch: ``(n_atoms,)`` long molecule index of each atom.
        ptr: ``(B + 1,)`` long atom offsets: molecule ``b`` is atoms ``ptr[b]:ptr[b + 1]``.
        H: ``B`` float64 targets ``(norb_b, norb_b)``, pyscf order, Hartree.
        H_init: ``B`` MINAO-guess Fock matrices like ``H``, or ``None`` when the file has none.
        molecule: ``B`` molecule keys (for per-molecule baselines and splits).
    """

    ids: Tensor
    Z: Tensor
    pos: Tensor
    batch: Tensor
    ptr: Tensor
    H: list[Tensor]
    H_init: list[Tensor] | None
    molecule: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "MoleculeBatch":
        """A copy with every tensor on ``device``."""

        def move(value):
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, list) and value and isinstance(value[0], Tensor):
                return [v.to(device) for v in value]
            return value

        return MoleculeBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def collate(records: Sequence[Record]) -> MoleculeBatch:
    """Batch :class:`~metaham.qh9.formats.Record` s (the ``collate_fn`` for a ``DataLoader``)."""
    counts = torch.tensor([len(r.Z) for r in records], dtype=torch.long)
    with_init = all(r.H_init is not None for r in records)
    return MoleculeBatch(
        ids=torch.tensor([r.id for r in records], dtype=torch.long),
        Z=torch.from_numpy(np.concatenate([r.Z for r in records]).astype(np.int64)),
        pos=torch.from_numpy(np.concatenate([r.pos for r in records]).astype(np.float64)),
        batch=torch.repeat_interleave(torch.arange(len(records)), counts),
        ptr=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]),
        H=[torch.from_numpy(r.H) for r in records],
        H_init=[torch.from_numpy(r.H_init) for r in records] if with_init else None,
        molecule=[r.molecule for r in records],
    )


class QH9Dataset(torch.utils.data.Dataset):
    """The rows of a QH9 file at ``indices`` (file positions; all rows when ``None``), read on demand.

    Each item is a :class:`~metaham.qh9.formats.Record` (numpy arrays); batch them with :func:`collate`.
    Works with DataLoader workers (each process reopens the file).

    Args:
        source: a path (opened with :func:`~metaham.qh9.formats.open_qh9`) or an open :class:`QH9File`.
        indices: positions to expose, e.g. ``split(catalog, "stable-id")["train"]``.
        trust_pickle: allow QHBench LMDB files (see :mod:`metaham.qh9.formats`).
    """

    def __init__(
        self, source: QH9File | str | os.PathLike, indices: Sequence[int] | None = None, trust_pickle: bool = False
    ):
        self.file = source if isinstance(source, QH9File) else open_qh9(source, trust_pickle=trust_pickle)
        n = len(self.file)
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            low, high = self.indices.min(), self.indices.max()
            raise IndexError(f"{self.file.path}: indices must lie in [0, {n}), got {low}..{high}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        return self.file[int(self.indices[i])]
