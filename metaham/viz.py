"""Small plotting functions (matplotlib, no pyplot state: figures render with the Agg canvas, so they work on
headless machines and in threads). Each ``plot_*`` function draws on an ``Axes`` it is given; ``save_figure``
writes a figure atomically.

>>> fig = new_figure(ncols=2)
>>> plot_phase_or_paths(fig.axes[0], q, p, dof=1)          # doctest: +SKIP
>>> plot_energy_error(fig.axes[1], t, energy)              # doctest: +SKIP
>>> save_figure(fig, "out.png")                            # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metaham.atomic import atomic_output


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    """A matplotlib ``Figure`` with an ``nrows x ncols`` grid of axes (``fig.axes`` in row-major order)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    fig.subplots(nrows, ncols, squeeze=False)
    return fig


def plot_phase_or_paths(ax, q: np.ndarray, p: np.ndarray, dof: int, max_traj: int | None = None) -> None:
    """Trajectories: the phase portrait (q_x, p_x) for 1-DOF systems, else every particle's path in the plane.

    ``q``, ``p``: ``(n_traj, T, n_particles, dim)``. One colour per trajectory, one line style per particle;
    a dot marks each start. At most ``max_traj`` trajectories (default 8 for one particle, else 3).
    """
    import matplotlib as mpl

    colors = mpl.colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    if max_traj is None:
        max_traj = 8 if q.shape[2] == 1 else 3
    for b in range(min(max_traj, q.shape[0])):
        color = colors[b % len(colors)]
        if dof == 1:
            ax.plot(q[b, :, 0, 0], p[b, :, 0, 0], color=color, lw=1)
            ax.plot(q[b, 0, 0, 0], p[b, 0, 0, 0], "o", color=color, ms=3)
        else:
            for i in range(q.shape[2]):
                ax.plot(q[b, :, i, 0], q[b, :, i, 1], styles[i % len(styles)], color=color, lw=1)
                ax.plot(q[b, 0, i, 0], q[b, 0, i, 1], "o", color=color, ms=3)
    if dof == 1:
        ax.set(xlabel="q", ylabel="p", title="phase portrait")
    else:
        ax.set(xlabel="x", ylabel="y", title="paths (line style = particle)")
        ax.set_aspect("equal", adjustable="datalim")


def plot_energy_error(ax, t: np.ndarray, energy: np.ndarray, max_traj: int = 8) -> None:
    """Relative energy error |H(t) - H(0)| / |H(0)| over time, log scale; ``energy``: ``(n_traj, T)``."""
    import matplotlib as mpl

    colors = mpl.colormaps["tab10"].colors
    rel = relative_energy_error(energy)
    floor = np.finfo(np.float64).eps / 2  # exact conservation would vanish from a log axis
    for b in range(min(max_traj, rel.shape[0])):
        ax.semilogy(t, np.maximum(rel[b], floor), color=colors[b % len(colors)], lw=1)
    ax.set(xlabel="t", ylabel="|H(t) - H(0)| / |H(0)|", title="relative energy error")


def relative_energy_error(energy: np.ndarray) -> np.ndarray:
    """|H(t) - H(0)| / |H(0)| for ``energy`` of shape ``(n_traj, T)`` (|H(0)| floored at 1e-300)."""
    energy = np.asarray(energy, dtype=np.float64)
    return np.abs(energy - energy[:, :1]) / np.maximum(np.abs(energy[:, :1]), 1e-300)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) atomically: a temporary file, then a rename."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


# -- meta-learning: `metaham adapt --plot` ---------------------------------------------------------------------
_MODEL_COLORS = {"meta": "tab:blue", "pretrained": "tab:orange", "random": "tab:green"}
_MODEL_LABELS = {"meta": "meta-trained", "pretrained": "pre-trained", "random": "random init"}


def plot_adaptation_curves(ax, curves: dict[str, np.ndarray]) -> None:
    """Query MSE against SGD steps of adaptation, one line per model (mean over tasks, band: 25-75th percentile).

    ``curves``: model name -> ``(n_tasks, steps + 1)``. Diverged tasks (non-finite values) drop out of the band.
    """
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        steps = np.arange(values.shape[1])
        color = _MODEL_COLORS.get(name)
        ax.semilogy(steps, values.mean(0), color=color, lw=1.5, label=_MODEL_LABELS.get(name, name))
        low, high = np.nanpercentile(values, 25, axis=0), np.nanpercentile(values, 75, axis=0)
        ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
    ax.set(xlabel="SGD steps of adaptation", ylabel="query vector-field MSE", title="adaptation")
    ax.legend()


def plot_rollout_comparison(ax, t: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray]) -> None:
    """One rollout: the first particle's position coordinates over time, the truth against each model.

    ``truth`` and each prediction: ``(T, n_particles, 2)`` positions on the times ``t`` ``(T,)``.
    """
    for axis, style in ((0, "-"), (1, ":")):
        ax.plot(t, np.asarray(truth)[:, 0, axis], style, color="black", lw=2.5, alpha=0.5, label=f"truth q{'xy'[axis]}")
        for name, q in predictions.items():
            ax.plot(t, np.asarray(q)[:, 0, axis], style, color=_MODEL_COLORS.get(name), lw=1,
                    label=f"{_MODEL_LABELS.get(name, name)} q{'xy'[axis]}")
    ax.set(xlabel="t", ylabel="position of particle 1", title="rollout after adaptation (one task)")
    ax.legend(fontsize=7, ncol=2)


def plot_adaptation(report, path: str | os.PathLike) -> Path:
    """Save ``metaham adapt``'s figure for a :class:`metaham.meta.evaluate.AdaptationReport`: the adaptation
    curves and one rollout of every adapted model against the ground truth."""
    fig = new_figure(ncols=2, size=(5.5, 4.0))
    plot_adaptation_curves(fig.axes[0], {name: r.curves.numpy() for name, r in report.results.items()})
    t, q_true, _ = report.truth
    plot_rollout_comparison(fig.axes[1], t.numpy(), q_true.numpy(),
                            {name: r.example[0].numpy() for name, r in report.results.items()})
    fig.axes[0].set_title(f"{report.system}: K = {report.shots}, SGD lr {report.lr:g}")
    return save_figure(fig, path)
