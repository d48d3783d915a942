"""QH9 evaluation throughput: our batched metrics vs QH9's one-molecule-at-a-time float64 test route.

Both sides start from the same inputs -- atoms, positions, target and predicted matrices -- and produce the
same per-molecule metrics (checked in the run: the largest difference is reported). The reference is QH9's
test loop (a pyscf ``Mole`` per molecule for the overlap, Loewdin orthogonalisation and two eigensolves per
matrix, metrics as tensors read out one by one); ours computes overlaps straight from cached libcint arrays
(cold cache: every repeat recomputes them), factors each overlap once for both matrices and solves
equal-size molecules in one batched call.

The molecules are displaced conformers of the largest closed-shell H/C/N/O/F molecules of ase's G2 set
(QM9-like sizes, 10-14 atoms, 70-110 AOs). Matrix values do not change the cost of either route, so the
"target" is the core Hamiltonian and the "prediction" the target plus symmetric noise.

``train_speedup``: one training step -- forward, loss, backward, gradient clipping, AdamW, scheduler step --
of the QH9 model with the sparse gates in the fixed phase (sparsity 0.7 for tensor-product paths and pairs, the
widths of ``configs/qh9.yaml``) against its dense twin (same widths, no gates), on the same batch of the
largest G2 molecules, timed in alternation (median of repeats). Which paths the fixed phase keeps is set by
random importance weights (seeded): a trained model keeps the paths its adaptive phase ranked highest, whose
cost may differ from a random subset's; the kept fraction of the dense cost is what the gate removes. The
targets are core Hamiltonians (values do not change the cost).
"""
from __future__ import annotations

import argparse

import numpy as np

NAME = "qh9"
HELP = "QH9 evaluation: batched float64 metrics vs QH9's one-molecule-at-a-time test route"
TARGET_EVAL_SPEEDUP = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.cli._common import add_device_flag, positive

    parser.add_argument("--molecules", type=positive(int), default=8, help="distinct G2 molecules (default 8)")
    parser.add_argument("--conformers", type=positive(int), default=8, help="geometries per molecule (default 8)")
    parser.add_argument("--repeats", type=positive(int), default=3, help="timed repeats per route (default 3)")
    parser.add_argument(
        "--part", choices=["eval", "train", "all"], default="all",
        help="eval: metrics throughput; train: sparse vs dense training step; all: both (default)",
    )
    parser.add_argument(
        "--train-molecules", type=positive(int), default=8,
        help="molecules in the training batch: the largest G2 molecules, QM9-sized (default 8)",
    )
    parser.add_argument("--train-repeats", type=positive(int), default=5, help="timed training steps per model (default 5)")
    add_device_flag(parser)


def _inputs(n_molecules: int, n_conformers: int, seed: int = 0) -> list[tuple]:
    """``(id, Z, pos, H_true, H_pred)`` for displaced conformers of the largest usable G2 molecules."""
    from pyscf import gto

    from metaham.qh9.generate import conformer, g2_molecules

    molecules = sorted(g2_molecules(), key=lambda m: (-len(m.Z), m.name))[:n_molecules]
    rng = np.random.default_rng(seed)
    out = []
    for m in molecules:
        for k in range(n_conformers):
            pos = conformer(m, k + 1, 0.05, seed)
            atoms = [[int(z), tuple(p)] for z, p in zip(m.Z, pos)]
            mol = gto.M(atom=atoms, basis="def2-svp", unit="Angstrom", verbose=0)
            H = mol.intor("int1e_kin") + mol.intor("int1e_nuc")
            noise = rng.normal(0.0, 1e-3, H.shape)
            out.append((len(out), m.Z, pos, H, H + 0.5 * (noise + noise.T)))
    return out


def run(args: argparse.Namespace) -> tuple[str, dict]:
    from metaham.cli._common import resolve_device

    device = resolve_device(args.device)
    summaries, result = [], {"device": str(device)}
    if args.part in ("eval", "all"):
        summary, part = _eval_speedup(args, device)
        summaries.append(summary)
        result.update(part)
    if args.part in ("train", "all"):
        summary, part = _train_speedup(args, device)
        summaries.append(summary)
        result.update(part)
    return "\n\n".join(summaries), result


def _eval_speedup(args: argparse.Namespace, device) -> tuple[str, dict]:
    from metaham.bench import interleaved_median_times
    from metaham.cli._common import table
    from metaham.qh9.evaluate import Evaluator
    from metaham.qh9.metrics import SUMMARY_NAMES, reference_errors
    from metaham.qh9.overlap import clear_cache

    inputs = _inputs(args.molecules, args.conformers)

    def batched() -> dict:
        clear_cache()  # cold: overlaps are part of the cost, as on a first evaluation
        evaluator = Evaluator(device)
        for row in inputs:
            evaluator.add(*row)
        return evaluator.per_molecule()

    def reference() -> dict:
        rows = [reference_errors(H_pred, H_true, Z, pos) for _, Z, pos, H_true, H_pred in inputs]
        return {k: np.array([r[k] for r in rows]) for k in SUMMARY_NAMES}

    ours, theirs = batched(), reference()
    max_diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in SUMMARY_NAMES)
    times = interleaved_median_times({"reference": reference, "batched": batched}, repeats=args.repeats, warmup=0)
    n = len(inputs)
    speedup = times["reference"] / times["batched"]
    met = speedup >= TARGET_EVAL_SPEEDUP
    norbs = [len(row[3]) for row in inputs]
    rows = [
        ["QH9 test route (one molecule at a time, float64)", f"{1e3 * times['reference'] / n:.2f}", 1.0],
        ["metaham batched (float64)", f"{1e3 * times['batched'] / n:.2f}", speedup],
    ]
    summary = (
        f"QH9 metrics on {n} molecules ({args.molecules} G2 molecules x {args.conformers} conformers, "
        f"{min(norbs)}-{max(norbs)} AOs), device {device}, median of {args.repeats}\n"
        + table(rows, ["route", "ms / molecule", "speed-up"])
        + f"\neval_speedup {speedup:.2f} (target >= {TARGET_EVAL_SPEEDUP:g}: {'met' if met else 'NOT met'}); "
        f"largest metric difference between the routes {max_diff:.1e} (Hartree or fraction)"
    )
    result = {
        "eval_speedup": speedup,
        "eval_target": TARGET_EVAL_SPEEDUP,
        "eval_target_met": met,
        "eval_reference_s": times["reference"],
        "eval_batched_s": times["batched"],
        "n_molecules": n,
        "max_metric_difference": max_diff,
        "device": str(device),
    }
    return summary, result


TARGET_TRAIN_SPEEDUP = 3.0


def _train_speedup(args: argparse.Namespace, device) -> tuple[str, dict]:
    from metaham.cli._common import table
    from metaham.qh9.dataset import collate
    from metaham.qh9.formats import Record

    records = [
        Record(row, Z, pos, H_true, None, str(row), 0)
        for row, Z, pos, H_true, _ in _inputs(args.train_molecules, 1)
    ]
    result = time_training_steps(collate(records), device, args.train_repeats)
    speedup, met = result["train_speedup"], result["train_target_met"]
    rows = [
        ["dense twin (no gates)", f"{1e3 * result['train_dense_s']:.0f}", 1.0],
        [f"sparse, fixed phase ({result['kept_paths']}/{result['total_paths']} paths, 30% of pairs)",
         f"{1e3 * result['train_sparse_s']:.0f}", speedup],
    ]
    summary = (
        f"QH9 model training step on {len(records)} molecules ({result['train_atoms']} atoms, "
        f"{sum(len(r.H) for r in records)} AOs), device {device}, median of {args.train_repeats}\n"
        + table(rows, ["model", "ms / step", "speed-up"])
        + f"\ntrain_speedup {speedup:.2f} (target >= {TARGET_TRAIN_SPEEDUP:g}: {'met' if met else 'NOT met'}); "
        f"{result['parameters_sparse']} parameters (sparse), {result['parameters_dense']} (dense)"
    )
    return summary, result


def time_training_steps(batch, device, repeats: int) -> dict:
    """Median time of one training step of the sparse model (fixed phase) and of its dense twin on ``batch``
    (a :class:`~metaham.qh9.dataset.MoleculeBatch`; its ``H`` are the targets), in alternation."""
    import torch

    from metaham.bench import interleaved_median_times
    from metaham.qh9.model import QH9Model
    from metaham.qh9.train import SCHEMA, matrix_loss

    batch = batch.to(device)
    options = {**SCHEMA["model"], "residual": False}

    def setup(dense: bool):
        torch.manual_seed(0)
        model = QH9Model(**{**options, "dense": dense, "random_steps": 1, "adaptive_steps": 0}).to(device)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for gate in model.sparsity.gates:
                if gate.sparsity > 0:  # random importance weights: the fixed phase keeps a random subset
                    gate.path_weight.copy_(0.5 + torch.rand(gate.n_paths, generator=generator))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        target = model.target(batch)

        def step() -> None:
            loss = matrix_loss(model(batch.Z, batch.pos, batch.batch, batch.ptr), target, "mae+mse", model.output_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            model.sparsity.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step()  # the sparse model takes its one random-phase step here and is fixed from now on
        return model, step

    sparse, sparse_step = setup(False)
    dense, dense_step = setup(True)
    if sparse.sparsity.phase != "fixed":
        raise RuntimeError(f"the sparse model should be in the fixed phase, is in {sparse.sparsity.phase}")
    times = interleaved_median_times({"dense": dense_step, "sparse": sparse_step}, repeats=repeats, warmup=1)
    speedup = times["dense"] / times["sparse"]
    gates = [g for g in sparse.sparsity.gates if g.sparsity > 0]
    return {
        "train_speedup": speedup,
        "train_target": TARGET_TRAIN_SPEEDUP,
        "train_target_met": speedup >= TARGET_TRAIN_SPEEDUP,
        "train_dense_s": times["dense"],
        "train_sparse_s": times["sparse"],
        "train_molecules": len(batch),
        "train_atoms": len(batch.Z),
        "kept_paths": sum(len(g.kept_paths) for g in gates),
        "total_paths": sum(g.n_paths for g in gates),
        "parameters_sparse": sum(p.numel() for p in sparse.parameters()),
        "parameters_dense": sum(p.numel() for p in dense.parameters()),
    }
