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

``train_speedup`` (the sparse head vs a dense one) joins this benchmark with the QH9 head.
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
    summary, result = _eval_speedup(args, device)
    # train_speedup (sparse vs dense QH9 head) joins here with the head: its summary lines and JSON keys are
    # appended to these.
    return summary, result


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
