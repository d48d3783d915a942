"""Trivial predictors scored with QH9's metrics: what a learned model has to beat.

``minao``
    The Fock matrix of pyscf's MINAO initial-guess density (superposed atomic densities, no SCF): read from
    the file's ``H_init`` column when present, else computed with pyscf (B3LYP5/def2-SVP, grid level 3;
    ~0.1-2 s per molecule). This is the starting point SPHNet-style models learn a correction to.
``mean``
    Per molecule, the mean target matrix over that molecule's training geometries (needs a split in which
    test molecules also appear in training, e.g. ``dynamic-geo``); molecules without training rows are not
    scored, and the number scored is reported.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch

from metaham.text import bar_disabled

from .dataset import QH9Dataset, matrices
from .evaluate import Predictor, evaluate_model
from .formats import QH9File
from .generate import DFTSettings, initial_guess_fock
from .splits import select

BASELINES = ("minao", "mean")


def minao_predictor(settings: DFTSettings = DFTSettings()) -> Predictor:
    """``predict(batch)`` returning ``batch.H_init``, or pyscf's MINAO-guess Fock matrices when absent."""

    def predict(batch: Batch) -> list[torch.Tensor]:
        if "H_init" in batch:
            return matrices(batch, "H_init")
        out = []
        for b in range(batch.num_graphs):
            lo, hi = int(batch.ptr[b]), int(batch.ptr[b + 1])
            F = initial_guess_fock(batch.z[lo:hi].cpu().numpy(), batch.pos[lo:hi].cpu().numpy(), settings)
            out.append(torch.from_numpy(F).to(batch.pos.device))
        return out

    return predict


def mean_matrices(
    file: QH9File, positions: Sequence[int], molecules: set[str], progress: bool | None = True
) -> dict[str, np.ndarray]:
    """Mean ``H`` per molecule over the rows at ``positions`` whose molecule is in ``molecules`` (streamed)."""
    from tqdm import tqdm

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    rows = file.records(positions)
    bar = tqdm(rows, total=len(positions), desc="mean", unit="row", file=sys.stderr, disable=bar_disabled(progress))
    for record in bar:
        if record.molecule not in molecules:
            continue
        if record.molecule in sums and sums[record.molecule].shape != record.H.shape:
            raise ValueError(f"{file.path}: row {record.id}: molecule {record.molecule} changes its atoms between rows")
        sums[record.molecule] = sums.get(record.molecule, 0.0) + record.H
        counts[record.molecule] = counts.get(record.molecule, 0) + 1
    return {m: sums[m] / counts[m] for m in sums}


def mean_predictor(means: dict[str, np.ndarray]) -> Predictor:
    """``predict(batch)`` returning each molecule's mean training matrix (``KeyError`` for unseen molecules)."""

    def predict(batch: Batch) -> list[torch.Tensor]:
        return [torch.from_numpy(means[m]).to(batch.pos.device) for m in batch.molecule]

    return predict


def score_baselines(
    file: QH9File,
    part: str = "test",
    scheme: str | None = None,
    seed: int = 43,
    names: Sequence[str] = BASELINES,
    device: torch.device | str | None = None,
    batch_size: int = 16,
    progress: bool | None = True,
) -> dict:
    """Score the baselines ``names`` on ``part`` of ``file`` under the split ``scheme``.

    Returns:
        ``{"split_by", "part", "n", "baselines": {name: summary}}`` with each summary as in
        :func:`~metaham.qh9.metrics.summarize` (``n`` there is the number of molecules scored).
    """
    from .splits import default_scheme

    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    catalog = file.catalog()
    scheme = scheme or default_scheme(catalog)
    positions = select(catalog, part, scheme, seed)
    if not len(positions):
        raise ValueError(f"{file.path}: the {part!r} part of the {scheme} split is empty ({len(catalog)} rows in all)")
    settings = DFTSettings.from_metadata(file.metadata)  # the file's own settings, QH9's where it has none
    results = {}
    for name in names:
        if name == "minao":
            predict, rows = minao_predictor(settings), positions
        else:
            train = select(catalog, "train", scheme, seed)
            means = mean_matrices(file, train, {str(m) for m in catalog.molecule[positions]}, progress)
            seen = np.array([p for p in positions if str(catalog.molecule[p]) in means], dtype=np.int64)
            if not len(seen):
                results[name] = {"n": 0, "note": f"no {part} molecule appears in the train part of the {scheme} split"}
                continue
            predict, rows = mean_predictor(means), seen
        results[name], _ = evaluate_model(predict, QH9Dataset(file, rows), batch_size, device, progress=progress)
    return {"split_by": scheme, "part": part, "n": int(len(positions)), "baselines": results}
