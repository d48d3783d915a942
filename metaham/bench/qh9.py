"""QH9 evaluation throughput, end to end: ``metaham qh9 eval``'s route vs QH9's official test route.

Both routes evaluate the same model -- ``QH9Model`` with the defaults of ``configs/qh9.yaml``, sparse gates in
the fixed phase, random weights (values do not change the cost) -- on the same QH9-layout file, from reading
the rows to the per-molecule metrics. The reference is QH9's test loop: one molecule per batch, the model in
float64, forward pass and full-matrix assembly, a pyscf ``Mole`` per molecule for the overlap, Loewdin
orthogonalisation and two float64 eigensolves per matrix (:func:`metaham.qh9.metrics.reference_errors`).
Ours is :func:`metaham.qh9.evaluate.evaluate_model`, which ``metaham qh9 eval`` runs: batches of
``train.eval_batch_size`` molecules, inference mode, the model in its own dtype (float32), overlaps from cached
libcint arrays (cache cleared before every run: cold), one Cholesky factor per molecule for prediction and
target, equal-size molecules in one batched float64 eigensolve. Forward pass and metrics are also timed
separately (the breakdown). Every route runs at one thread and at all of torch's threads (``OMP_NUM_THREADS``,
``torch.set_num_threads``), interleaved; ``eval_speedup`` compares each route at its faster setting. The
routes' predictions differ by the float32 rounding of the model (and, where a pair's gate score ties the
quantile, by that pair being kept in one precision only); the largest differences -- of a matrix entry, an
energy metric and psi, per molecule -- are reported.

The molecules are displaced conformers of the largest closed-shell H/C/N/O/F molecules of ase's G2 set
(QM9-like sizes: 12-14 atoms, 96-114 AOs with the defaults); the file's ``H_init`` is the core Hamiltonian
and its target that plus symmetric noise.

``train_speedup``: one training step -- forward, loss, backward, gradient clipping, AdamW, scheduler step --
of the QH9 model with the sparse gates in the fixed phase (the gates and widths of ``configs/qh9.yaml``: 30% of
each output irrep's tensor-product paths, 30% of the pairs beyond the gates' keep radii) against its dense twin
(same widths, no gates), on the same batch of the largest G2 molecules, timed in alternation (median of
repeats); the fraction of pairs the gates kept on that batch is reported. Which paths the fixed phase keeps is
set by random importance weights (seeded): a trained model keeps the paths its adaptive phase ranked highest,
whose cost may differ from a random subset's; the kept fraction of the dense cost is what the gate removes.
The targets are core Hamiltonians (values do not change the cost).

``--config PATH`` and ``--set KEY=VALUE`` (as for ``metaham qh9 train``) time another model: e.g.
``--set model.pair_sparsity=0`` for tensor-product gates only. The JSON's ``overrides`` lists them.
"""
from __future__ import annotations

import argparse
import contextlib

import numpy as np

from metaham.bench import backend_errors

NAME = "qh9"
HELP = "QH9 model evaluation (metaham qh9 eval vs QH9's one-molecule float64 test route) and training step"
TARGET_EVAL_SPEEDUP = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.options import add_device_flag, positive
    from metaham.qh9.train import COMPILE_BACKENDS

    parser.add_argument("--molecules", type=positive(int), default=8, help="distinct G2 molecules (default 8)")
    parser.add_argument("--conformers", type=positive(int), default=8, help="geometries per molecule (default 8)")
    parser.add_argument("--repeats", type=positive(int), default=3, help="timed repeats per route (default 3)")
    parser.add_argument(
        "--part", choices=["eval", "train", "all"], default="all",
        help="eval: evaluation throughput, model forward + metrics; train: sparse vs dense training step; all: both "
        "(default)",
    )
    parser.add_argument(
        "--eval-batch-size", type=positive(int), default=None,
        help="molecules per batch of our evaluation route (default: train.eval_batch_size of the config)",
    )
    parser.add_argument(
        "--train-molecules", type=positive(int), default=8,
        help="molecules in the training batch: the largest G2 molecules, QM9-sized (default 8)",
    )
    parser.add_argument("--train-repeats", type=positive(int), default=5, help="timed training steps per model (default 5)")
    parser.add_argument("--config", default=None, metavar="PATH", help="model config (default: configs/qh9.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.pair_sparsity=0 (repeatable): time another model",
    )
    parser.add_argument(
        "--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS, metavar="BACKEND",
        help="run our evaluation model and both training-step models under torch.compile with dynamic shapes; "
        "BACKEND: inductor (the default: generated kernels), cudagraphs (CUDA graph replay, on a GPU), aot_eager "
        "or eager (tracing only). The untimed first runs compile, at the threads torch has (time one thread "
        "with OMP_NUM_THREADS=1)",
    )
    parser.add_argument(
        "--tp-backend", choices=["torch", "cuequivariance"], default="torch",
        help="who runs the fixed kept tensor-product paths of our evaluation model and of both training-step "
        "models: torch (our contraction, default) or cuequivariance (cuequivariance-torch; NVIDIA's kernels on "
        "CUDA with pip install 'metaham[cuda]')",
    )
    add_device_flag(parser)


def g2_inputs(n_molecules: int, n_conformers: int, seed: int = 0) -> list[tuple]:
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
    from metaham.options import resolve_device

    device = resolve_device(args.device)
    config = _config(args)
    if args.tp_backend == "cuequivariance":
        from metaham.nn import cue_backend

        # Before the data is made: say what to install at once.
        with backend_errors(f"--tp-backend {args.tp_backend}"):
            cue_backend.require()
    summaries, result = [], {"device": str(device), "config": args.config, "overrides": list(args.overrides)}
    if args.part in ("eval", "all"):
        summary, part = _eval_speedup(args, config, device)
        summaries.append(summary)
        result.update(part)
    if args.part in ("train", "all"):
        summary, part = _train_speedup(args, config["model"], device)
        summaries.append(summary)
        result.update(part)
    return "\n\n".join(summaries), result


def _config(args: argparse.Namespace) -> dict:
    """The QH9 config both parts time: ``--config`` (default ``configs/qh9.yaml``) with the ``--set`` overrides."""
    from metaham.errors import UsageError
    from metaham.qh9.train import DEFAULT_CONFIG, load_train_config
    from metaham.train import ConfigError

    try:
        config = load_train_config(args.config or DEFAULT_CONFIG, args.overrides)
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.part in ("train", "all") and config["model"]["dense"]:
        raise UsageError("model.dense=true: the train part times the config's sparse model against its dense twin")
    return config


def _eval_speedup(args: argparse.Namespace, config: dict, device) -> tuple[str, dict]:
    import copy
    import tempfile
    import time
    from pathlib import Path

    import torch
    from torch_geometric.loader import DataLoader

    from metaham.bench import interleaved_median_times
    from metaham.text import table
    from metaham.qh9.dataset import QH9Dataset, matrices
    from metaham.qh9.evaluate import Evaluator, evaluate_model
    from metaham.nn import use_backend
    from metaham.qh9.train import compile_errors
    from metaham.qh9.metrics import MICRO, SUMMARY_NAMES, reference_errors
    from metaham.qh9.overlap import clear_cache

    batch_size = args.eval_batch_size or config["train"]["eval_batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.db"
        _write_eval_file(path, g2_inputs(args.molecules, args.conformers))
        dataset = QH9Dataset(path)
        records = list(dataset.file)
        model = _trained_shape_model(config["model"], dataset, batch_size).to(device)
        reference_model = copy.deepcopy(model).double()  # QH9's test sets float64 as the default dtype
        with backend_errors(f"--tp-backend {args.tp_backend}"):
            use_backend(model, args.tp_backend)  # ours only, as --compile
        if args.compile:  # ours only: QH9's route is timed as QH9 runs it
            model.compile(dynamic=True, backend=args.compile)

        def ours(keep: bool = False):  # exactly what `metaham qh9 eval` runs on a file that stores H_init
            clear_cache()  # cold: overlaps are part of the cost, as on a first evaluation
            return evaluate_model(model.predict, dataset, batch_size, device, keep_predictions=keep, progress=False)

        def ours_forward() -> None:
            with torch.inference_mode():
                for batch in DataLoader(dataset, batch_size=batch_size):
                    model.predict(batch.to(device))

        def reference(keep: bool = False):
            rows, kept = [], {}
            with torch.no_grad():
                for batch in DataLoader(dataset, batch_size=1):
                    H_pred = reference_model.predict(batch.to(device))[0].cpu().numpy()
                    H_true = matrices(batch, "H")[0].cpu().numpy()
                    rows.append(reference_errors(H_pred, H_true, batch.z.cpu().numpy(), batch.pos.cpu().numpy()))
                    if keep:
                        kept[int(batch.id[0])] = H_pred
            return {k: np.array([r[k] for r in rows]) for k in SUMMARY_NAMES}, kept

        def reference_forward() -> None:
            with torch.no_grad():
                for batch in DataLoader(dataset, batch_size=1):
                    reference_model.predict(batch.to(device))

        # One untimed run of each route (also the warm-up): predictions and per-molecule metrics to compare.
        theirs, theirs_H = reference(keep=True)
        first = time.perf_counter()
        with compile_errors("--compile {}", args.compile):
            _, ours_H = ours(keep=True)
        first = time.perf_counter() - first  # with --compile: the compilation included

        def ours_metrics() -> dict:
            clear_cache()
            evaluator = Evaluator(device)
            evaluator.add_records(records, [torch.from_numpy(ours_H[r.id]) for r in records])
            return evaluator.per_molecule()

        def reference_metrics() -> None:
            for r in records:
                reference_errors(theirs_H[r.id], r.H, r.Z, r.pos)

        mine = ours_metrics()
        routes = {"reference": reference, "batched": ours}
        parts = {"reference_forward": reference_forward, "batched_forward": ours_forward,
                 "reference_metrics": reference_metrics, "batched_metrics": ours_metrics}
        # Every route at one thread and at all the threads torch has: the per-molecule operations of QH9's
        # route are too small to gain from threads (they lose), batched ones gain. Each route is then scored
        # at its faster setting, so the baseline is never handicapped by a thread count that does not suit it.
        available = torch.get_num_threads()
        # Compiled kernels keep the thread count they were generated for: time them only at that count.
        thread_counts = [available] if args.compile else sorted({1, available})
        timed = {**routes, **parts}
        by_key = interleaved_median_times(
            {f"{key}@{t}": _with_threads(t, fn) for t in thread_counts for key, fn in timed.items()},
            repeats=args.repeats, warmup=0,
        )
        dataset.file.close()

    by_threads = {t: {key: by_key[f"{key}@{t}"] for key in timed} for t in thread_counts}
    best = {route: min(thread_counts, key=lambda t: by_threads[t][route]) for route in routes}
    times = {key: by_threads[best[key.split("_")[0]]][key] for key in timed}

    n = len(records)
    energy_keys = [k for k in SUMMARY_NAMES if k != "psi_cos"]
    diff_ueh = MICRO * max(float(np.nanmax(np.abs(mine[k] - theirs[k]))) for k in energy_keys)
    diff_psi = 100.0 * float(np.max(np.abs(mine["psi_cos"] - theirs["psi_cos"])))
    diff_H = max(float(np.abs(ours_H[r.id] - theirs_H[r.id]).max()) for r in records)
    # Relative to what the network adds to H_init. Beyond float32 rounding (~1e-7), a pair whose gate score ties
    # the quantile may be kept in one precision and dropped in the other: a discrete change of that pair's block.
    learned = max(float(np.abs(theirs_H[r.id] - r.H_init).max()) for r in records)
    speedup = times["reference"] / times["batched"]
    met = speedup >= TARGET_EVAL_SPEEDUP
    norbs = [r.norb for r in records]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    names = {"reference": "QH9 test route: 1 molecule at a time, float64 model",
             "batched": f"metaham qh9 eval: batches of {batch_size}, {dtype} model"}
    rows = []
    for route, name in names.items():
        for t in thread_counts:
            ms = {k: 1e3 * v / n for k, v in by_threads[t].items()}
            mark = " *" if len(thread_counts) > 1 and t == best[route] else ""
            rows.append([name, f"{t}{mark}", f"{ms[f'{route}_forward']:.1f}", f"{ms[f'{route}_metrics']:.1f}",
                         f"{ms[route]:.1f}", times["reference"] / by_threads[t][route]])
    summary = (
        f"QH9 evaluation end to end (model forward + metrics) on {n} molecules ({args.molecules} G2 molecules x "
        f"{args.conformers} conformers, {min(norbs)}-{max(norbs)} AOs), "
        f"{'dense' if model.dense else 'sparse fixed-phase'} model of configs/qh9.yaml, device {device}, "
        f"median of {args.repeats}" + (f", ours under torch.compile ({args.compile})" if args.compile else "")
        + (f", our kept tensor-product paths run by {args.tp_backend}" if args.tp_backend != "torch" else "")
        + f"; our first run (untimed{', compiling' if args.compile else ''}) {first:.1f} s"
        + ("; speed-up against the test route at its faster thread count (*)\n" if len(thread_counts) > 1 else "\n")
        + table(rows, ["route", "threads", "forward ms/mol", "metrics ms/mol", "total ms/mol", "speed-up"])
        + f"\neval_speedup {speedup:.2f}{', each route at its faster thread count' if len(thread_counts) > 1 else ''} "
        f"(target >= {TARGET_EVAL_SPEEDUP:g}: {'met' if met else 'NOT met'}); "
        f"the routes differ by at most {diff_H:.1e} Eh in a predicted matrix entry ({diff_H / learned:.1e} of the "
        f"largest entry the network adds to H_init; {dtype} vs float64 model), "
        f"{diff_ueh:.2g} uEh in an energy metric and {diff_psi:.2g} % in psi of one molecule"
    )
    result = {
        "eval_speedup": speedup,
        "eval_target": TARGET_EVAL_SPEEDUP,
        "eval_target_met": met,
        "eval_reference_s": times["reference"],
        "eval_batched_s": times["batched"],
        **{f"eval_{k}_s": times[k] for k in parts},
        "eval_batch_size": batch_size,
        "eval_model_dtype": dtype,
        "eval_compile_backend": args.compile,
        "eval_tp_backend": args.tp_backend,
        "eval_tp_method": next((m.backend_method for m in model.sparsity.gates), None),
        "eval_first_run_s": first,
        "eval_threads": available,
        "eval_reference_threads": best["reference"],
        "eval_batched_threads": best["batched"],
        "eval_by_threads": {str(t): {f"{k}_s": v for k, v in by_threads[t].items()} for t in thread_counts},
        "n_molecules": n,
        "eval_max_matrix_diff_eh": diff_H,
        "eval_max_matrix_rel_diff": diff_H / learned,
        "eval_max_energy_diff_ueh": diff_ueh,
        "eval_max_psi_diff_pct": diff_psi,
        "device": str(device),
    }
    return summary, result


def _with_threads(threads: int, fn):
    """``fn`` run under :func:`metaham.bench.torch_threads` ``(threads)``."""
    from metaham.bench import torch_threads

    def run():
        with torch_threads(threads):
            return fn()

    return run


def _write_eval_file(path, inputs: list[tuple]) -> None:
    """A QH9-stable SQLite file with an ``H_init`` column (the layout ``metaham qh9 generate`` writes) from
    :func:`g2_inputs`' rows: ``H_init`` the core Hamiltonian, ``Ham`` the core Hamiltonian plus noise."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("CREATE TABLE data (id INTEGER PRIMARY KEY, N INTEGER, Z BLOB, pos BLOB, Ham BLOB, H_init BLOB)")
            db.executemany(
                "INSERT INTO data (id, N, Z, pos, Ham, H_init) VALUES (?, ?, ?, ?, ?, ?)",
                [(row + 1, len(Z), np.asarray(Z, np.int32).tobytes(), np.asarray(pos, np.float64).tobytes(),
                  np.asarray(H_noisy).tobytes(), np.asarray(H_core).tobytes())
                 for row, Z, pos, H_core, H_noisy in inputs],
            )
    finally:
        db.close()


def _trained_shape_model(options: dict, dataset, batch_size: int):
    """``QH9Model(**options)`` as training leaves it: gates in the fixed phase (the kept paths chosen by random
    importance weights, seeded), reference blocks and output scale fitted to ``dataset``; eval mode."""
    import torch
    from torch_geometric.loader import DataLoader

    from metaham.qh9.model import QH9Model

    torch.manual_seed(0)
    model = QH9Model(**{**options, "random_steps": 0, "adaptive_steps": 1})
    _seed_path_weights(model)
    model.sparsity.step()  # adaptive: keep the top-weight paths; then fixed: freeze them
    _require_fixed_phase(model)
    model.fit_statistics(DataLoader(dataset, batch_size=batch_size))
    return model.eval()


TARGET_TRAIN_SPEEDUP = 3.0


def _train_speedup(args: argparse.Namespace, model_options: dict, device) -> tuple[str, dict]:
    from torch_geometric.data import Batch

    from metaham.text import table
    from metaham.qh9.dataset import molecule_data

    molecules = [
        molecule_data(Z, pos, H_true, id=row, molecule=str(row))
        for row, Z, pos, H_true, _ in g2_inputs(args.train_molecules, 1)
    ]
    batch = Batch.from_data_list(molecules)
    with backend_errors(f"--tp-backend {args.tp_backend}"):
        result = time_training_steps(
            batch, device, args.train_repeats, model_options, compile=args.compile, tp_backend=args.tp_backend
        )
    speedup, met = result["train_speedup"], result["train_target_met"]
    compiled = result["train_compile_backend"]

    def in_products(model: str) -> str:
        return "-" if compiled else f"{1e3 * result[f'train_{model}_tp_s']:.0f}"

    rows = [
        ["dense twin (no gates)", f"{1e3 * result['train_dense_s']:.0f}", in_products("dense"), 1.0],
        [f"sparse, fixed phase ({result['kept_paths']}/{result['total_paths']} paths, "
         f"{100 * result['kept_pair_fraction']:.0f}% of pairs kept)",
         f"{1e3 * result['train_sparse_s']:.0f}", in_products("sparse"), speedup],
    ]
    summary = (
        f"QH9 model training step on {len(molecules)} molecules ({result['train_atoms']} atoms, "
        f"{int(batch.norb.sum())} AOs), device {device}, median of {args.train_repeats}"
        + (f", both models under torch.compile ({compiled})" if compiled else "")
        + (f", kept tensor-product paths run by {args.tp_backend}" if args.tp_backend != "torch" else "") + "\n"
        + table(rows, ["model", "ms / step", "of which tensor products", "speed-up"])
        + f"\ntrain_speedup {speedup:.2f} (target >= {TARGET_TRAIN_SPEEDUP:g}: {'met' if met else 'NOT met'}); "
        f"{result['parameters_sparse']} parameters (sparse), {result['parameters_dense']} (dense)\n"
    )
    if compiled:
        summary += (
            f"two untimed first steps (compiling): {result['train_dense_first_steps_s']:.0f} s (dense), "
            f"{result['train_sparse_first_steps_s']:.0f} s (sparse); module hooks cannot time the tensor products "
            "inside a compiled graph"
        )
    else:
        summary += (
            f"tensor products alone: {result['train_dense_tp_s'] / result['train_sparse_tp_s']:.2f}x cheaper in the "
            f"sparse model; the rest of the step ({1e3 * (result['train_dense_s'] - result['train_dense_tp_s']):.0f} "
            f"vs {1e3 * (result['train_sparse_s'] - result['train_sparse_tp_s']):.0f} ms) is the same work in both"
        )
    return summary, result


def time_training_steps(
    batch, device, repeats: int, model_options: dict, compile: str | None = None, tp_backend: str = "torch"
) -> dict:
    """Median time of one training step of the sparse model (fixed phase) and of its dense twin on ``batch``
    (a PyG ``Batch`` of :mod:`metaham.qh9.dataset` molecules; its ``H`` are the targets), in alternation. The model is
    ``QH9Model(**model_options)``, learning ``H`` itself; with ``compile`` (a backend name), both under
    ``torch.compile`` (dynamic shapes), compiled by two untimed steps whose seconds are returned; the fixed kept
    tensor-product paths of both run by ``tp_backend`` (:func:`metaham.nn.use_backend`)."""
    import time

    import torch

    from metaham.bench import interleaved_median_times
    from metaham.nn import SparsePairGate, use_backend
    from metaham.qh9.model import QH9Model
    from metaham.qh9.train import compile_errors, matrix_loss

    batch = batch.to(device)
    options = {**model_options, "residual": False}

    def setup(dense: bool):
        torch.manual_seed(0)
        model = QH9Model(**{**options, "dense": dense, "random_steps": 1, "adaptive_steps": 0}).to(device)
        _seed_path_weights(model)
        use_backend(model, tp_backend)  # the sparse model's products take it once fixed, after its first step
        if compile:
            model.compile(dynamic=True, backend=compile)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        target = model.target(batch)

        def step() -> None:
            loss = matrix_loss(model(batch.z, batch.pos, batch.batch, batch.ptr), target, "mae+mse", model.output_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            model.sparsity.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        started = time.perf_counter()
        with compile_errors("--compile {}", compile):
            step()  # the sparse model takes its one random-phase step here and is fixed from now on
            step()  # compiled: the fixed phase is a second graph
        return model, step, time.perf_counter() - started

    sparse, sparse_step, sparse_untimed = setup(False)
    dense, dense_step, dense_untimed = setup(True)
    _require_fixed_phase(sparse)
    # The pairs the pair gates keep, summed over the gates (encoder blocks and head) of one step.
    pair_counts: list[tuple[int, int]] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: pair_counts.append((len(out.index), len(out.score))))
             for m in sparse.modules() if isinstance(m, SparsePairGate)]
    # Hooks see every call only outside a compiled graph. (set_stance is torch >= 2.6; eager runs need none.)
    with torch.compiler.set_stance("force_eager") if compile else contextlib.nullcontext():
        sparse_step()
    for hook in hooks:
        hook.remove()
    times = interleaved_median_times({"dense": dense_step, "sparse": sparse_step}, repeats=repeats, warmup=1)
    speedup = times["dense"] / times["sparse"]
    gates = [g for g in sparse.sparsity.gates if g.sparsity > 0]
    # Module hooks cannot time the inside of a compiled graph.
    in_products = (
        {"dense": None, "sparse": None} if compile
        else _tensor_product_seconds({"dense": (dense, dense_step), "sparse": (sparse, sparse_step)}, repeats)
    )
    return {
        "train_speedup": speedup,
        "train_target": TARGET_TRAIN_SPEEDUP,
        "train_target_met": speedup >= TARGET_TRAIN_SPEEDUP,
        "train_dense_s": times["dense"],
        "train_sparse_s": times["sparse"],
        "train_molecules": len(batch),
        "train_atoms": batch.num_nodes,
        "kept_paths": sum(len(g.kept_paths) for g in gates),
        "total_paths": sum(g.n_paths for g in gates),
        # every pair is kept where no pair gate runs
        "kept_pair_fraction": sum(k for k, _ in pair_counts) / sum(n for _, n in pair_counts) if pair_counts else 1.0,
        "train_dense_tp_s": in_products["dense"],
        "train_sparse_tp_s": in_products["sparse"],
        "train_compile_backend": compile,
        "train_tp_backend": tp_backend,
        "train_dense_first_steps_s": dense_untimed,
        "train_sparse_first_steps_s": sparse_untimed,
        "parameters_sparse": sum(p.numel() for p in sparse.parameters()),
        "parameters_dense": sum(p.numel() for p in dense.parameters()),
    }


def _tensor_product_seconds(models: dict, repeats: int) -> dict[str, float]:
    """Median seconds per training step spent inside each model's tensor products, forward and backward, read
    by module hooks: ``{name: (model, step)}`` -> ``{name: seconds}``, the models' steps in alternation (so that
    the machine's drift hits all alike). The backward part is approximate: autograd may run other work between a
    product's backward hooks. Separate steps from the timed ones: hooks add a little overhead of their own."""
    import statistics
    import time

    from metaham.nn import SparseTensorProduct

    spent, started = [0.0], {}

    def begin(key) -> None:
        started[key] = time.perf_counter()

    def end(key) -> None:
        spent[0] += time.perf_counter() - started.pop(key)

    hooks = []
    for model, _ in models.values():
        for module in model.modules():
            if isinstance(module, SparseTensorProduct):
                hooks += [
                    module.register_forward_pre_hook(lambda m, _args: begin(("forward", m))),
                    module.register_forward_hook(lambda m, _args, _out: end(("forward", m))),
                    module.register_full_backward_pre_hook(lambda m, _grad: begin(("backward", m))),
                    module.register_full_backward_hook(lambda m, _grad_in, _grad_out: end(("backward", m))),
                ]
    per_step: dict[str, list[float]] = {name: [] for name in models}
    try:
        for _ in range(repeats):
            for name, (_, step) in models.items():
                spent[0] = 0.0
                step()
                per_step[name].append(spent[0])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: statistics.median(values) for name, values in per_step.items()}


def _seed_path_weights(model) -> None:
    """Seeded random importance weights on every sparse tensor-product gate of ``model``, so that the fixed phase
    the benchmarks time keeps a random subset of paths (a trained model keeps those its adaptive phase ranked
    highest; the cost depends only on how many are kept)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in model.sparsity.gates:
            if gate.sparsity > 0:
                gate.path_weight.copy_(0.5 + torch.rand(gate.n_paths, generator=generator).to(gate.path_weight))


def _require_fixed_phase(model) -> None:
    if not model.dense and model.sparsity.phase != "fixed":
        raise RuntimeError(f"the sparse model should be in the fixed phase, is in {model.sparsity.phase}")
