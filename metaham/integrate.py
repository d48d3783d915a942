"""Batched integrators for Hamiltonian systems.

One public entry point, :func:`odeint_hamiltonian`, integrates thousands of trajectories (each with its own
parameters, captured by the vector field) in one batch and returns the states at the requested times.

Methods (``METHODS`` lists them):

* ``leapfrog`` -- Stormer-Verlet (kick-drift-kick), 2nd order, symplectic; for separable H = T(p) + V(q)
  only (dp/dt must not depend on p, dq/dt not on q). Energy error stays bounded over long runs.
* ``implicit_midpoint`` -- 2nd order, symplectic for any H (non-separable too); each step solves
  z1 = z0 + h f((z0 + z1) / 2) by fixed-point iteration. Works with learned (autograd) vector fields.
* ``rk4`` -- classical Runge-Kutta, fixed step (torchdiffeq); accurate but drifts in energy.
* ``dopri5``, ``dopri8`` -- adaptive Dormand-Prince (torchdiffeq) for ground truth: use float64 and
  ``rtol = atol <= 1e-10``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

VectorField = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

FIXED_STEP = ("leapfrog", "implicit_midpoint", "rk4")
ADAPTIVE = ("dopri5", "dopri8")
METHODS = FIXED_STEP + ADAPTIVE


def odeint_hamiltonian(
    vector_field: VectorField,
    q0: Tensor,
    p0: Tensor,
    t: Tensor,
    method: str = "leapfrog",
    step: float | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    fixed_point_tol: float | None = None,
    max_fixed_point_iters: int = 100,
) -> tuple[Tensor, Tensor]:
    """Integrate dq/dt, dp/dt = ``vector_field(q, p)`` from ``(q0, p0)`` at ``t[0]``.

    Args:
        vector_field: ``f(q, p) -> (dq/dt, dp/dt)``, batched, shapes as ``q``. Autonomous (no time argument).
        q0, p0: initial state, ``(*batch, n_particles, dim)`` (any trailing shape works).
        t: increasing save times, shape ``(T,)``; ``t[0]`` is the initial time.
        method: one of :data:`METHODS`.
        step: largest step for fixed-step methods (default: the spacing of ``t``); each interval of ``t`` is
            split into equal sub-steps no longer than ``step``.
        rtol, atol: tolerances of the adaptive methods.
        fixed_point_tol: convergence threshold of implicit midpoint (default: 1e-13 in float64, 1e-6 in float32).

    Returns:
        ``q, p`` of shape ``(T, *batch, n_particles, dim)``, with ``q[0] == q0``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown integrator {method!r}; choose one of {', '.join(METHODS)}")
    t = torch.as_tensor(t, dtype=q0.dtype, device=q0.device)
    if t.ndim != 1 or t.numel() < 1:
        raise ValueError(f"t must be a 1-D tensor of save times, got shape {tuple(t.shape)}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError("t must be strictly increasing")
    if step is not None and not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be > 0, got {step}")
    if method in ADAPTIVE or method == "rk4":
        return _torchdiffeq(vector_field, q0, p0, t, method, step, rtol, atol)
    if fixed_point_tol is None:
        fixed_point_tol = 1e-13 if q0.dtype == torch.float64 else 1e-6
    one_step = {
        "leapfrog": lambda q, p, h: _leapfrog_step(vector_field, q, p, h),
        "implicit_midpoint": lambda q, p, h: _midpoint_step(
            vector_field, q, p, h, fixed_point_tol, max_fixed_point_iters
        ),
    }[method]
    qs, ps = [q0], [p0]
    q, p = q0, p0
    for i in range(t.numel() - 1):
        interval = float(t[i + 1] - t[i])
        n_sub = max(1, math.ceil(interval / step - 1e-9)) if step else 1
        h = interval / n_sub
        for _ in range(n_sub):
            q, p = one_step(q, p, h)
        qs.append(q)
        ps.append(p)
    return torch.stack(qs), torch.stack(ps)


def _leapfrog_step(f: VectorField, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor]:
    # Kick-drift-kick. For separable H, dp/dt depends on q only and dq/dt on p only, so the unused
    # argument of each call does not matter.
    p_half = p + 0.5 * h * f(q, p)[1]
    q_new = q + h * f(q, p_half)[0]
    p_new = p_half + 0.5 * h * f(q_new, p_half)[1]
    return q_new, p_new


def _midpoint_step(f: VectorField, q: Tensor, p: Tensor, h: float, tol: float, max_iters: int):
    # Fixed-point iteration on the increment, started from an explicit Euler guess. It converges when
    # h * Lipschitz(f) < 2; a step that does not converge is an error rather than a silent inaccuracy.
    dq, dp = f(q, p)
    q1, p1 = q + h * dq, p + h * dp
    for _ in range(max_iters):
        dq, dp = f(0.5 * (q + q1), 0.5 * (p + p1))
        q_next, p_next = q + h * dq, p + h * dp
        change = torch.maximum((q_next - q1).abs().max(), (p_next - p1).abs().max())
        q1, p1 = q_next, p_next
        scale = 1.0 + float(torch.maximum(q1.abs().max(), p1.abs().max()))
        if float(change) <= tol * scale:
            return q1, p1
    raise RuntimeError(
        f"implicit midpoint did not converge in {max_iters} iterations (last change {float(change):.3g}); "
        "use a smaller step"
    )


def _torchdiffeq(f: VectorField, q0, p0, t, method, step, rtol, atol):
    from torchdiffeq import odeint

    def rhs(_t, y):
        q, p = y[0], y[1]
        dq, dp = f(q, p)
        return torch.stack([dq, dp])

    options = {}
    if method == "rk4":
        spacing = float((t[1:] - t[:-1]).min()) if t.numel() > 1 else 1.0
        options["step_size"] = step if step else spacing
        y = odeint(rhs, torch.stack([q0, p0]), t, method=method, options=options)
    else:
        y = odeint(rhs, torch.stack([q0, p0]), t, method=method, rtol=rtol, atol=atol)
    return y[:, 0], y[:, 1]


def simulate(system, params: dict, q0: Tensor, p0: Tensor, t: Tensor, method: str | None = None, **kwargs):
    """Integrate a :class:`systems.System` with its exact vector field (shapes as :func:`odeint_hamiltonian`).

    ``method`` defaults to leapfrog for separable systems and implicit midpoint otherwise. ``params`` tensors
    have shape ``batch`` (one row per trajectory).
    """
    if method is None:
        method = "leapfrog" if system.separable else "implicit_midpoint"
    if method == "leapfrog" and not system.separable:
        raise ValueError(f"leapfrog needs a separable Hamiltonian; {system.name} is not (use implicit_midpoint)")
    return odeint_hamiltonian(lambda q, p: system.vector_field(q, p, params), q0, p0, t, method=method, **kwargs)
