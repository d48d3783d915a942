"""The QH9 data of a training run: the file, its split into parts, the initial guess, batches in a fixed order.

:func:`open_data` opens a QH9 file (checking its basis), :func:`split_positions` selects the rows of a part
under a run's ``data`` settings, :func:`make_dataset` builds the PyG datasets of a run (computing ``H_init`` where
a residual model needs it and the file has none), and :func:`batches` / :func:`epoch_order` give the batches
of an epoch in an order that depends on ``(seed, epoch)`` only, so a resumed run reads what an uninterrupted
one would.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from .basis import normalize_basis
from .dataset import QH9Dataset
from .formats import QH9File, open_qh9
from .splits import default_scheme, select


def open_data(path: str | Path, trust_pickle: bool = False) -> QH9File:
    """Open a QH9 file and check that it is def2-SVP (the only layout the model has)."""
    file = open_qh9(path, trust_pickle=trust_pickle)
    basis = file.metadata.get("basis")
    if basis is not None:
        try:
            normalize_basis(str(basis))
        except ValueError as exc:
            file.close()
            raise ValueError(f"{path}: {exc}") from None
    return file


def split_scheme(file: QH9File, data: Mapping[str, Any]) -> str:
    """The split scheme a run's ``data.split_by`` means for ``file`` (``auto`` chosen from its catalog)."""
    return default_scheme(file.catalog()) if data["split_by"] == "auto" else data["split_by"]


def split_positions(file: QH9File, data: Mapping[str, Any], part: str) -> np.ndarray:
    """File positions of ``part`` (train, val, test, all) under the config's split; ``max_train`` /
    ``max_val`` keep the first rows of a shuffled order (fixed by ``data.seed``)."""
    positions = select(file.catalog(), part, split_scheme(file, data), data["seed"])
    limit = {"train": data["max_train"], "val": data["max_val"]}.get(part, 0)
    if limit and len(positions) > limit:
        positions = np.sort(np.random.RandomState(data["seed"]).permutation(positions)[:limit])
    return positions


def with_initial_guess(data: Data, cache: dict[int, torch.Tensor], xc: str = "b3lyp5") -> Data:
    """One molecule (a :class:`~metaham.qh9.dataset.QH9Dataset` item) with ``H_init``, the MINAO-guess Fock
    matrix, computed with pyscf where the file has none; kept in ``cache`` by row id (~0.1-2 s per molecule the
    first time). A dataset ``transform``: ``QH9Dataset(file, transform=partial(with_initial_guess, cache=...))``."""
    if "H_init" in data:
        return data
    from .generate import DFTSettings, initial_guess_fock

    row = int(data.id)
    if row not in cache:
        F = initial_guess_fock(data.z.numpy(), data.pos.numpy(), DFTSettings(xc=xc))
        cache[row] = torch.from_numpy(F).reshape(-1)  # flat, as the dataset stores matrices
    data.H_init = cache[row]
    return data


def make_dataset(file: QH9File, positions: np.ndarray, residual: bool) -> QH9Dataset:
    """The molecules at ``positions``; a residual model's molecules carry ``H_init`` (pyscf computes it, once
    per row, where the file has none)."""
    xc = str(file.metadata.get("xc", "b3lyp5"))
    prepare = functools.partial(with_initial_guess, cache={}, xc=xc) if residual else None
    return QH9Dataset(file, positions, transform=prepare)


def batches(dataset: QH9Dataset, batch_size: int, order: np.ndarray | None = None) -> Iterator[Batch]:
    """PyG batches of ``batch_size`` molecules, in ``order`` (default: the dataset's)."""
    # Not a DataLoader: each of its iterators draws a seed from torch's global generator, whose state a resumed
    # run restores -- the draws would differ between a resumed and an uninterrupted run.
    order = np.arange(len(dataset)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield Batch.from_data_list([dataset[int(i)] for i in order[start : start + batch_size]])


def step_cost(n_atoms: np.ndarray) -> np.ndarray:
    """A molecule's relative cost in a training step, ``n (n + 6)`` for ``n`` atoms: atom pairs plus per-atom
    work. Fitted to the forward and backward pass of the default model on G2 molecules of 4-14 atoms, one
    thread (per molecule ~0.15 ms per atom plus ~0.027 ms per atom pair, over a fixed ~24 ms per step); used
    to give the ranks of a data-parallel step shards of equal cost."""
    n = np.asarray(n_atoms, dtype=np.float64)
    return n * (n + 6.0)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a function of ``(seed, epoch)`` only, so resuming reproduces it."""
    return np.random.default_rng([seed, epoch]).permutation(n)
