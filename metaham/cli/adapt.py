"""``metaham adapt``: few-shot adaptation of the meta-trained, pre-trained and random models to a system."""
from __future__ import annotations

import argparse

from metaham.atomic import check_output
from metaham.errors import UsageError
from metaham.options import add_device_flag, add_plugin_flag, get_system, load_plugins, positive, resolve_device
from metaham.text import table

from ._common import add_json_flag, add_progress_flag, emit, progress_setting

HELP = "adapt the meta-trained, pre-trained and random models to fresh tasks of a system and compare them"
EXAMPLES = """
  metaham adapt --checkpoint runs/leave_pendulum --system pendulum --shots 50 --steps 50
  metaham adapt --checkpoint runs/leave_pendulum --system pendulum --shots 10 --steps 20 --tasks 30 --plot adapt.png
  metaham adapt --checkpoint runs/leave_pendulum --plugin my_system.py --system my_system --shots 50 --steps 50 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `metaham meta-train` run directory")
    parser.add_argument("--system", required=True, help="system to adapt to (see `metaham systems`; --plugin adds yours)")
    parser.add_argument("--shots", required=True, type=positive(int), metavar="K", help="support points per task")
    parser.add_argument("--steps", required=True, type=positive(int), metavar="S", help="SGD steps of adaptation")
    parser.add_argument("--tasks", type=positive(int), default=20, metavar="N",
                        help="tasks, each a fresh parameter draw of the system (default: 20)")
    parser.add_argument("--seed", type=positive(int, allow_zero=True), default=0,
                        help="seeds the fresh tasks and the random model (default: 0)")
    parser.add_argument("--lr", type=positive(float), default=None,
                        help="adaptation SGD learning rate (default: the run's maml.inner_lr)")
    parser.add_argument("--backtrack", type=positive(int, allow_zero=True), default=None, metavar="M",
                        help="halve a step that does not lower the support loss up to M times, skip it if none "
                             "does (default: 10; 0: plain SGD)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="save adaptation curves and a rollout here")
    add_progress_flag(parser)
    add_plugin_flag(parser)
    add_device_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaham.meta.evaluate import evaluate_adaptation, load_run
    from metaham.train import ConfigError

    load_plugins(args.plugin)
    get_system(args.system)
    device = resolve_device(args.device)
    if args.plot is not None and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--plot {args.plot}: give a .png, .pdf or .svg file name")
    if args.plot is not None:
        check_output(args.plot, "--plot")
    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such run directory")
    try:
        run_ = load_run(args.checkpoint)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    try:
        report = evaluate_adaptation(
            run_, args.system, shots=args.shots, steps=args.steps, n_tasks=args.tasks, seed=args.seed, lr=args.lr,
            **({} if args.backtrack is None else {"backtrack": args.backtrack}),
            device=device, progress=progress_setting(args),
        )
    except ConfigError as exc:  # e.g. more shots than a task's trajectories hold
        raise UsageError(str(exc)) from None
    result = report.to_dict()
    if args.plot is not None:
        from metaham.viz import plot_adaptation

        plot_adaptation(report, args.plot)
        result["plot"] = args.plot

    steps = [str(s) for s in report.eval_steps]
    rows = [
        [name, *(m["vf_mse"][s] for s in steps), m["vf_nmse"][steps[-1]], m["rollout_rel_err"], m["energy_rel_err"]]
        for name, m in result["models"].items()
    ]
    header = ["model", *(f"mse@{s}" for s in steps), f"nmse@{steps[-1]}", "rollout err", "energy err"]
    diverged = {name: m["diverged_tasks"] for name, m in result["models"].items() if m["diverged_tasks"]}
    where = {
        "test": f"held out from training: a test system of split {result['split']}",
        "test_ranges": f"held out from training: the held-out parameter ranges of split {result['split']}",
        "unseen": f"held out from training: not in split {result['split']}",
        "train": f"NOT held out: trained on {', '.join(result['train_systems'])}",
    }[result["split_role"]]
    summary = (
        f"{args.system} ({where}), K={args.shots}, {args.steps} steps, {result['tasks']} tasks, "
        f"backbone {result['backbone']}, task scale {result['task_scale']}\n"
        + table(rows, header)
        + "".join(f"\n{name}: SGD diverged on {n} of {result['tasks']} tasks (their MSE is inf/nan, so is the mean)"
                  for name, n in diverged.items())
        + f"\nprotocol: {result['protocol']}"
        + (f"\nplot: {args.plot}" if args.plot else "")
    )
    return emit(args, summary, result)
