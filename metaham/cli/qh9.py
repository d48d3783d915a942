"""``metaham qh9``: QH9 Hamiltonian-matrix data -- generate it with pyscf, inspect it, score baselines."""
from __future__ import annotations

import argparse

from metaham.atomic import check_output
from metaham.errors import UsageError
from metaham.options import add_device_flag, positive, resolve_device
from metaham.text import eprint, table

from ._common import add_json_flag, add_progress_flag, emit, progress_setting

HELP = (
    "QH9 (B3LYP/def2-SVP Kohn-Sham matrices): generate data with pyscf, inspect files, score baselines, "
    "train and evaluate the sparse equivariant Hamiltonian model"
)
EXAMPLES = """
  metaham qh9 generate --out small.db --molecules H2O CH4 --conformers 4 --workers 2
  metaham qh9 generate --out g2.db --molecules g2 --conformers 10 --displacement 0.05
  metaham qh9 generate --out part_$SLURM_ARRAY_TASK_ID.db --molecules g2 --conformers 10 --shard $SLURM_ARRAY_TASK_ID/8
  metaham qh9 merge --out g2.db part_*.db --json
  metaham qh9 info QH9Stable.db --json
  metaham qh9 info processed/QH9Stable.lmdb --trust-pickle
  metaham qh9 baseline --data g2.db --split test --split-by dynamic-geo --json
  metaham qh9 train --config configs/qh9.yaml --data g2.db --out runs/sparse
  metaham qh9 train --data g2.db --out runs/dense --set model.dense=true --set train.epochs=10
  metaham qh9 train --out runs/sparse --resume
  torchrun --standalone --nproc_per_node 2 -m metaham qh9 train --data g2.db --out runs/sparse
  metaham qh9 eval --checkpoint runs/sparse --split test --save-predictions pred.npz --json
  torchrun --standalone --nproc_per_node 4 -m metaham qh9 eval --checkpoint runs/sparse --split all
  metaham qh9 eval --checkpoint runs/sparse --split test --scf --scf-workers 2 --json
"""


# `qh9 info` reads every matrix of files up to this size (seconds); larger ones on --check. It stops counting
# bad rows at MAX_PROBLEMS.
CHECK_ROWS = 5000
MAX_PROBLEMS = 20

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="qh9_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "generate",
        help="restricted Kohn-Sham Fock matrices with QH9's pyscf settings, into a QH9-stable SQLite file",
        description="Run pyscf (grid level 3, SCF tolerance 1e-13, DIIS 8) on molecules and displaced "
        "conformers; one committed row per geometry, so an interrupted run resumes where it stopped.",
    )
    p.add_argument("--out", required=True, metavar="FILE.db", help="SQLite file to create or resume")
    p.add_argument(
        "--molecules",
        nargs="+",
        default=["g2"],
        metavar="g2|NAME|PATH.xyz",
        help="'g2' (ase's 73 closed-shell H/C/N/O/F G2 molecules), G2 names (H2O CH4 ...) or XYZ files "
        "(default: g2)",
    )
    p.add_argument(
        "--conformers", type=positive(int), default=1, help="geometries per molecule, the given one first (default 1)"
    )
    p.add_argument(
        "--displacement", type=positive(float, allow_zero=True), default=0.05,
        help="std. dev. of the Gaussian displacement of each coordinate, Angstrom (default 0.05)",
    )
    p.add_argument("--xc", default="b3lyp5", help="functional (default b3lyp5 = QH9's B3LYP on pyscf >= 2.3)")
    p.add_argument("--basis", default="def2-svp", help="basis set (only def2-svp is supported)")
    p.add_argument("--workers", type=positive(int), default=1, help="parallel processes (default 1)")
    p.add_argument(
        "--seed", type=positive(int, allow_zero=True), default=0, help="seed of the displacements (default 0)"
    )
    p.add_argument(
        "--shard", type=_shard, metavar="K/N",
        help="compute only part K of N (K = 1..N, e.g. $SLURM_ARRAY_TASK_ID/8 under #SBATCH --array=1-8) of the "
        "job the other flags describe, into its own --out file (any name; the file records K/N); "
        "join the N files with `metaham qh9 merge`",
    )
    p.add_argument(
        "--max-orbitals", type=positive(int), default=600,
        help="refuse molecules with more def2-SVP atomic orbitals before any SCF starts (default 600, about 15 min "
        "per geometry on one core; QH9's molecules have up to ~230)",
    )
    add_json_flag(p)
    add_progress_flag(p)
    p.set_defaults(_qh9=_generate)

    p = sub.add_parser(
        "merge",
        help="join the files of `generate --shard K/N` into the file the unsharded run writes",
        description="Checks that the files are the shards of one job with one set of DFT settings, each shard "
        "once, none unfinished, then writes the rows in id order to a temporary file beside --out and renames "
        "it. Refused (exit 2, naming the files): duplicates, mismatched settings or jobs, missing or unfinished "
        "shards (unless --allow-partial), an existing --out (unless --force).",
    )
    p.add_argument("shards", nargs="+", metavar="SHARD.db", help="the shard files (any order)")
    p.add_argument("--out", required=True, metavar="FILE.db", help="the merged file to write")
    p.add_argument(
        "--allow-partial", action="store_true",
        help="merge an incomplete set (missing or unfinished shards), reporting what is absent; ids stay those "
        "of the whole job, exact unless an absent geometry would have failed",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    add_json_flag(p)
    p.set_defaults(_qh9=_merge)

    p = sub.add_parser("info", help="format, rows, elements, atoms and orbitals per molecule of a QH9 file")
    p.add_argument("file", metavar="FILE", help="QH9 SQLite file or QHBench LMDB")
    p.add_argument(
        "--check", action="store_true",
        help=f"read every row's matrices (sizes, finite values); done anyway for files of <= {CHECK_ROWS} rows",
    )
    _add_trust_flag(p)
    add_json_flag(p)
    p.set_defaults(_qh9=_info)

    p = sub.add_parser(
        "baseline",
        help="QH9 metrics of trivial predictors: MINAO initial-guess Fock, per-molecule mean training matrix",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="QH9 SQLite file or QHBench LMDB")
    _add_split_flags(p)
    p.add_argument("--baselines", default="minao,mean", help="comma-separated: minao, mean (default both)")
    p.add_argument("--batch-size", type=positive(int), default=16, help="molecules per batch (default 16)")
    add_device_flag(p)
    _add_trust_flag(p)
    add_json_flag(p)
    add_progress_flag(p)
    p.set_defaults(_qh9=_baseline)

    _add_model_commands(sub)


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle", action="store_true",
        help="allow QHBench LMDB files: their records are pickles, and unpickling runs code from the file",
    )


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    from metaham.qh9.splits import QH9_SEED, SCHEMES

    p.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"], help="part to score (default test)"
    )
    p.add_argument(
        "--split-by", default="auto", choices=["auto", *SCHEMES],
        help="QH9's split scheme (default auto: dynamic-geo when molecules have several geometries, else stable-id)",
    )
    p.add_argument(
        "--seed", type=int, default=QH9_SEED, help=f"seed of the stable-id and dynamic-mol splits (default {QH9_SEED})"
    )


def run(args: argparse.Namespace) -> int:
    from metaham.qh9.basis import UnsupportedError
    from metaham.qh9.formats import QH9FormatError

    try:
        return args._qh9(args)
    except (QH9FormatError, UnsupportedError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


def _open(path: str, trust_pickle: bool):
    from metaham.qh9.formats import open_qh9

    return open_qh9(path, trust_pickle=trust_pickle)


def _molecules(items: list[str]):
    from pathlib import Path

    from metaham.qh9.generate import g2_molecules, read_xyz

    molecules, names = [], []
    for item in items:
        if item == "g2":
            molecules += g2_molecules()
        elif item.lower().endswith(".xyz") or Path(item).is_file():
            molecules += read_xyz(item)
        else:
            names.append(item)
    if names:
        molecules += g2_molecules(names)
    return molecules


def _shard(text: str):
    from metaham.qh9.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _generate(args: argparse.Namespace) -> int:
    from metaham.qh9.generate import DFTSettings, generate

    check_output(args.out, "--out")
    try:
        molecules = _molecules(args.molecules)
        settings = DFTSettings(xc=args.xc, basis=args.basis)
        stats = generate(
            args.out, molecules, conformers=args.conformers, displacement=args.displacement,
            settings=settings, workers=args.workers, seed=args.seed, shard=args.shard,
            max_orbitals=args.max_orbitals, progress=progress_setting(args),
        )
    except ValueError as exc:  # bad molecule, basis, xc, or an --out file that cannot be resumed
        raise UsageError(str(exc)) from exc
    share = f" (shard {stats['shard']} of a {stats['job_total']}-geometry job)" if args.shard else ""
    summary = (
        f"{stats['out']}: {stats['computed']} geometries computed, {stats['existing']} already present, "
        f"{stats['failed']} failed (SCF not converged; recorded in table 'failed') "
        f"of {stats['total']} asked for{share}, in {stats['seconds']:.1f} s"
    )
    return emit(args, summary, stats)


def _merge(args: argparse.Namespace) -> int:
    from metaham.qh9.shards import merge

    try:
        result = merge(args.out, args.shards, allow_partial=args.allow_partial, force=args.force)
    except ValueError as exc:  # MergeError: the message names the files
        raise UsageError(str(exc)) from exc
    summary = f"{result['out']}: {result['rows']} rows ({result['failed']} failed geometries) from " + (
        f"{len(result['shards'])} of {result['count']} shards"
    )
    if not result["complete"]:
        absent = result["missing_shards"] + result["unfinished_shards"]
        summary += (
            f"\nPARTIAL: {result['missing_geometries']} geometries absent; missing or unfinished shards: "
            + ", ".join(absent)
        )
    return emit(args, summary, result)


def _info(args: argparse.Namespace) -> int:
    from metaham.qh9.formats import check_rows, describe

    with _open(args.file, args.trust_pickle) as f:
        info = describe(f)
        info["checked"] = args.check or info["n"] <= CHECK_ROWS
        if info["checked"]:
            n, problems = check_rows(f, limit=MAX_PROBLEMS)
            if problems:
                more = f" (one of {len(problems)}{'+' if len(problems) == MAX_PROBLEMS else ''} bad rows)" if len(problems) > 1 else ""
                raise UsageError(f"{problems[0]}{more}")

    def span(s: dict) -> str:
        return "-" if s["min"] is None else f"{s['min']}-{s['max']} (mean {s['mean']:.1f})"

    lines = [
        f"{info['path']}: {info['format']}, {info['n']} rows, {info['molecules']} molecules",
        f"elements {' '.join(info['elements']) or '-'}; atoms {span(info['atoms'])}; orbitals {span(info['orbitals'])}",
        f"H_init (MINAO-guess Fock) stored: {'yes' if info['has_H_init'] else 'no'}",
    ]
    meta = info["metadata"]
    if meta:
        lines.append(
            f"generated by {meta.get('generator')}: {meta.get('xc')}/{meta.get('basis')}, grid level "
            f"{meta.get('grid_level')}, conv_tol {meta.get('conv_tol')}, "
            f"displacement {meta.get('displacement_angstrom')} A, "
            f"seed {meta.get('seed')}, pyscf {meta.get('pyscf_version')}; {info['failed']} failed geometries"
        )
    lines.append(
        "every row read: sizes, elements and finite values checked" if info["checked"]
        else f"matrices not read ({info['n']} rows; --check reads every row)"
    )
    return emit(args, "\n".join(lines), info)


def _baseline(args: argparse.Namespace) -> int:
    from metaham.qh9.baselines import score_baselines

    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    device = resolve_device(args.device)
    with _open(args.data, args.trust_pickle) as f:
        try:
            result = score_baselines(
                f, part=args.split, scheme=None if args.split_by == "auto" else args.split_by, seed=args.seed,
                names=names, device=device, batch_size=args.batch_size, progress=progress_setting(args),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    rows = []
    for name, s in result["baselines"].items():
        if not s["n"]:
            rows.append([name, 0] + ["-"] * 8)
            continue
        rows.append([
            name, s["n"], s["h_mae_ueh"], s["h_diag_mae_ueh"], s["h_offdiag_mae_ueh"], s["eps_mae_ueh"],
            s["psi_cos_pct"], s["homo_mae_ueh"], s["lumo_mae_ueh"], s["gap_mae_ueh"],
        ])
    header = ["baseline", "n", "H uEh", "H diag", "H off", "eps uEh", "psi %", "HOMO", "LUMO", "gap"]
    summary = (
        f"{args.data}: {result['part']} part of the {result['split_by']} split ({result['n']} rows); "
        "errors in micro-Hartree, orbital cosine in %\n" + table(rows, header)
    )
    return emit(args, summary, {"data": args.data, **result})


# -- the model: train and eval ---------------------------------------------------------------------------------


def _add_model_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the sparse equivariant Hamiltonian model (or its dense twin) on a QH9 file",
        description="AdamW with warm-up and decay, gradient clipping, the three-phase sparsity scheduler, "
        "validation H MAE after every epoch; writes config.yaml, best.pt, last.pt and log.csv into --out.",
    )
    p.add_argument(
        "--config", metavar="FILE.yaml|NAME",
        help="run config: a file or a shipped config's name (default: qh9, i.e. configs/qh9.yaml; with --resume: "
        "the run's saved config.yaml); see `metaham config list`",
    )
    p.add_argument("--data", metavar="FILE", help="QH9 SQLite file or QHBench LMDB (required unless --resume)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.dense=true (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's device)")
    _add_trust_flag(p)
    add_json_flag(p)
    add_progress_flag(p)
    p.set_defaults(_qh9=_train)

    p = sub.add_parser(
        "eval",
        help="QH9 metrics of a trained model (H, diagonal and off-diagonal MAE, orbital energies, orbital cosine)",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE.pt", help="a run directory (its best.pt) or a checkpoint")
    p.add_argument("--data", metavar="FILE", help="QH9 file (default: the file the model was trained on)")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"],
        help="part of the training split to score (default test)",
    )
    p.add_argument("--save-predictions", metavar="FILE.npz", help="write the predicted matrices (pyscf order) with row ids")
    p.add_argument(
        "--batch-size", type=positive(int), default=None,
        help="molecules per batched forward pass (default: train.eval_batch_size of the run's config)",
    )
    p.add_argument(
        "--scf", action="store_true",
        help="also run pyscf's SCF (the file's settings) from MINAO's guess and from each prediction: cycles, "
        "their ratio, share of molecules made slower, max |dE| (scf_* keys)",
    )
    p.add_argument("--scf-workers", type=positive(int), default=1, metavar="N", help="processes for --scf (default 1)")
    p.add_argument(
        "--tp-backend", default="torch", choices=["torch", "cuequivariance"],
        help="who runs the model's kept tensor-product paths: torch (our contraction, default) or cuequivariance "
        "(cuequivariance-torch; NVIDIA's fused kernels on CUDA with pip install 'metaham[cuda]')",
    )
    add_device_flag(p)
    _add_trust_flag(p)
    add_json_flag(p)
    add_progress_flag(p)
    p.set_defaults(_qh9=_eval)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaham.qh9.train import DEFAULT_CONFIG, load_train_config, train
    from metaham.train import ConfigError
    from metaham.train.config import CONFIG_FILE
    from metaham.train.distributed import open_world

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.file={Path(args.data).resolve()}")
    if args.device:
        resolve_device(args.device)  # a usage error now rather than after loading the data
        overrides.append(f"device={args.device}")
    base = args.config
    if base is None:
        base = Path(args.out) / CONFIG_FILE if args.resume else DEFAULT_CONFIG
    try:
        config = load_train_config(base, overrides)
        if not config["data"]["file"]:
            raise UsageError("--data FILE is required (or --resume a run that has one)")
        # Under torchrun the ranks train together (one process otherwise); rank 0 alone writes and prints.
        with open_world(resolve_device(config["device"])) as world:
            result = train(config, args.out, resume=args.resume, progress=progress_setting(args),
                           trust_pickle=args.trust_pickle, world=world)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    except FloatingPointError as exc:  # a diverging run: say so plainly; last.pt keeps the last good step
        eprint(f"metaham qh9 train: error: {exc}")
        return 1
    if not world.is_main:
        return 0
    kind = "dense twin" if config["model"]["dense"] else f"sparse model (phase {result['phase']})"
    summary = (
        f"{args.out}: {kind} trained for {result['epochs']} epochs, {result['steps']} steps, "
        f"{result['seconds']:.1f} s ({result['stopped']}) on {result['n_train']} rows"
        f"{f' on {world.size} ranks' if world.distributed else ''}\n"
        f"validation H MAE: initial {_fmt(result['initial_val_h_mae_ueh'])} uEh, best "
        f"{_fmt(result['best_val_h_mae_ueh'])} uEh (epoch {result['best_epoch']}), last "
        f"{_fmt(result['last_val_h_mae_ueh'])} uEh on {result['n_val']} rows\n"
        f"checkpoints {args.out}/best.pt, {args.out}/last.pt; log {args.out}/log.csv"
    )
    return emit(args, summary, result)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _eval(args: argparse.Namespace) -> int:
    from metaham.qh9.evaluate import evaluate_checkpoint, save_predictions
    from metaham.train import ConfigError
    from metaham.train.distributed import open_world

    device = resolve_device(args.device)
    if args.save_predictions:
        check_output(args.save_predictions, "--save-predictions")
    # Under torchrun every rank scores its share of the molecules (evaluate_model shards over the world opened
    # here); rank 0 alone gets the predictions, prints and writes.
    try:
        with open_world(device) as world:
            summary, predictions = evaluate_checkpoint(
                args.checkpoint, args.data, args.split, world.device_for(device), args.batch_size,
                keep_predictions=bool(args.save_predictions) or args.scf, trust_pickle=args.trust_pickle,
                progress=progress_setting(args), tp_backend=args.tp_backend,
            )
    # ValueError also: a bad METAHAM_DIST_TIMEOUT; ImportError: --tp-backend without its library;
    # NotImplementedError: a CUDA kernel refusing a product
    except (ConfigError, ValueError, ImportError, NotImplementedError) as exc:
        raise UsageError(str(exc)) from exc
    if not world.is_main:
        return 0
    if args.save_predictions:
        save_predictions(args.save_predictions, predictions)
    result = {
        "checkpoint": args.checkpoint, **summary, "predictions": args.save_predictions, "world_size": world.size,
    }
    if args.scf:
        from metaham.qh9.scf import file_scf_acceleration, scf_report

        scf_summary, _ = file_scf_acceleration(
            summary["data"], predictions, args.scf_workers, trust_pickle=args.trust_pickle,
            progress=progress_setting(args),
        )
        result.update(scf_summary)
    s = summary
    rows = [[
        "dense twin" if s["dense"] else f"sparse ({s['phase']})", s["n"], s["h_mae_ueh"], s["h_diag_mae_ueh"],
        s["h_offdiag_mae_ueh"], s["eps_mae_ueh"], s["psi_cos_pct"], s["homo_mae_ueh"], s["lumo_mae_ueh"],
        s["gap_mae_ueh"],
    ]]
    header = ["model", "n", "H uEh", "H diag", "H off", "eps uEh", "psi %", "HOMO", "LUMO", "gap"]
    ranks = f" on {world.size} ranks" if world.distributed else ""
    backend = f"; tensor products run by {s['tp_backend']} ({s['tp_method']})" if s["tp_backend"] != "torch" else ""
    text = (
        f"{s['data']}: {s['part']} part of the {s['split_by']} split{ranks}; errors in micro-Hartree, orbital "
        f"cosine in %{backend}\n"
        + table(rows, header)
        + (f"\npredictions written to {args.save_predictions}" if args.save_predictions else "")
        + (f"\n{scf_report(scf_summary)}" if args.scf else "")
    )
    return emit(args, text, result)
