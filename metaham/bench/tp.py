"""``metaham bench tp``: sparse vs dense equivariant tensor products, and the pair gate in a message block.

All timings are forward + backward, medians of interleaved repeats, on ``--threads`` CPU threads (or the
device the inputs live on). Three comparisons:

* ``speedup_l2`` / ``speedup_l4``: e3nn's dense ``o3.TensorProduct`` vs our :class:`SparseTensorProduct` in
  the fixed phase at ``--sparsity``, ``"uvu"`` with per-edge weights, ``--edges`` rows, 64x(l<=L) features x
  spherical harmonics l<=L (L = 2, 4). The kept paths are the top ones of random path weights (median over
  ``--kept-sets`` draws: paths differ in cost, so no hand-picked cheap set). Our product at sparsity 0 is
  timed too, so the table separates what the contraction order gains from what dropping paths gains.
* ``speedup_pair_gate``: an :class:`InteractionBlock` (64x(l<=2) features) on a batch of 8 fully connected
  graphs of 12-26 nodes (QH9-sized molecules, 2904 pairs) with a :class:`SparsePairGate` at ``--sparsity`` vs
  the same block without it. Also timed: the block without a gate given only the pairs the gate keeps --
  the bound no pair gate can beat, set by the per-node work that does not shrink with the pairs.

``--backend cuequivariance`` also times the same dense and fixed-phase products with their kept paths run by
cuequivariance-torch (:mod:`metaham.nn.cue_backend`); ``--device cuda`` times everything on a GPU.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from e3nn import o3

from metaham.bench import backend_errors, interleaved_median_times, torch_threads

NAME = "tp"
HELP = "sparse vs dense e3nn tensor product (fixed phase) and a message block with vs without the pair gate"
TARGETS = {"speedup_l2": 2.5, "speedup_l4": 4.0, "speedup_pair_gate": 2.5}
MOLECULE_SIZES = (12, 14, 16, 18, 20, 22, 24, 26)
SETTINGS = ("edges", "sparsity", "repeats", "kept_sets", "threads", "mul", "seed", "backend")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.options import add_device_flag, positive

    parser.add_argument("--edges", type=positive(int), default=1000, help="rows of the tensor products (default 1000)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="sparsity of both gates, in [0, 1) (default 0.7)")
    parser.add_argument("--repeats", type=positive(int), default=7, help="timed repeats per variant (default 7)")
    parser.add_argument(
        "--kept-sets", type=positive(int), default=3, help="random kept-path sets timed per size (default 3)"
    )
    parser.add_argument("--threads", type=positive(int), default=2, help="CPU threads (default 2)")
    parser.add_argument("--mul", type=positive(int), default=64, help="feature multiplicity (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--backend", choices=["torch", "cuequivariance"], default="torch",
        help="cuequivariance: also time the same dense and fixed-phase products with their paths run by "
        "cuequivariance-torch (method naive on a CPU, fused_tp on CUDA; metaham.nn.cue_backend)",
    )
    add_device_flag(parser)


def _irreps(mul: int, lmax: int) -> o3.Irreps:
    return o3.Irreps([(mul, (l, (-1) ** l)) for l in range(lmax + 1)])


def _fwd_bwd(fn, *leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        fn().pow(2).sum().backward()

    return run


def _time_tensor_products(lmax: int, args, generator: torch.Generator, device: torch.device) -> dict:
    import copy

    from metaham.nn import SparseTensorProduct

    features, sh = _irreps(args.mul, lmax), _irreps(1, lmax)
    dense = SparseTensorProduct(features, sh, features, mode="uvu", sparsity=0.0)
    reference = o3.TensorProduct(
        features,
        sh,
        features,
        [(*ins, "uvu", True) for ins in dense.instructions],
        shared_weights=False,
        internal_weights=False,
    )
    dense, reference = dense.to(device), reference.to(device)
    x = torch.randn(args.edges, features.dim, generator=generator).to(device).requires_grad_()
    y = torch.randn(args.edges, sh.dim, generator=generator).to(device)
    w = torch.randn(args.edges, dense.weight_numel, generator=generator).to(device).requires_grad_()
    fns = {
        "e3nn dense": _fwd_bwd(lambda: reference(x, y, w), x, w),
        "ours dense": _fwd_bwd(lambda: dense(x, y, w), x, w),
    }
    kept_sets = []
    for k in range(args.kept_sets):
        sparse = SparseTensorProduct(features, sh, features, mode="uvu", sparsity=args.sparsity)
        with torch.no_grad():
            sparse.path_weight.copy_(torch.rand(sparse.n_paths, generator=generator))
        sparse.set_phase("fixed")
        sparse = sparse.to(device)
        kept_sets.append(list(sparse.kept_paths))
        fns[f"ours fixed #{k}"] = _fwd_bwd(lambda tp=sparse: tp(x, y, w), x, w)
        if args.backend == "cuequivariance":
            cue = copy.deepcopy(sparse)
            cue.set_backend("cuequivariance")
            fns[f"cue fixed #{k}"] = _fwd_bwd(lambda tp=cue: tp(x, y, w), x, w)
    if args.backend == "cuequivariance":
        cue_dense = copy.deepcopy(dense)
        cue_dense.set_backend("cuequivariance")
        fns["cue dense"] = _fwd_bwd(lambda: cue_dense(x, y, w), x, w)
    times = interleaved_median_times(fns, repeats=args.repeats, sync=_sync(device))
    fixed = statistics.median(times[f"ours fixed #{k}"] for k in range(args.kept_sets))
    cue = {}
    if args.backend == "cuequivariance":
        cue_fixed = statistics.median(times[f"cue fixed #{k}"] for k in range(args.kept_sets))
        cue = {
            "cue_method": cue_dense.backend_method,
            "ms_cue_dense": 1e3 * times["cue dense"],
            "ms_cue_fixed": 1e3 * cue_fixed,
            "speedup_cue_fixed_vs_ours_fixed": fixed / cue_fixed,
            "speedup_cue_fixed_vs_e3nn_dense": times["e3nn dense"] / cue_fixed,
        }
    return {
        "n_paths": dense.n_paths,
        "n_kept": len(kept_sets[0]),
        "kept_sets": kept_sets,
        "ms_e3nn_dense": 1e3 * times["e3nn dense"],
        "ms_ours_dense": 1e3 * times["ours dense"],
        "ms_ours_fixed": 1e3 * fixed,
        "ms_ours_fixed_each": [1e3 * times[f"ours fixed #{k}"] for k in range(args.kept_sets)],
        "speedup": times["e3nn dense"] / fixed,
        "speedup_from_sparsity": times["ours dense"] / fixed,
        "speedup_dense_ours_vs_e3nn": times["e3nn dense"] / times["ours dense"],
        **cue,
    }


def _sync(device: torch.device):
    """What makes a timing on ``device`` count its queued work: CUDA's synchronize, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def _time_pair_gate(args, generator: torch.Generator, device: torch.device) -> dict:
    from metaham.nn import InteractionBlock

    # A training batch of 8 molecules of QH9's sizes (12-26 atoms), every pair an edge (QH9-style full graphs).
    sizes = MOLECULE_SIZES
    irreps = _irreps(args.mul, 2)
    pos = torch.cat([2.0 * torch.randn(n, 3, generator=generator) for n in sizes])
    batch = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    first = [sum(sizes[:g]) for g in range(len(sizes))]
    edges = [(first[g] + i, first[g] + j) for g, n in enumerate(sizes) for i in range(n) for j in range(n) if i != j]
    edge_index = torch.tensor(edges).T
    edge_vec = pos[edge_index[1]] - pos[edge_index[0]]
    x = torch.randn(len(batch), irreps.dim, generator=generator)
    cutoff = float(edge_vec.norm(dim=1).max()) + 1.0
    x, edge_vec, edge_index, batch = x.to(device), edge_vec.to(device), edge_index.to(device), batch.to(device)
    blocks = {}
    for name, pair_sparsity in (("without pair gate", None), ("with pair gate", args.sparsity)):
        torch.manual_seed(args.seed)
        blocks[name] = InteractionBlock(irreps, irreps, lmax_sh=2, cutoff=cutoff, pair_sparsity=pair_sparsity)
        blocks[name] = blocks[name].to(device)
    # The bound a pair gate cannot beat: the block without a gate, given only the pairs the gate keeps.
    gated = blocks["with pair gate"]
    with torch.no_grad():
        pair_features = gated.pre(x)[:, gated.irreps_in.dim :]
        kept = gated.pair_gate(pair_features, edge_index, batch).index
    ungated = blocks["without pair gate"]
    inputs = {
        "without pair gate": (ungated, edge_vec, edge_index),
        "with pair gate": (gated, edge_vec, edge_index),
        "no gate, kept pairs only": (ungated, edge_vec[kept], edge_index[:, kept]),
    }
    fns = {
        name: _fwd_bwd(lambda b=block, v=vec, e=index: b(x, v, e, batch), *block.parameters())
        for name, (block, vec, index) in inputs.items()
    }
    times = interleaved_median_times(fns, repeats=args.repeats, sync=_sync(device))
    return {
        "graph_sizes": list(sizes),
        "n_edges": len(edges),
        "n_edges_kept": len(kept),
        "ms_without": 1e3 * times["without pair gate"],
        "ms_with": 1e3 * times["with pair gate"],
        "ms_kept_pairs_only": 1e3 * times["no gate, kept pairs only"],
        "speedup": times["without pair gate"] / times["with pair gate"],
        "speedup_bound": times["without pair gate"] / times["no gate, kept pairs only"],
    }


def run(args: argparse.Namespace) -> tuple[str, dict]:
    from metaham.errors import UsageError
    from metaham.nn import cue_backend
    from metaham.options import resolve_device
    from metaham.text import table
    from metaham.nn.sparse_tp import check_sparsity

    try:
        check_sparsity(args.sparsity, "--sparsity")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.backend == "cuequivariance":
        with backend_errors(f"--backend {args.backend}"):
            cue_backend.require()
    device = resolve_device(args.device)
    with torch_threads(args.threads):
        generator = torch.Generator().manual_seed(args.seed)
        with backend_errors(f"--backend {args.backend}"):  # e.g. a CUDA kernel that does not take these products
            l2 = _time_tensor_products(2, args, generator, device)
            l4 = _time_tensor_products(4, args, generator, device)
        pair = _time_pair_gate(args, generator, device)

    result = {
        "speedup_l2": l2["speedup"],
        "speedup_l4": l4["speedup"],
        "speedup_pair_gate": pair["speedup"],
        "targets": TARGETS,
        "targets_met": {},
        "l2": l2,
        "l4": l4,
        "pair_gate": pair,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "device": str(device),
    }
    result["targets_met"] = {k: result[k] >= v for k, v in TARGETS.items()}
    rows = []
    for key, label, r in (("speedup_l2", "l<=2", l2), ("speedup_l4", "l<=4", l4)):
        rows.append([
            f"TP {args.mul}x(l<=L) x SH, L={label[-1]}, uvu per-edge, {args.edges} edges",
            f"e3nn dense {r['ms_e3nn_dense']:.1f} ms ({r['n_paths']} paths)",
            f"fixed {r['ms_ours_fixed']:.1f} ms ({r['n_kept']} paths)",
            f"{r['speedup']:.2f}x (target {TARGETS[key]}x)",
            f"ours dense {r['ms_ours_dense']:.1f} ms; sparsity alone {r['speedup_from_sparsity']:.2f}x"
            + (f"; cuequivariance ({r['cue_method']}) dense {r['ms_cue_dense']:.1f} ms, "
               f"fixed {r['ms_cue_fixed']:.1f} ms" if args.backend == "cuequivariance" else ""),
        ])
    sizes = pair["graph_sizes"]
    rows.append([
        f"InteractionBlock, {len(sizes)} graphs of {min(sizes)}-{max(sizes)} atoms, all pairs",
        f"no pair gate {pair['ms_without']:.1f} ms ({pair['n_edges']} pairs)",
        f"pair gate {pair['ms_with']:.1f} ms ({pair['n_edges_kept']} pairs)",
        f"{pair['speedup']:.2f}x (target {TARGETS['speedup_pair_gate']}x)",
        f"no gate on the kept pairs only {pair['ms_kept_pairs_only']:.1f} ms: bound {pair['speedup_bound']:.2f}x",
    ])
    summary = (
        f"forward+backward, median of {args.repeats} interleaved repeats, "
        f"{args.threads} CPU threads" + (f", device {device}" if device.type != "cpu" else "")
        + f", sparsity {args.sparsity}\n" + table(rows, ["case", "baseline", "sparse", "speedup", "notes"])
    )
    return summary, result
