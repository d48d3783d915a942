"""Choose `train.task_scale` on held-in systems only: adapt every leave-one-out checkpoint to fresh tasks of its own
TRAINING systems and compare the unit options there (docs/meta-learning.md, "Tasks in their own units").

    scripts/meta_units_heldin.py none=runs/results_meta/gcn support_rms=runs/task_scale/gcn \
        support_state=runs/state_units/gcn [--steps 10] [--tasks 20] [--seed 1] [--json]

For each option, each split leave_<X> found under its folder and each training system Y of that split: the
meta-trained, pre-trained and random models adapt (the `metaham adapt` protocol, K = 50) to N fresh parameter draws
of Y (seed 1: draws that differ from `metaham adapt`'s default seed 0). The held-out system X is never evaluated
here. Reported per option: the mean over (split, training system) pairs of each model's mean NMSE after `--steps`
steps (each task's MSE over its own targets' mean square, so systems of different scale count alike), and how
many pairs keep meta < pre-trained < random on raw means. The option with the lowest meta NMSE is the held-in
choice.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from metaham.meta.evaluate import evaluate_adaptation, load_run

MODELS = ("meta", "pretrained", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="OPTION=FOLDER", help="a unit option and its leave_* runs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--shots", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    options = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"{item!r}: expected OPTION=FOLDER with an existing folder")
        options[name] = sorted(p for p in Path(folder).glob("leave_*") if (p / "meta.pt").is_file())
        if not options[name]:
            parser.error(f"{folder}: no finished leave_* runs")

    pairs: dict[str, list[dict]] = {name: [] for name in options}
    for name, dirs in options.items():
        for run_dir in dirs:
            run = load_run(run_dir)
            for system in run.split.train_systems:
                report = evaluate_adaptation(run, system, shots=args.shots, steps=args.steps, n_tasks=args.tasks,
                                             seed=args.seed, progress=False).to_dict()
                at = str(args.steps)
                row = {"split": run.split.name, "system": system}
                row.update({f"{m}_nmse": report["models"][m]["vf_nmse"][at] for m in MODELS})
                row.update({f"{m}_mse": report["models"][m]["vf_mse"][at] for m in MODELS})
                pairs[name].append(row)
                print(f"{name} {run.split.name} {system}: NMSE@{args.steps} "
                      + " / ".join(f"{row[f'{m}_nmse']:.4g}" for m in MODELS), file=sys.stderr)

    summary = {}
    for name, rows in pairs.items():
        summary[name] = {f"{m}_nmse_mean": statistics.fmean(r[f"{m}_nmse"] for r in rows) for m in MODELS}
        summary[name]["order_held"] = sum(r["meta_mse"] < r["pretrained_mse"] < r["random_mse"] for r in rows)
        summary[name]["pairs"] = len(rows)
    choice = min(summary, key=lambda n: summary[n]["meta_nmse_mean"])
    print(f"held-in adaptation (training systems of each split, {args.tasks} fresh tasks, seed {args.seed}, "
          f"K={args.shots}, {args.steps} steps): mean NMSE meta / pre-trained / random, order kept on raw means")
    print("| task_scale | mean NMSE@%d meta / pre-trained / random | meta < pre-trained < random (raw means) |" % args.steps)
    print("| --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['meta_nmse_mean']:.4g} / {s['pretrained_nmse_mean']:.4g} / {s['random_nmse_mean']:.4g} "
              f"| {s['order_held']} of {s['pairs']} |")
    print(f"held-in choice (lowest meta NMSE): {choice}")
    if args.json:
        print(json.dumps({"steps": args.steps, "tasks": args.tasks, "seed": args.seed, "options": summary,
                          "pairs": pairs, "choice": choice}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
