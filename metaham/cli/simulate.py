"""``metaham simulate``: integrate trajectories of one system; write t, q, p, parameters and energies."""
from __future__ import annotations

import argparse
import time

from metaham.atomic import atomic_output, check_output
from metaham.errors import NonFiniteError, UsageError
from metaham.options import add_device_flag, add_plugin_flag, get_system, load_plugins, positive, resolve_device

from ._common import add_json_flag, emit, parse_key_values

HELP = "simulate trajectories of a system; write t, q, p, parameters and energies (.npz) and a plot"
EXAMPLES = """
  metaham simulate --system pendulum                           8 trajectories, leapfrog, t in [0, 10]
  metaham simulate --system two_body --param G=2 --n-traj 100 --out two_body.npz --plot two_body.png
  metaham simulate --system henon_heiles --sample-params --integrator dop853 --json
  metaham simulate --plugin examples/duffing.py --system duffing --plot duffing.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaham.integrate import METHODS

    parser.add_argument("--system", required=True, help="a name from `metaham systems`")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="fix a physical parameter for every trajectory (repeatable); the others keep their defaults, "
        "or are drawn from their ranges with --sample-params",
    )
    parser.add_argument("--sample-params", action="store_true", help="draw unfixed parameters from their ranges")
    parser.add_argument("--n-traj", type=positive(int), default=8, help="number of trajectories (default 8)")
    parser.add_argument("--t-end", type=positive(float), default=10.0, help="end time (default 10)")
    parser.add_argument("--dt", type=positive(float), default=0.01,
                        help="largest step of the fixed-step integrators (default 0.01)")
    parser.add_argument("--n-points", type=positive(int), default=200,
                        help="saved points per trajectory, evenly spaced over [0, t-end] (default 200)")
    parser.add_argument(
        "--integrator", default="auto", choices=("auto",) + METHODS,
        help="auto: leapfrog for separable systems, implicit_midpoint otherwise; dop853/dopri5/dopri8 are "
        "adaptive (tolerance --tol)",
    )
    parser.add_argument("--tol", type=positive(float), default=1e-10, help="rtol = atol of adaptive integrators")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameter and initial-state draws")
    parser.add_argument("--out", metavar="FILE.npz", help="write t, q, p, energy and param_<name> arrays")
    parser.add_argument("--plot", metavar="FILE.png", help="plot trajectories and the relative energy error")
    add_device_flag(parser)
    add_plugin_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import systems
    from metaham.integrate import SEPARABLE_ONLY, simulate
    from metaham.viz import relative_energy_error

    load_plugins(args.plugin)
    system = get_system(args.system)
    fixed = _parse_params(system, args.param)
    if args.n_points < 2:
        raise UsageError(f"--n-points must be >= 2, got {args.n_points}")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            check_output(path, flag)
    method = args.integrator
    if method == "auto":
        method = "leapfrog" if system.separable else "implicit_midpoint"
    if method in SEPARABLE_ONLY and not system.separable:
        raise UsageError(f"--integrator {method} needs a separable Hamiltonian; {system.name} is not "
                         "(use implicit_midpoint or an adaptive method)")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)

    generator = torch.Generator().manual_seed(args.seed)
    if args.sample_params:
        params = system.sample_params(args.n_traj, generator, dtype=dtype, **fixed)
    else:
        params = system.default_params(args.n_traj, dtype=dtype, **fixed)
    params = {k: v.to(device) for k, v in params.items()}
    q0, p0 = system.sample_initial_state(params, generator)
    t = torch.linspace(0.0, args.t_end, args.n_points, dtype=dtype, device=device)
    start = time.perf_counter()
    try:
        q, p = simulate(system, params, q0, p0, t, method, step=args.dt, rtol=args.tol, atol=args.tol)
    except RuntimeError as exc:  # non-converging implicit step, step-size underflow: the user's settings
        if systems.plugin_failure(exc) is not None:
            raise  # not the settings: the plugin's own code failed, and the error handler names its file and line
        raise UsageError(f"{system.name} with --integrator {method}: {exc}") from exc
    wall = time.perf_counter() - start
    energy = system.hamiltonian(q, p, params).transpose(0, 1)  # (n_traj, T)

    q_np, p_np = (x.transpose(0, 1).detach().cpu().numpy() for x in (q, p))  # (n_traj, T, n, dim)
    energy_np = energy.detach().cpu().numpy()
    _check_finite(system.name, t, q, p, energy)
    drift = relative_energy_error(energy_np).max(axis=1)
    params_np = {k: v.detach().cpu().numpy() for k, v in params.items()}
    if args.out:
        _save_npz(args.out, t=t.cpu().numpy(), q=q_np, p=p_np, energy=energy_np,
                  system=np.array(system.name), integrator=np.array(method),
                  **{f"param_{k}": v for k, v in params_np.items()})
    if args.plot:
        _plot(args.plot, system, method, t.cpu().numpy(), q_np, p_np, energy_np)

    shown = {k: (float(v[0]) if np.all(v == v[0]) else v.tolist()) for k, v in params_np.items()}
    step_text = f"step <= {args.dt:g}" if method in ("leapfrog", "implicit_midpoint", "rk4") else f"tol {args.tol:g}"
    lines = [
        f"simulated {args.n_traj} trajectories of {system.name}: {method} ({step_text}), "
        f"{args.n_points} points over [0, {args.t_end:g}], {args.dtype}, {wall:.2f} s",
        "parameters: " + ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k} in [{min(v):.3g}, {max(v):.3g}]" for k, v in shown.items()
        ),
        f"initial energy H(0) in [{energy_np[:, 0].min():.4g}, {energy_np[:, 0].max():.4g}]",
        f"relative energy drift max_t |H(t) - H(0)| / |H(0)|: max {drift.max():.3g}, median {np.median(drift):.3g}",
    ]
    warnings = []
    if drift.max() > DRIFT_WARNING:
        warnings.append(
            f"relative energy drift up to {drift.max():.3g}: {method} with these parameters does not conserve "
            "energy; use a smaller --dt, --integrator dop853, or check the parameter values"
        )
    lines += [f"warning: {w}" for w in warnings]
    if args.out:
        lines.append(f"wrote {args.out} (t, q, p, energy, param_*; q and p are (n_traj, T, particles, dim))")
    if args.plot:
        lines.append(f"wrote {args.plot}")
    result = {
        "system": system.name, "n_traj": args.n_traj, "integrator": method, "dt": args.dt, "tol": args.tol,
        "t_end": args.t_end, "n_points": args.n_points, "dtype": args.dtype, "seed": args.seed,
        "device": str(device), "params": shown, "energy_initial": energy_np[:, 0],
        "energy_rel_drift_max": float(drift.max()), "energy_rel_drift_median": float(np.median(drift)),
        "wall_time_s": wall, "out": args.out, "plot": args.plot, "warnings": warnings,
    }
    return emit(args, "\n".join(lines), result)


# Above this relative energy drift a trajectory is not a trustworthy simulation of its Hamiltonian (the default
# settings give ~1e-4 on the built-in systems; `metaham demo --only systems` prints each one's).
DRIFT_WARNING = 1e-2


def _check_finite(name: str, t, q, p, energy) -> None:
    """Refuse NaN/inf trajectories (a plugin's Hamiltonian, overflowing parameters), naming the first one."""
    import torch

    bad = ~(torch.isfinite(q).flatten(2).all(-1) & torch.isfinite(p).flatten(2).all(-1)
            & torch.isfinite(energy.transpose(0, 1)))  # (T, n_traj)
    if bool(bad.any()):
        step, trajectory = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(
            f"{name}: trajectory {trajectory} is not finite (NaN or inf) from t = {float(t[step]):.4g}; "
            f"{int(bad.any(0).sum())} of {bad.shape[1]} trajectories are; nothing was written"
        )


def _parse_params(system, items: list[str]) -> dict[str, float]:
    """``--param k=v`` items as floats, validated by the system (unknown name, NaN, non-positive mass...)."""
    values = {}
    for key, text in parse_key_values(items, "--param").items():
        try:
            values[key] = float(text)
        except ValueError:
            raise UsageError(f"--param {key}={text}: {text!r} is not a number") from None
    try:
        system.check_params(values)
    except ValueError as exc:
        raise UsageError(f"--param: {exc}") from exc
    return values


def _save_npz(path: str, **arrays) -> None:
    """``np.savez`` to a temporary file in the same folder, then rename: no half-written file on a crash."""
    import numpy as np

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez adds no ".npz"
        np.savez(fh, **arrays)


def _plot(path: str, system, method: str, t, q, p, energy) -> None:
    from metaham.viz import new_figure, plot_energy_error, plot_phase_or_paths, save_figure

    fig = new_figure(ncols=2)
    plot_phase_or_paths(fig.axes[0], q, p, dof=system.dof)
    plot_energy_error(fig.axes[1], t, energy)
    fig.suptitle(f"{system.name}: {q.shape[0]} trajectories, {method}")
    save_figure(fig, path)

