"""Score predicted Kohn-Sham matrices with QH9's metrics: streamed, grouped by size, eigenproblems batched.

The flow every evaluator shares (``metaham qh9 eval`` and ``metaham qh9 baseline``): a predictor is any
callable ``predict(batch) -> list[Tensor]`` that takes a PyG ``Batch`` of molecules (:mod:`metaham.qh9.dataset`)
and returns one ``(norb_b, norb_b)`` matrix per molecule in pyscf order; :func:`evaluate_model` runs it over a
dataset in batches of PyG's ``DataLoader`` (inference mode: a trained model runs its batched forward pass in its
own dtype) and feeds an :class:`Evaluator`, which buffers molecules by AO count and scores each full group with
one batched float64 call of :func:`~metaham.qh9.metrics.molecule_errors`. QH9's own test runs one molecule at a
time in float64; ``metaham bench qh9 --part eval`` times the two routes against each other. Under ``torchrun``
(:mod:`metaham.train.distributed`) :func:`evaluate_model` shares the batches among the ranks and joins their
per-molecule errors, so the summary is the one a single process computes. :func:`load_model` reads a trained
model back from a run of ``metaham qh9 train`` and :func:`evaluate_checkpoint` scores it on a part of the run's
split.

>>> from metaham.qh9.evaluate import evaluate_predictions
>>> summary = evaluate_predictions(records, [r.H for r in records])  # doctest: +SKIP
>>> summary["h_mae_ueh"], summary["psi_cos_pct"]                     # doctest: +SKIP
(0.0, 100.0)
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from metaham.nn import use_backend
from metaham.train.checkpoint import atomic_write_bytes, load_checkpoint
from metaham.train.distributed import (
    World, all_gather_objects, current_world, gather_objects, rank_bar_disabled, shard_slice,
)

from .basis import ao_atom_index, n_occupied
from .data import make_dataset, open_data, split_positions, split_scheme
from .dataset import QH9Dataset, matrices
from .formats import Record
from .metrics import SUMMARY_NAMES, molecule_errors, summarize
from .model import CHECKPOINT_FORMAT, QH9Model, build_model
from .overlap import overlap

Predictor = Callable[[Batch], Sequence[Tensor]]


class Evaluator:
    """Accumulates QH9 errors molecule by molecule; :meth:`summary` gives the means in QH9's units.

    Args:
        device: where the eigenproblems run (default CPU); inputs on any device are moved there.
        group_size: molecules of equal AO count scored per batched call (bounds memory).
    """

    def __init__(self, device: torch.device | str | None = None, group_size: int = 64):
        self.device = torch.device(device or "cpu")
        self.group_size = group_size
        self._pending: dict[int, list[tuple]] = {}
        self._ids: list[int] = []
        self._errors: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_NAMES}

    def add(
        self, row_id: int, Z: np.ndarray, pos: np.ndarray, H_true: np.ndarray | Tensor, H_pred: np.ndarray | Tensor
    ) -> None:
        """Queue one molecule: ``Z`` ``(n_atoms,)``, ``pos`` ``(n_atoms, 3)`` Angstrom, matrices ``(norb, norb)``."""
        Z = np.asarray(Z, dtype=np.int64)
        norb = int(np.shape(H_true)[0])
        if tuple(np.shape(H_pred)) != (norb, norb):
            raise ValueError(f"row {row_id}: prediction has shape {tuple(np.shape(H_pred))}, target ({norb}, {norb})")
        group = self._pending.setdefault(norb, [])
        group.append((int(row_id), Z, np.asarray(pos, dtype=np.float64), H_true, H_pred))
        if len(group) >= self.group_size:
            self._score(self._pending.pop(norb))

    def add_records(self, records: Iterable[Record], predictions: Iterable[np.ndarray | Tensor]) -> None:
        """Queue records with their predictions (same order)."""
        for record, H_pred in zip(records, predictions, strict=True):
            self.add(record.id, record.Z, record.pos, record.H, H_pred)

    def _matrices(self, items: list[tuple], column: int) -> Tensor:
        return torch.stack([torch.as_tensor(item[column]).to(self.device, torch.float64) for item in items])

    def _score(self, items: list[tuple]) -> None:
        S = torch.from_numpy(np.stack([overlap(Z, pos) for _, Z, pos, _, _ in items])).to(self.device)
        atom_of = torch.from_numpy(np.stack([ao_atom_index(Z) for _, Z, _, _, _ in items])).to(self.device)
        nocc = torch.tensor([n_occupied(Z) for _, Z, _, _, _ in items], device=self.device)
        try:
            errors = molecule_errors(self._matrices(items, 4), self._matrices(items, 3), S, atom_of, nocc)
        except ValueError as exc:
            raise ValueError(f"rows {[item[0] for item in items]}: {exc}") from None
        self._ids.extend(item[0] for item in items)
        for key, value in errors.items():
            self._errors[key].append(value.cpu().numpy())

    def per_molecule(self) -> dict[str, np.ndarray]:
        """``{"id": (n,), <error>: (n,)}`` in Hartree (``psi_cos`` a fraction), ordered by row id."""
        for norb in list(self._pending):
            self._score(self._pending.pop(norb))
        parts = {"id": [np.asarray(self._ids, dtype=np.int64)], **self._errors}
        return by_row_id(parts)

    def summary(self) -> dict[str, float]:
        """Means over all molecules added so far: ``n``, ``h_mae_ueh``, ..., ``psi_cos_pct`` (see metrics)."""
        return summarize(self.per_molecule())


def by_row_id(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Join per-molecule columns given in pieces (``parts["id"]`` the row ids) and order them by row id: the one
    order every summary is computed in, however the molecules were grouped, batched or spread over ranks."""
    ids = np.concatenate(parts["id"]) if parts["id"] else np.zeros(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    return {key: np.concatenate(pieces)[order] if pieces else np.zeros(0) for key, pieces in parts.items()}


def evaluate_predictions(
    records: Sequence[Record], predictions: Sequence[np.ndarray | Tensor], device: torch.device | str | None = None
) -> dict[str, float]:
    """QH9 metrics of ``predictions`` (one ``(norb, norb)`` pyscf-order matrix per record) against the records."""
    evaluator = Evaluator(device)
    evaluator.add_records(records, predictions)
    return evaluator.summary()


def evaluate_model(
    predict: Predictor,
    dataset: QH9Dataset,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    keep_predictions: bool = False,
    progress: bool | None = True,
    num_workers: int = 0,
    world: World | None = None,
) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """Run ``predict`` over ``dataset`` in batches and score every prediction, sharded over ranks.

    With several ranks (``world``; default :func:`~metaham.train.distributed.current_world`, i.e. the ranks a
    ``torchrun`` command set up, else this process alone) every rank must call this: rank ``k`` predicts and
    scores its contiguous share of the batches (the same batches one process forms, so no molecule's prediction
    depends on the number of ranks), and the per-molecule errors of all ranks are joined in row-id order before
    averaging, so the summary is the one a single process computes.

    Args:
        predict: ``predict(batch) -> list of (norb_b, norb_b) tensors`` (pyscf order), batch on ``device``.
        dataset: the rows to score.
        batch_size: molecules per ``predict`` call.
        device: where batches, predictions and eigenproblems live (default CPU).
        keep_predictions: also return the predicted matrices (float64, CPU) by row id.
        world: the ranks to share the work with (pass :data:`~metaham.train.distributed.SINGLE_PROCESS` to
            score everything here alone).

    Returns:
        ``(summary, predictions)``: the metrics (see :func:`~metaham.qh9.metrics.summarize`), the same on every
        rank, and ``{row_id: matrix}`` of all ranks on rank 0 (empty elsewhere, and unless ``keep_predictions``).
    """
    from tqdm import tqdm

    world = current_world() if world is None else world
    device = torch.device(device or "cpu")
    evaluator = Evaluator(device)
    kept: dict[int, np.ndarray] = {}
    batches = shard_slice(-(-len(dataset) // batch_size), world)
    mine = dataset[batches.start * batch_size : batches.stop * batch_size]
    loader = DataLoader(mine, batch_size=batch_size, num_workers=num_workers)
    hide = rank_bar_disabled(progress, world)
    with torch.inference_mode():  # no autograd bookkeeping at all (cheaper than no_grad)
        for batch in tqdm(loader, desc="eval", unit="batch", file=sys.stderr, disable=hide):
            batch = batch.to(device)
            predictions = list(predict(batch))
            if len(predictions) != batch.num_graphs:
                raise ValueError(f"predictor returned {len(predictions)} matrices for {batch.num_graphs} molecules")
            for b, (H_true, H_pred) in enumerate(zip(matrices(batch, "H"), predictions)):
                lo, hi = int(batch.ptr[b]), int(batch.ptr[b + 1])
                row_id = int(batch.id[b])
                evaluator.add(row_id, batch.z[lo:hi].cpu().numpy(), batch.pos[lo:hi].cpu().numpy(), H_true, H_pred)
                if keep_predictions:
                    kept[row_id] = H_pred.detach().to("cpu", torch.float64).numpy()
    shards = all_gather_objects(evaluator.per_molecule(), world)
    summary = summarize(by_row_id({key: [shard[key] for shard in shards] for key in shards[0]}))
    if keep_predictions:
        kept = {row_id: H for part in gather_objects(kept, world) or [] for row_id, H in part.items()}
    return summary, kept


def save_predictions(path: str | os.PathLike, predictions: dict[int, np.ndarray]) -> None:
    """Write predictions atomically to an ``.npz``: ``ids`` (int64) and one ``H_<id>`` array per row (pyscf
    order, float64). Read back with ``np.load(path)[f"H_{id}"]``."""
    ids = np.array(sorted(predictions), dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids, **{f"H_{i}": predictions[int(i)] for i in ids})
    atomic_write_bytes(path, buffer.getvalue())


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[QH9Model, dict[str, Any]]:
    """The model of a checkpoint file, or of a run directory (its ``best.pt``, else ``last.pt``), in eval mode;
    returns ``(model, checkpoint dict)``."""
    path = Path(checkpoint)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("best.pt", "last.pt")) and (path / "meta.pt").is_file():
            raise FileNotFoundError(
                f"{path}: no best.pt or last.pt; it holds a `metaham meta-train` run: adapt that with `metaham adapt`"
            )
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a metaham QH9 model checkpoint (from `metaham qh9 train`)")
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    part: str = "test",
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    keep_predictions: bool = False,
    progress: bool | None = True,
    trust_pickle: bool = False,
    tp_backend: str = "torch",
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """QH9 metrics of a trained model on ``part`` of ``data`` (default: the training file), split as in training,
    in batches of ``batch_size`` molecules (default: the run's ``train.eval_batch_size``), the kept
    tensor-product paths run by ``tp_backend`` (``"torch"`` or ``"cuequivariance"``, see
    :func:`metaham.nn.use_backend`).

    Returns:
        ``(summary, predictions)``: :func:`~metaham.qh9.metrics.summarize`'s keys plus ``part``,
        ``split_by``, ``phase``, ``dense``, ``residual``; predictions ``{row_id: (norb, norb)}`` pyscf order
        when ``keep_predictions``.
    """
    device = torch.device(device)
    model, state = load_model(checkpoint, device)
    use_backend(model, tp_backend)
    if any(m.runs_on != tp_backend for m in model.sparsity.gates):
        raise ValueError(
            f"tensor-product backend {tp_backend!r} runs fixed kept paths, and this model is in the "
            f"{model.sparsity.phase!r} phase: train it into the fixed phase first, or use the backend 'torch'"
        )
    config = state["config"]
    data = config["data"]["file"] if data is None else data
    batch_size = batch_size or config["train"]["eval_batch_size"]
    with open_data(data, trust_pickle) as file:
        positions = split_positions(file, {**config["data"], "max_train": 0, "max_val": 0}, part)
        if not len(positions):
            raise ValueError(f"{file.path}: the {part!r} part of the split is empty ({len(file)} rows in all)")
        summary, predictions = evaluate_model(
            model.predict, make_dataset(file, positions, model.residual), batch_size, device,
            keep_predictions=keep_predictions, progress=progress,
        )
        scheme = split_scheme(file, config["data"])
    summary.update(part=part, split_by=scheme, data=str(data), phase=model.sparsity.phase, dense=model.dense,
                   residual=model.residual, tp_backend=tp_backend,
                   tp_method=next((m.backend_method for m in model.sparsity.gates), None))
    return summary, predictions
