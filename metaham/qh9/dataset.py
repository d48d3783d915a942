"""QH9 rows as a PyTorch Geometric dataset: one ``torch_geometric.data.Data`` per molecule, batched by PyG.

A molecule is a plain ``Data`` with these fields (``z`` and ``pos`` as in ``torch_geometric.datasets.QM9``):

============  ==================  =============================================================================
``z``         ``(n_atoms,)``      int64 atomic numbers (H, C, N, O, F)
``pos``       ``(n_atoms, 3)``    positions in Angstrom (float64 from a file)
``H``         ``(norb * norb,)``  float64 Kohn-Sham matrix, Hartree, pyscf AO order, flattened row by row
``H_init``    like ``H``          the MINAO initial-guess Fock matrix, where the file stores it
``norb``      int                 atomic orbitals of the molecule (the side of ``H``), with ``H`` or ``H_init``
``id``        int                 the row's id in its file
``molecule``  str                 the molecule key (per-molecule baselines and splits group on it)
============  ==================  =============================================================================

The matrices are flat because molecules have different numbers of orbitals: PyG batches an attribute by
concatenating it along one dimension, and square matrices of different sizes share none. So any PyG batching
-- ``Batch.from_data_list``, ``torch_geometric.loader.DataLoader``, its samplers -- works unchanged: a ``Batch``
holds ``z``, ``pos``, ``batch`` and ``ptr`` as for any graphs, ``H`` and ``H_init`` as the molecules' flat
matrices one after another, ``norb`` and ``id`` as ``(B,)`` tensors and ``molecule`` as a list, and
:func:`matrices` returns the ``B`` square matrices (views, no copy). :func:`molecule_data` builds a molecule
of your own, from any arrays, without a file.

>>> from torch_geometric.loader import DataLoader
>>> from metaham.qh9.dataset import QH9Dataset, matrices, molecule_data
>>> data = QH9Dataset("qh9_small.db", indices=[0, 1, 2])                # doctest: +SKIP
>>> batch = next(iter(DataLoader(data, batch_size=2)))                  # doctest: +SKIP
>>> batch.z.shape, batch.ptr, [h.shape for h in matrices(batch, "H")]  # doctest: +SKIP

Molecules of your own batch the same way:

>>> import numpy as np
>>> from ase.build import molecule
>>> from torch_geometric.data import Batch
>>> water, h2 = molecule("H2O"), molecule("H2")
>>> batch = Batch.from_data_list([molecule_data(water.numbers, water.positions, H=np.eye(24)),
...                               molecule_data(h2.numbers, h2.positions, H=np.eye(10))])
>>> batch.num_graphs, batch.ptr.tolist(), batch.norb.tolist(), batch.H.shape
(2, [0, 3, 5], [24, 10], torch.Size([676]))
>>> [tuple(h.shape) for h in matrices(batch, "H")]
[(24, 24), (10, 10)]
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.data import Dataset as GeometricDataset

from .formats import QH9File, open_qh9


def molecule_data(z: Any, pos: Any, H: Any = None, H_init: Any = None, **attributes: Any) -> Data:
    """One molecule as a PyG ``Data`` in this module's layout (see the module docstring).

    Args:
        z: ``(n_atoms,)`` atomic numbers; pos: ``(n_atoms, 3)`` positions, Angstrom. Arrays or tensors, shared
            with the result (not copied) where their dtype already fits: int64 for ``z``, any float for ``pos``.
        H, H_init: ``(norb, norb)`` matrices in pyscf AO order, or ``None``; stored flat, without a copy.
        attributes: further fields, e.g. ``id`` and ``molecule``.

    Example (a molecule from ase, for :meth:`~metaham.qh9.model.QH9Model.predict`)::

        atoms = ase.build.molecule("CH3OH")
        data = molecule_data(atoms.numbers, atoms.positions)
    """
    fields = {"z": torch.as_tensor(z, dtype=torch.long), "pos": torch.as_tensor(pos)}
    if fields["pos"].shape != (len(fields["z"]), 3):
        raise ValueError(f"pos must have shape ({len(fields['z'])}, 3) for {len(fields['z'])} atoms, "
                         f"got {tuple(fields['pos'].shape)}")
    norb = None
    for key, value in (("H", H), ("H_init", H_init)):
        if value is None:
            continue
        value = torch.as_tensor(value)
        if value.dim() != 2 or value.shape[0] != value.shape[1] or norb not in (None, value.shape[0]):
            raise ValueError(f"{key} must be a square matrix (the size of any other matrix given), "
                             f"got shape {tuple(value.shape)}")
        norb = value.shape[0]
        fields[key] = value.reshape(-1)
    if norb is not None:
        fields["norb"] = norb
    # One constructor call: PyG's Data pays several microseconds per attribute assignment.
    return Data(**fields, **attributes)


def matrices(data: Data, key: str = "H") -> list[Tensor]:
    """The square ``(norb_b, norb_b)`` matrices ``key`` (``"H"``, ``"H_init"``) of every molecule of a PyG
    ``Batch``, or the one of a single ``Data``: views of the flat field, pyscf order."""
    if "norb" not in data:
        raise ValueError("no 'norb' field: build molecules that carry matrices with metaham.qh9.dataset.molecule_data")
    sizes = torch.as_tensor(data.norb).reshape(-1).tolist()
    return [m.view(n, n) for m, n in zip(data[key].split([n * n for n in sizes]), sizes)]


class QH9Dataset(GeometricDataset):
    """The rows of a QH9 file at ``indices`` (file positions; all rows when ``None``), read on demand.

    A ``torch_geometric.data.Dataset`` of molecule ``Data`` (module docstring): batch it with PyG's
    ``DataLoader``, sample it, subset it (``dataset[10:20]``) as any PyG dataset. Works with DataLoader
    workers (each process reopens the file).

    Args:
        source: a path (opened with :func:`~metaham.qh9.formats.open_qh9`) or an open :class:`QH9File`.
        indices: positions to expose, e.g. ``split(catalog, "stable-id")["train"]``.
        trust_pickle: allow QHBench LMDB files (see :mod:`metaham.qh9.formats`).
        transform: applied to every molecule as it is read (PyG's ``transform``).

    Attributes:
        file: the open :class:`QH9File`. positions: ``(n,)`` int64 file positions of the items.
    """

    def __init__(
        self,
        source: QH9File | str | os.PathLike,
        indices: Sequence[int] | None = None,
        trust_pickle: bool = False,
        transform: Callable[[Data], Data] | None = None,
    ):
        self.file = source if isinstance(source, QH9File) else open_qh9(source, trust_pickle=trust_pickle)
        n = len(self.file)
        # Not "indices": PyG's Dataset has a method of that name, for the subsets it makes.
        self.positions = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.positions.size and (self.positions.min() < 0 or self.positions.max() >= n):
            low, high = self.positions.min(), self.positions.max()
            raise IndexError(f"{self.file.path}: indices must lie in [0, {n}), got {low}..{high}")
        super().__init__(transform=transform)

    def len(self) -> int:
        return len(self.positions)

    def get(self, idx: int) -> Data:
        r = self.file[int(self.positions[idx])]
        return molecule_data(r.Z, r.pos, r.H, r.H_init, id=r.id, molecule=r.molecule)
