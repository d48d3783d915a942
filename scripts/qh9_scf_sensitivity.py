"""How accurate must a predicted Hamiltonian be to shorten an SCF? The exact H plus symmetric Gaussian noise.

    python scripts/qh9_scf_sensitivity.py runs/results_qh9/small12.db --split test --every 3 \
        --noise 1e-5 1e-4 5e-4 2e-3 [--predictions preds.npz] [--json]

For every chosen molecule of the split (QH9's split of the file, every EVERY-th row) and every noise level
``sigma`` (Hartree), the SCF start density of ``H + sigma * (G + G^T) / 2`` (G standard normal, seeded by the
row) is scored against the true start density (``||dD||_S = sqrt(tr(dD S dD S))``) and used to start pyscf's
SCF with the file's settings, beside MINAO's guess (`metaham.qh9.scf.scf_starts`). With `--predictions` (an npz
of `metaham qh9 eval --save-predictions`) a model's matrices are scored the same way. Prints, per start, the
mean and median of the cycle ratio (start / MINAO), the share of molecules made slower and the median
``||dD||_S``; with --json one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from metaham.qh9 import open_qh9
from metaham.qh9.basis import n_occupied
from metaham.qh9.data import split_positions
from metaham.qh9.generate import DFTSettings
from metaham.qh9.overlap import overlap
from metaham.qh9.scf import predicted_density, scf_starts
from metaham.qh9.train import load_train_config


def density_error(H: np.ndarray, reference: np.ndarray, S: np.ndarray, nocc: int) -> float:
    dD = predicted_density(H, S, nocc) - reference
    return float(np.sqrt(max(np.trace(dD @ S @ dD @ S), 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    parser.add_argument("--every", type=int, default=3, help="score every EVERY-th row of the split")
    parser.add_argument("--noise", type=float, nargs="+", default=[1e-5, 1e-4, 5e-4, 2e-3])
    parser.add_argument("--predictions", help="npz of `metaham qh9 eval --save-predictions`")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    f = open_qh9(args.data)
    settings = DFTSettings.from_metadata(f.metadata)
    positions = split_positions(f, load_train_config()["data"], args.split)[:: args.every]  # the default split
    predicted = np.load(args.predictions) if args.predictions else None
    starts = {f"H + noise {s:g}": s for s in args.noise}
    if predicted is not None:
        starts["model"] = None
    results: dict[str, dict[str, list[float]]] = {name: {"ratio": [], "dD": []} for name in starts}
    for record in f.records(positions):
        z, pos = np.asarray(record.Z), np.asarray(record.pos)
        S = overlap(z, pos)
        n, nocc = len(S), n_occupied(z)
        H = np.asarray(record.H).reshape(n, n)
        reference = predicted_density(H, S, nocc)
        rng = np.random.default_rng(int(record.id))
        for name, sigma in starts.items():
            if sigma is None:
                M = np.asarray(predicted[f"H_{record.id}"]).reshape(n, n)
            else:
                G = rng.standard_normal((n, n))
                M = H + sigma * 0.5 * (G + G.T)
            run = scf_starts(z, pos, M, settings)
            results[name]["ratio"].append(run.cycles_pred / run.cycles_minao)
            results[name]["dD"].append(density_error(M, reference, S, nocc))
    summary = {
        name: {"n": len(r["ratio"]), "ric_mean": float(np.mean(r["ratio"])), "ric_median": float(np.median(r["ratio"])),
               "slower_fraction": float(np.mean(np.asarray(r["ratio"]) > 1)), "dD_median": float(np.median(r["dD"]))}
        for name, r in results.items()
    }
    print(f"{args.data}: {args.split} split, one row in {args.every} ({len(positions)} molecules); SCF cycles "
          "from each start / from MINAO's guess")
    for name, s in summary.items():
        print(f"  {name:20s} ratio mean {s['ric_mean']:.3f}, median {s['ric_median']:.3f}, slower "
              f"{100 * s['slower_fraction']:.0f}%, median ||dD||_S {s['dD_median']:.1e}")
    if args.json:
        print(json.dumps({"data": args.data, "split": args.split, "every": args.every, "starts": summary}))


if __name__ == "__main__":
    main()
