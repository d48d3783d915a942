"""``metaham bench maml``: one second-order MAML step, our vmap engine vs a learn2learn-style task loop.

Both sides compute the same meta-gradient of the same HamiltonianGNN on the same meta-batch of equal-shape
tasks (K support + K query points of one system, each task with its own physical parameters):

* ours: :class:`metaham.meta.MAML` -- tasks batched with ``torch.func.vmap``, inner gradient and vector field
  with ``torch.func.grad``;
* baseline: what a learn2learn user writes -- for each task clone the parameters, take the vector field with
  ``torch.autograd.grad(create_graph=True)``, take the inner step with ``torch.autograd.grad(create_graph=True)``,
  add the query loss; then one ``backward()``.

We also time our engine with ``vmap=False`` (same code, one task at a time) to show where the gain comes from,
check that the meta-gradients agree, and report medians over interleaved repeats.
"""
from __future__ import annotations

import argparse

import torch
from torch.func import functional_call

from metaham.errors import UserError

from . import interleaved_median_times, torch_threads

NAME = "maml"
HELP = "second-order MAML step: vmap over tasks (ours) vs a learn2learn-style per-task loop"
TARGET_SPEEDUP = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default="mass_spring", help="system the tasks come from (default: mass_spring)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per meta-batch (default: 10)")
    parser.add_argument("--points", type=int, default=50, help="support (and query) points per task (default: 50)")
    parser.add_argument("--backbone", default="gcn", help="HamiltonianGNN backbone (default: gcn)")
    parser.add_argument("--hidden", type=int, default=64, help="feature width (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="message-passing rounds (default: 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per side (default: 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")


def run(args: argparse.Namespace) -> tuple[str, dict]:
    import systems
    from metaham.hamiltonian import HamiltonianGNN
    from metaham.meta import MAML

    for key in ("tasks", "points", "hidden", "layers", "repeats", "threads"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    with torch_threads(args.threads):
        system = systems.get(args.system)
        torch.manual_seed(0)
        tasks = equal_shape_tasks(system, args.tasks, args.points)
        model = HamiltonianGNN(backbone=args.backbone, hidden=args.hidden, layers=args.layers)
        ours, ours_loop = MAML(model, inner_lr=0.1), MAML(model, inner_lr=0.1, vmap=False)

        def step(meta_loss):
            model.zero_grad()
            meta_loss().backward()

        def meta_gradient(fn):
            fn()
            return [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in model.parameters()]

        fns = {
            "ours_vmap": lambda: step(lambda: ours.meta_loss(tasks)),
            "ours_loop": lambda: step(lambda: ours_loop.meta_loss(tasks)),
            "learn2learn_loop": lambda: step(lambda: _learn2learn_meta_loss(model, tasks, 0.1)),
        }
        agreement = _max_relative_difference(meta_gradient(fns["ours_vmap"]), meta_gradient(fns["learn2learn_loop"]))
        times = interleaved_median_times(fns, repeats=args.repeats, warmup=1)

    speedup = times["learn2learn_loop"] / times["ours_vmap"]
    result = {
        "system": args.system,
        "backbone": args.backbone,
        "tasks": args.tasks,
        "points": args.points,
        "hidden": args.hidden,
        "layers": args.layers,
        "threads": args.threads,
        "repeats": args.repeats,
        "parameters": sum(w.numel() for w in model.parameters()),
        "ours_vmap_s": times["ours_vmap"],
        "ours_loop_s": times["ours_loop"],
        "learn2learn_loop_s": times["learn2learn_loop"],
        "speedup": speedup,
        "speedup_vs_ours_loop": times["ours_loop"] / times["ours_vmap"],
        "meta_gradient_max_rel_diff": agreement,
        "target_speedup": TARGET_SPEEDUP,
        "target_met": speedup >= TARGET_SPEEDUP,
    }
    summary = (
        f"second-order MAML step, {args.tasks} tasks x {args.points}+{args.points} points of {args.system}, "
        f"HamiltonianGNN({args.backbone}, hidden {args.hidden}, {args.layers} layers, {result['parameters']} params), "
        f"{args.threads} threads, median of {args.repeats}\n"
        f"  ours (vmap over tasks)      {1e3 * times['ours_vmap']:8.1f} ms\n"
        f"  ours (one task at a time)   {1e3 * times['ours_loop']:8.1f} ms\n"
        f"  learn2learn-style loop      {1e3 * times['learn2learn_loop']:8.1f} ms\n"
        f"  speed-up vs learn2learn loop: {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: "
        f"{'met' if result['target_met'] else 'NOT met'}); meta-gradients agree to {agreement:.1e} (relative)"
    )
    return summary, result


def equal_shape_tasks(system, n_tasks: int, points: int, seed: int = 0) -> list:
    """``n_tasks`` :class:`~metaham.meta.MetaTask` s of ``system``, each with its own physical parameters and
    ``points`` support and query points (float32), drawn from ``seed``: the meta-batch the benchmarks time."""
    from metaham.hamiltonian import system_edge_index
    from metaham.meta import MetaTask

    generator = torch.Generator().manual_seed(seed)
    graph = system_edge_index(system)
    tasks = []
    for _ in range(n_tasks):
        theta = system.sample_params(1, generator)
        support, query = (_points(system, theta, points, generator) for _ in range(2))
        tasks.append(MetaTask(support, query, graph))
    return tasks


def _points(system, theta: dict, k: int, generator: torch.Generator) -> tuple:
    """K phase-space points of one task (fixed physical parameters) with exact vector-field targets, float32."""
    params = {name: value.expand(k) for name, value in theta.items()}
    q, p = system.sample_initial_state(params, generator)
    dq, dp = system.vector_field(q, p, params)
    return tuple(t.to(torch.float32) for t in (q, p, dq, dp))


def _learn2learn_meta_loss(model, tasks, inner_lr: float):
    """The per-task loop a learn2learn user writes (clone, adapt with create_graph=True, query loss)."""
    params = dict(model.named_parameters())
    total = 0.0
    for support, query, graph in tasks:
        fast = {name: w.clone() for name, w in params.items()}  # learn2learn's clone(): a differentiable copy
        names = list(fast)
        grads = torch.autograd.grad(
            _autograd_vector_field_loss(model, fast, support, graph), [fast[n] for n in names],
            create_graph=True, allow_unused=True,
        )
        fast = {n: fast[n] - inner_lr * g if g is not None else fast[n] for n, g in zip(names, grads)}
        total = total + _autograd_vector_field_loss(model, fast, query, graph)
    return total / len(tasks)


def _autograd_vector_field_loss(model, params, data, graph):
    q, p, dq_dt, dp_dt = data
    q, p = q.clone().requires_grad_(), p.clone().requires_grad_()
    energy = functional_call(model, params, (q, p, graph)).sum()
    dh_dq, dh_dp = torch.autograd.grad(energy, (q, p), create_graph=True)
    return torch.cat([dh_dp - dq_dt, -dh_dq - dp_dt], dim=-1).pow(2).mean()


def _max_relative_difference(a: list, b: list) -> float:
    """Largest difference of two gradients, relative to the largest entry of the reference ``b``."""
    scale = max(float(y.abs().max()) for y in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(scale, 1e-30)
