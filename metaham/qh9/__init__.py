"""QH9: DFT Kohn-Sham matrices of small molecules (B3LYP/def2-SVP) -- data, orbital layout, metrics.

* :mod:`~metaham.qh9.formats` -- :func:`open_qh9` streams QH9's SQLite files and QHBench's LMDB as
  :class:`Record` s (Z, positions in Angstrom, H in pyscf order).
* :mod:`~metaham.qh9.splits` -- QH9's official splits (:func:`split`).
* :mod:`~metaham.qh9.dataset` -- :class:`QH9Dataset`, a PyTorch Geometric dataset of molecules (``Data`` with
  ``z``, ``pos``, flat ``H``/``H_init`` and ``norb``) for PyG's loaders; :func:`molecule_data` builds one from
  any arrays, :func:`matrices` splits a ``Batch``'s matrices back into square ones.
* :mod:`~metaham.qh9.generate` -- ``generate.generate`` new data with pyscf and QH9's settings.
* :mod:`~metaham.qh9.orbitals` -- the def2-SVP layout in e3nn terms: :func:`assemble` padded e3nn-order
  blocks into full pyscf-order matrices, :func:`wigner_D` of a molecule's AO space.
* :mod:`~metaham.qh9.evaluate` -- QH9's metrics, batched: :func:`evaluate_predictions`, :func:`evaluate_model`.
* :mod:`~metaham.qh9.scf` -- SCF acceleration: :func:`scf_acceleration`, pyscf's SCF cycles from a predicted H
  against MINAO's guess.

Names are imported on first use, so that the generator's pyscf worker processes never load torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "open_qh9": "formats",
    "Record": "formats",
    "split": "splits",
    "QH9Dataset": "dataset",
    "molecule_data": "dataset",
    "matrices": "dataset",
    "assemble": "orbitals",
    "wigner_D": "orbitals",
    "evaluate_predictions": "evaluate",
    "evaluate_model": "evaluate",
    "scf_acceleration": "scf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
