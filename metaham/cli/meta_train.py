"""``metaham meta-train``: meta-train a Hamiltonian graph network (and its pre-trained baseline) on a split."""
from __future__ import annotations

import argparse

from metaham.errors import UsageError
from metaham.options import add_plugin_flag, load_plugins, resolve_device
from metaham.text import eprint, table

from ._common import add_json_flag, add_progress_flag, emit, progress_setting

HELP = "meta-train a HamiltonianGNN with MAML (and the pre-trained baseline) on the training systems of a split"
EXAMPLES = """
  metaham meta-train --config configs/meta_train.yaml --out runs/leave_pendulum
  metaham meta-train --config meta_train_leave_mass_spring --set train.outer_steps=500 --out runs/ms
  metaham meta-train --out runs/leave_pendulum --resume              continue an interrupted run
  torchrun --standalone --nproc_per_node 2 -m metaham meta-train --out runs/lp     data parallel, 2 ranks
  metaham meta-train --config configs/meta_train.yaml --set model.hidden=32 --set train.pretrain=false --out runs/x --json
then: metaham adapt --checkpoint runs/leave_pendulum --system pendulum --shots 50 --steps 50
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.yaml|NAME", default=None,
        help="run config: a file or a shipped config's name (default: meta_train, i.e. configs/meta_train.yaml; "
        "with --resume: the run's saved config.yaml); see `metaham config list`",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a config value, e.g. --set train.outer_steps=500 --set model.hidden=32 (repeatable)",
    )
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory for checkpoints, logs, config")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    add_progress_flag(parser)
    add_plugin_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaham.meta import training
    from metaham.meta.config import DEFAULT_CONFIG, load_meta_config, resolve_split
    from metaham.train import ConfigError
    from metaham.train.config import CONFIG_FILE
    from metaham.train.distributed import open_world

    load_plugins(args.plugin)
    run_dir = Path(args.out)
    config_path = args.config
    if config_path is None:
        saved = run_dir / CONFIG_FILE
        config_path = saved if args.resume and saved.is_file() else DEFAULT_CONFIG
    try:
        config = load_meta_config(config_path, args.overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        # Under torchrun the ranks train together (one process otherwise); rank 0 alone writes and prints.
        with open_world(resolve_device(config["device"])) as world:
            results = training.train(config, run_dir, resume=args.resume,
                                     progress=progress_setting(args), world=world)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except FloatingPointError as exc:  # a diverging run: say so plainly; the last checkpoint is kept
        eprint(f"metaham meta-train: error: {exc}")
        return 1
    if not world.is_main:
        return 0
    split = resolve_split(config["split"])

    rows = [
        [kind, f"{r.steps}/{r.outer_steps}", r.final_loss if r.final_loss is not None else "-",
         f"{r.seconds:.1f}", r.checkpoint]
        for kind, r in results.items()
    ]
    summary = (
        f"split {split.name}: trained on {', '.join(split.train_systems)}; held out: {', '.join(split.test_systems)}\n"
        f"model {config['model']['backbone']} (hidden {config['model']['hidden']}, layers {config['model']['layers']}), "
        f"MAML inner lr {config['maml']['inner_lr']:g} x {config['maml']['inner_steps']} step(s), "
        f"Adam lr {config['train']['lr']:g}, meta-batch {config['train']['meta_batch']}"
        f"{f' over {world.size} ranks' if world.distributed else ''}\n"
        + table(rows, ["learner", "steps", "final loss", "seconds", "checkpoint"])
        + f"\nnext: metaham adapt --checkpoint {run_dir} --system {split.test_systems[0]} --shots "
        f"{config['tasks']['k_support']} --steps 50"
    )
    result = {
        "run_dir": str(run_dir),
        "config": str(run_dir / CONFIG_FILE),
        "split": split.name,
        "train_systems": list(split.train_systems),
        "test_systems": list(split.test_systems),
        "backbone": config["model"]["backbone"],
        "learners": {kind: r.to_dict() for kind, r in results.items()},
        "world_size": world.size,
    }
    return emit(args, summary, result)
