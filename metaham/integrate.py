"""Batched integrators for Hamiltonian systems.

One public entry point, :func:`odeint_hamiltonian`, integrates thousands of trajectories (each with its own
parameters, captured by the vector field) in one batch and returns the states at the requested times.

Methods (``METHODS`` lists them):

* ``leapfrog`` -- Stormer-Verlet (kick-drift-kick), 2nd order, symplectic; for separable H = T(p) + V(q)
  only (dp/dt must not depend on p, dq/dt not on q). Energy error stays bounded over long runs.
  Two vector-field calls per step (the last kick's force is reused by the next step).
* ``implicit_midpoint`` -- 2nd order, symplectic for any H (non-separable too); each step solves
  z1 = z0 + h f((z0 + z1) / 2) by fixed-point iteration. Works with learned (autograd) vector fields.
* ``rk4`` -- classical Runge-Kutta, fixed step; accurate over short spans but drifts in energy.
* ``dop853`` -- Hairer's DOP853 (Dormand-Prince 8(5,3) with its 7th-order dense output: the algorithm of
  ``scipy.integrate.solve_ivp(method="DOP853")``), written here for batches, with a step size and scipy's RMS
  error norm per trajectory, so each trajectory takes scipy's steps (they agree to ~1e-13 even at tolerance
  1e-7). The way to high-accuracy ground truth: float64, ``rtol = atol <= 1e-10``; ``metaham bench simulate``
  measures it against per-trajectory scipy.
* ``dopri5``, ``dopri8`` -- adaptive Dormand-Prince from torchdiffeq, with two of its defaults changed: (1) the
  solver steps onto every save time (``step_t``), because torchdiffeq reads states between steps off a
  4th-order interpolant, which for dopri8's long steps costs 4 orders of magnitude (1e-14 -> 6e-7 on a
  harmonic oscillator over 10 periods at tol 1e-10); (2) the error norm is the max over all elements, not the
  RMS over the batch, so every trajectory meets the tolerance, not just their average. Even so torchdiffeq's
  dopri8 is erratic at tight tolerances (pendulum, tol 1e-12: errors up to 2e-7 against scipy's DOP853 at
  1e-13, where dop853 gives 2e-11 and dopri5 1e-10): prefer ``dop853``.

Fixed-step methods split each interval of ``t`` into equal sub-steps no longer than ``step`` and land exactly
on every save time.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from metaham.errors import IntegrationError

VectorField = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

FIXED_STEP = ("leapfrog", "implicit_midpoint", "rk4")
ADAPTIVE = ("dopri5", "dopri8", "dop853")
METHODS = FIXED_STEP + ADAPTIVE
SEPARABLE_ONLY = ("leapfrog",)


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
    rows_field: Callable[[Tensor], VectorField] | None = None,
    failed_trajectories: str = "raise",
) -> tuple[Tensor, Tensor]:
    """Integrate dq/dt, dp/dt = ``vector_field(q, p)`` from ``(q0, p0)`` at ``t[0]``.

    Args:
        vector_field: ``f(q, p) -> (dq/dt, dp/dt)``, batched, shapes as ``q``. Autonomous (no time argument).
        q0, p0: initial state, ``(*batch, n_particles, dim)`` (any trailing shape works).
        t: increasing save times, shape ``(T,)``; ``t[0]`` is the initial time.
        method: one of :data:`METHODS`.
        step: largest step for fixed-step methods (default: the spacing of ``t``); each interval of ``t`` is
            split into equal sub-steps no longer than ``step``. Ignored by the adaptive methods.
        rtol, atol: tolerances of the adaptive methods (dop853: scipy's RMS norm per trajectory; dopri5, dopri8:
            max over all elements).
        fixed_point_tol: convergence threshold of implicit midpoint (default: 1e-13 in float64, 1e-6 in float32).
        max_fixed_point_iters: implicit midpoint raises ``RuntimeError`` when a step needs more iterations.
        failed_trajectories: implicit midpoint, a step that does not converge: ``"raise"`` an ``IntegrationError``
            for the batch, or ``"nan"``: the trajectories (batch entries) that did not converge, or whose state
            became non-finite, are NaN from that save time on, and the others go on as if they were alone in the
            batch (e.g. rollouts of many learned fields, where one stiff field must not cost the rest).
        rows_field: optional, for ``dop853`` with a 1-D batch: ``rows_field(rows)`` returns the vector field of
            the batch rows ``rows`` (a 1-D index tensor) only, so finished trajectories can leave the batch.
            :func:`simulate` provides it.

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
    if method == "dop853":
        return _Dop853(vector_field, rows_field, q0, p0, t, rtol, atol).solve()
    if method in ADAPTIVE:
        return _torchdiffeq(vector_field, q0, p0, t, method, rtol, atol)
    if failed_trajectories not in ("raise", "nan"):
        raise ValueError(f"failed_trajectories must be 'raise' or 'nan', got {failed_trajectories!r}")
    if fixed_point_tol is None:
        fixed_point_tol = 1e-13 if q0.dtype == torch.float64 else 1e-6
    stepper = {
        "leapfrog": _Leapfrog(vector_field),
        "implicit_midpoint": _Midpoint(vector_field, fixed_point_tol, max_fixed_point_iters, failed_trajectories),
        "rk4": _RK4(vector_field),
    }[method]
    return _fixed_step_loop(stepper, q0, p0, t, step)


def _fixed_step_loop(stepper, q0: Tensor, p0: Tensor, t: Tensor, step: float | None):
    times = t.tolist()
    qs, ps = [q0], [p0]
    q, p = q0, p0
    stepper.start(q, p)
    for t0, t1 in zip(times[:-1], times[1:]):
        interval = t1 - t0
        n_sub = max(1, math.ceil(interval / step - 1e-9)) if step else 1
        h = interval / n_sub
        for _ in range(n_sub):
            q, p = stepper.step(q, p, h)
        failed = getattr(stepper, "failed", None)
        if failed is not None and bool(failed.any()):
            # A failed trajectory stays frozen at its last good state inside the stepper; it is saved as NaN.
            gone = _per_trajectory(failed)
            qs.append(torch.where(gone, torch.nan, q))
            ps.append(torch.where(gone, torch.nan, p))
        else:
            qs.append(q)
            ps.append(p)
    return torch.stack(qs), torch.stack(ps)


class _Leapfrog:
    """Kick-drift-kick. The force at the end of one step is the force at the start of the next, so a step costs
    two vector-field calls: dq/dt at the half-kicked momentum and dp/dt at the drifted position. Separable H
    only: dq/dt must not depend on q, dp/dt not on p."""

    def __init__(self, f: VectorField) -> None:
        self.f = f

    def start(self, q: Tensor, p: Tensor) -> None:
        self.force = self.f(q, p)[1]

    def step(self, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor]:
        # torch.add(x, y, alpha=c) is one kernel for x + c y: these loops are bound by per-op overhead.
        p = torch.add(p, self.force, alpha=0.5 * h)
        q = torch.add(q, self.f(q, p)[0], alpha=h)
        self.force = self.f(q, p)[1]
        return q, torch.add(p, self.force, alpha=0.5 * h)


class _RK4:
    """Classical 4th-order Runge-Kutta on the pair (q, p)."""

    def __init__(self, f: VectorField) -> None:
        self.f = f

    def start(self, q: Tensor, p: Tensor) -> None:
        pass

    def step(self, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor]:
        f, add = self.f, torch.add
        k1q, k1p = f(q, p)
        k2q, k2p = f(add(q, k1q, alpha=h / 2), add(p, k1p, alpha=h / 2))
        k3q, k3p = f(add(q, k2q, alpha=h / 2), add(p, k2p, alpha=h / 2))
        k4q, k4p = f(add(q, k3q, alpha=h), add(p, k3p, alpha=h))
        q = add(add(add(add(q, k1q, alpha=h / 6), k2q, alpha=h / 3), k3q, alpha=h / 3), k4q, alpha=h / 6)
        p = add(add(add(add(p, k1p, alpha=h / 6), k2p, alpha=h / 3), k3p, alpha=h / 3), k4p, alpha=h / 6)
        return q, p


class _Midpoint:
    """Implicit midpoint rule, z1 = z0 + h f((z0 + z1)/2), solved by fixed-point iteration. The iteration converges
    when h * Lipschitz(f) < 2; a step that does not converge is an error rather than a silent inaccuracy: of the
    batch (``on_failure="raise"``), or of the trajectories that did not converge (``"nan"``: they are marked in
    :attr:`failed` and frozen at their state before the step, while the batch goes on; non-finite ones at once).
    The test is the batch's: the largest change over the trajectories still running against
    ``tol * (1 + their largest |z|)``, so a batch where none fails takes the same iterations either way.

    A trajectory whose iteration is not on course to converge fails before ``max_iters`` (as in the simplified
    Newton iterations of Hairer & Wanner, Solving ODEs II, IV.8): the iteration converges linearly, so its change
    shrinks by a rate theta each time. Between iteration 20 and the last 20, theta is read off the change from
    iterations 2-3 to the latest; a trajectory still above the test whose change, shrinking at that rate, would not
    pass it even in twice the iterations left (theta >= 1: never) is failed then, where it would otherwise have
    held the whole batch to ``max_iters`` calls of f and failed anyway. The rates of these iterations improve near
    the fixed point, and some alternate between two sizes of change (hence the larger of the last two changes).
    On the rollouts of ``metaham adapt`` where the rule was tried, judging from iteration 10, or to the end of the
    budget, failed a trajectory that the full budget converges; this rule failed none (docs/meta-learning.md, the
    rollouts bullet under "Results"). The margin of two is a safety factor on top.

    The first guess decides how many iterations a step takes, not where they converge. A step's midpoint slope k
    is the last field value computed, z1 = z0 + h k. From the third step on, the guess extrapolates the last two
    slopes linearly in time to the new midpoint (error O(h^2) in the slope) and costs no call of f. The first two
    steps start from an explicit Euler step (error O(h), one more call). On gcn's three_body rollouts in
    ``metaham adapt`` this took 26% fewer calls of f (docs/meta-learning.md, the rollouts bullet under "Results")."""

    def __init__(self, f: VectorField, tol: float, max_iters: int, on_failure: str = "raise") -> None:
        self.f, self.tol, self.max_iters, self.on_failure = f, tol, max_iters, on_failure
        self.failed: Tensor | None = None  # with on_failure="nan": which trajectories failed, shape q.shape[:-2]
        self.slopes: list[tuple[float, Tensor, Tensor]] = []  # (midpoint time, dq/dt, dp/dt) of the last two steps
        self.time = 0.0

    def start(self, q: Tensor, p: Tensor) -> None:
        self.failed = torch.zeros(q.shape[:-2], dtype=torch.bool, device=q.device) if self.on_failure == "nan" else None
        self.slopes, self.time = [], 0.0

    def _first_guess(self, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor]:
        if len(self.slopes) < 2:
            return self.f(q, p)
        (t_a, dq_a, dp_a), (t_b, dq_b, dp_b) = self.slopes
        w = (self.time + 0.5 * h - t_b) / (t_b - t_a)  # k(t) = k_b + w (k_b - k_a), linear in t
        return torch.add(dq_b, dq_b - dq_a, alpha=w), torch.add(dp_b, dp_b - dp_a, alpha=w)

    def step(self, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor]:
        q1, p1, dq, dp = self._solve(q, p, h)
        # (dq, dp) is the slope that gave z1 = z0 + h k; frozen trajectories' entries are never read again.
        self.slopes = self.slopes[-1:] + [(self.time + 0.5 * h, dq, dp)]
        self.time += h
        return self._freeze(q, p, q1, p1)

    def _solve(self, q: Tensor, p: Tensor, h: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``z1`` and its midpoint slope, failed trajectories not yet frozen."""
        dq, dp = self._first_guess(q, p, h)
        q1, p1 = q + h * dq, p + h * dp
        early = previous = None  # the largest change of iterations 2-3 (the 1st reflects the guess); the last one
        for iteration in range(1, self.max_iters + 1):
            q1, p1 = self._freeze(q, p, q1, p1)
            dq, dp = self.f(0.5 * (q + q1), 0.5 * (p + p1))
            q_next, p_next = q + h * dq, p + h * dp
            per_row = torch.maximum(_row_max((q_next - q1).abs()), _row_max((p_next - p1).abs()))
            q1, p1 = q_next, p_next
            size = torch.maximum(_row_max(q1.abs()), _row_max(p1.abs()))
            change = per_row
            if self.failed is not None:
                self.failed |= ~torch.isfinite(per_row)
                running = ~self.failed
                if not bool(running.any()):
                    return q1, p1, dq, dp
                change, size = per_row[running], size[running]
            scale = 1.0 + float(size.max())
            if float(change.max()) <= self.tol * scale:
                return q1, p1, dq, dp
            left = self.max_iters - iteration
            if iteration in (2, 3):
                early = per_row if early is None else torch.maximum(early, per_row)
            elif iteration >= _JUDGE_FROM and left >= _JUDGE_FROM:
                # The larger of the last two changes: some iterations alternate between two sizes of change.
                hopeless = (per_row > self.tol * scale) & _off_course(early, torch.maximum(previous, per_row),
                                                                     iteration - 3, self.tol * scale, left)
                if self.failed is None and bool(hopeless.any()):
                    raise IntegrationError(
                        f"implicit midpoint did not converge (change {float(change.max()):.3g} after {iteration} "
                        f"iterations, shrinking too slowly to reach {self.tol * scale:.3g} in the {left} left); use a "
                        "smaller step"
                    )
                if self.failed is not None:
                    self.failed |= hopeless
            previous = per_row
        if self.failed is None:
            raise IntegrationError(
                f"implicit midpoint did not converge in {self.max_iters} iterations (last change "
                f"{float(change.max()):.3g}); use a smaller step"
            )
        self.failed |= ~(per_row <= self.tol * scale)
        return q1, p1, dq, dp

    def _freeze(self, q: Tensor, p: Tensor, q1: Tensor, p1: Tensor) -> tuple[Tensor, Tensor]:
        """Failed trajectories keep their state from before the step (finite: safe to evaluate f on)."""
        if self.failed is None or not bool(self.failed.any()):
            return q1, p1
        gone = _per_trajectory(self.failed)
        return torch.where(gone, q, q1), torch.where(gone, p, p1)


_JUDGE_FROM = 20  # no trajectory is judged off course in its first 20 iterations, nor in its last 20


def _off_course(early: Tensor, latest: Tensor, iterations: int, target: float, left: int) -> Tensor:
    """Trajectories whose change, shrinking from ``early`` to ``latest`` over ``iterations`` at a constant rate,
    would still be above ``target`` after twice the ``left`` iterations (a rate >= 1: never below it). In logs,
    where a change of 0 is -inf."""
    log_rate = (latest.log() - early.log()) / iterations
    return (log_rate >= 0) | (latest.log() + 2 * left * log_rate > math.log(target))


def _row_max(x: Tensor) -> Tensor:
    """The largest entry of each trajectory: ``(*batch, n, dim)`` -> ``(*batch,)``."""
    return x.flatten(-2).amax(-1)


def _per_trajectory(mask: Tensor) -> Tensor:
    """A ``(*batch,)`` mask shaped to select whole trajectories of ``(*batch, n, dim)`` states."""
    return mask.reshape(*mask.shape, 1, 1)


def _max_norm(x: Tensor) -> Tensor:
    return x.abs().max()


def _torchdiffeq(f: VectorField, q0: Tensor, p0: Tensor, t: Tensor, method: str, rtol: float, atol: float):
    from torchdiffeq import odeint

    def rhs(_t, y):
        dq, dp = f(y[0], y[1])
        return torch.stack([dq, dp])

    # step_t: step onto every save time (see the module docstring); norm: every element meets the tolerance.
    options = {"step_t": t, "norm": _max_norm}
    y = odeint(rhs, torch.stack([q0, p0]), t, method=method, rtol=rtol, atol=atol, options=options)
    return y[:, 0], y[:, 1]


class _Dop853:
    """Hairer's DOP853 (Hairer, Norsett, Wanner, "Solving Ordinary Differential Equations I", sec. II.5-II.6,
    the published coefficients as shipped by scipy), batched with one step size PER TRAJECTORY.

    Every row (trajectory) keeps its own time, step size and accept/reject decision, so a stiff row (a close
    encounter, a bounce off a wall) does not force small steps on the others. Each iteration advances every
    unfinished row by one attempted step. The error of a row is Hairer's combined 5th/3rd-order estimate with
    RMS norms over the row's elements, exactly as scipy computes it for one trajectory, so each row takes the
    steps scipy's DOP853 would take for it alone (up to rounding).

    Save times come from the 7th-order dense output, so steps are not cut at save times; and they are written
    out in bulk rather than per step: each iteration only records its steps (start, end, and the interpolant's
    coefficients in powers of the step fraction, one matrix product of the stages), and every few MB of records
    one vectorised pass finds the step that holds each save time of each row and evaluates the interpolant
    there. At a thousand rows the cost of an iteration is the fixed cost of its tensor operations, not their
    arithmetic, so the loop is written for few operations: one matrix-vector product per stage, preallocated
    stage buffers, no per-step save logic.

    When ``rows_field(rows)`` can build the vector field of a subset of rows, finished rows leave the working
    batch once they are half of it, so the cost follows the average row rather than the slowest one.

    Layout: the state is ``y`` of shape ``(2, *batch, *tail)`` (q and p), so q and p reach the vector field as
    contiguous tensors; ``.view(2, rows, width)`` gives the per-row view. Stage derivatives ``k`` are
    ``(16, 2, *batch, *tail)``. Not differentiable (the stage buffers are written with ``out=``).
    """

    # Recorded elements (8 coefficients per state element per step) before save times are written: 8 MB, so
    # each batch of records reuses the memory the one before it freed. With 32 MB batches every record landed
    # in freshly mapped pages, whose first-touch faults cost more than the arithmetic (docs/benchmarks.md).
    _RECORD_BUDGET = 1 << 20

    def __init__(self, f: VectorField, rows_field, q0: Tensor, p0: Tensor, t: Tensor, rtol: float, atol: float):
        from scipy.integrate._ivp import dop853_coefficients as tab

        self.rtol, self.atol, self.t = rtol, atol, t
        self.batch_shape, self.tail = tuple(q0.shape[: q0.ndim - 2]), tuple(q0.shape[q0.ndim - 2 :])
        self.n_rows, self.width = math.prod(self.batch_shape), math.prod(self.tail)
        if len(self.batch_shape) != 1:
            rows_field = None  # row subsets are defined for a flat batch only
        self.f, self.rows_field = f, rows_field
        dev = dict(dtype=q0.dtype, device=q0.device)
        a = torch.as_tensor(tab.A, **dev)
        self.a_rows = [a[s, :s].contiguous() for s in range(a.shape[0])]  # stage s combines k_0 .. k_{s-1}
        self.b = torch.as_tensor(tab.B, **dev)
        self.e53 = torch.as_tensor(np.stack([tab.E5, tab.E3]), **dev)  # both error estimates in one product
        self.interpolant = torch.as_tensor(_interpolant_from_stages(tab), **dev)
        self.n_stages, self.n_extended = tab.N_STAGES, tab.N_STAGES_EXTENDED
        self.y0 = torch.stack([q0, p0]).contiguous()
        self.factor_min, self.factor_max, self.factor_one = (torch.tensor(v, **dev) for v in (0.2, 10.0, 1.0))

    def solve(self) -> tuple[Tensor, Tensor]:
        n_t, n_rows, width = self.t.numel(), self.n_rows, self.width
        # Row time * rows + row holds (q, p) flattened; the last row is a spare for _write_saves.
        out = self.y0.new_empty(n_t * n_rows + 1, 2 * width)
        out[:n_rows] = self.y0.view(2, n_rows, width).transpose(0, 1).reshape(n_rows, 2 * width)
        if n_t > 1:
            self._integrate(out)
        states = out[:-1].view(n_t, n_rows, 2, width).permute(2, 0, 1, 3)  # (2, T, rows, width)
        shape = (n_t,) + self.batch_shape + self.tail
        return states[0].reshape(shape), states[1].reshape(shape)

    def _integrate(self, out: Tensor) -> None:
        times = self.t
        t_end = float(times[-1])
        tiny = 16 * torch.finfo(out.dtype).eps * max(1.0, abs(t_end))
        rows = torch.arange(self.n_rows, device=out.device)  # original row of each working row
        f, y = self.f, self.y0
        work = _Dop853Buffers(y, self.n_rows, self.n_stages, self.n_extended)
        _evaluate(f, y, work.slots[0])
        now = times.new_full((self.n_rows,), float(times[0]))
        h = self._initial_step(f, y, work.slots[0], t_end - float(times[0]))
        cap = torch.full_like(h, 10.0)  # largest growth factor: 1 right after a rejection, as in scipy
        records: list[tuple] = []
        recorded = 0
        while True:
            n_work = rows.numel()
            remaining = t_end - now
            to_end = h >= remaining
            h = torch.where(to_end, remaining, h)
            work.spread(h, out=work.h_q)
            work.h_p.copy_(work.h_q)
            y_flat = y.view(-1)
            for s in range(1, self.n_stages):
                work.stage(f, y_flat, self.a_rows[s], s)
            y_new = torch.addcmul(y_flat, work.h_flat, torch.mv(work.prefix_t[self.n_stages], self.b)).view(y.shape)
            _evaluate(f, y_new, work.slots[self.n_stages])  # first same as last: k_0 of the next step
            for s in range(self.n_stages + 1, self.n_extended):
                work.stage(f, y_flat, self.a_rows[s], s)
            y_rows, y_new_rows = y.view(2, n_work, -1), y_new.view(2, n_work, -1)
            ratio = self._error_ratio(work, h, y_rows, y_new_rows)
            accept = ratio <= 1
            t_new = torch.where(to_end, t_end, now + h)
            coeffs = torch.mm(self.interpolant, work.flat).mul_(work.h_flat)  # (power, 2 rows width)
            coeffs[0].add_(y_flat)
            records.append((rows, now, t_new, h, accept, coeffs))
            recorded += 8 * y_flat.numel()
            # Step-size control as in scipy's DOP853: factor 0.9 ratio^(-1/8), at most 10 (1 right after a
            # rejection), at least 0.2. An accepted step has factor >= 0.9 and a rejected one < 0.9, so one clamp
            # serves both (ratio 0 gives inf, clamped to the cap; a NaN stays NaN and is caught below).
            factor = torch.clamp(ratio.pow(-1 / 8).mul_(0.9), self.factor_min, cap)
            cap = torch.where(accept, self.factor_max, self.factor_one)
            h = h * factor
            keep_new = work.spread(accept.to(h.dtype)).bool()  # (rows, width): see _Dop853Buffers.spread
            y = torch.where(keep_new, y_new_rows, y_rows).view(y.shape)
            torch.where(keep_new, work.last_rows, work.first_rows, out=work.first_rows)
            now = torch.where(accept, t_new, now)
            finished = now >= t_end
            smallest = float(torch.where(finished, math.inf, h).amin())  # one sync per iteration for all checks
            if not smallest > tiny:
                if math.isnan(smallest):
                    raise IntegrationError("dop853: the state became non-finite (an unbounded orbit or a singular field?)")
                raise IntegrationError(f"dop853: step size underflow (the problem is too stiff for rtol={self.rtol})")
            if smallest == math.inf:
                break
            if recorded >= self._RECORD_BUDGET:
                self._write_saves(out, records)
                records, recorded = [], 0
            if self.rows_field is not None:
                n_finished = int(finished.sum())
                if 2 * n_finished >= n_work:  # compact: worth its handful of operations once half are done
                    keep = (~finished).nonzero().squeeze(1)
                    rows, now, h, cap = rows[keep], now[keep], h[keep], cap[keep]
                    k0 = work.rows(0)[:, keep]
                    y = y.view(2, n_work, -1)[:, keep].reshape((2, keep.numel()) + self.tail)
                    work = _Dop853Buffers(y, keep.numel(), self.n_stages, self.n_extended)
                    work.slots[0].copy_(k0.view(y.shape))
                    f = self.rows_field(rows)
        self._write_saves(out, records)

    def _error_ratio(self, work: "_Dop853Buffers", h: Tensor, y: Tensor, y_new: Tensor) -> Tensor:
        """Per row, as scipy's DOP853: h |err5|^2 / sqrt(n (|err5|^2 + 0.01 |err3|^2)), |.| the Euclidean norm
        over the row's n elements, each error scaled by atol + rtol max(|y|, |y_new|)."""
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(self.rtol).add_(self.atol)  # (2, rows, width)
        err = torch.mm(self.e53, work.error_stages).view((2,) + y.shape).div_(scale).square_()
        # Sum over q and p (an outer dimension), then over the row's width as a product with ones (a reduction
        # over a short inner dimension is ~10x slower per element in torch on CPU).
        err5, err3 = torch.mv(err.sum(dim=1).view(-1, y.shape[2]), work.ones).view(2, -1).unbind(0)
        denom = torch.add(err5, err3, alpha=0.01).mul_(2 * y.shape[2]).sqrt_().clamp_min_(torch.finfo(y.dtype).tiny)
        return h * err5 / denom

    def _write_saves(self, out: Tensor, records: list[tuple]) -> None:
        """Write the dense output at every save time that lies in a recorded accepted step.

        A save time t_j belongs to the step (t0, t1] that holds it (t_0 is the initial state). Each record holds
        its steps' interpolants as 8 coefficients in powers of x = (t_j - t0) / h, laid out like the stages
        ``(power, 2, steps, width)``. Slot s = 0, 1, ... evaluates, for every step at once, the s-th save time
        inside it by Horner's rule, x spread over each step's elements by an outer product (equal shapes: see
        :meth:`_Dop853Buffers.spread`): a plain vectorised loop (gathering coefficients per (row, save time) pair
        instead costs ~5x more). Steps with fewer save times write slot s to a spare row of ``out``; once under
        a quarter of the steps have an s-th save time, the others are dropped, so the work stays within 4x the
        number of saved states.

        ``out``: ``(T * rows + 1, 2 width)``; row ``j * rows + row`` holds (q, p) at t_j, the last is the spare.
        Time-major, because the steps of one iteration cover similar times: the writes stay close together.
        """
        if not records:
            return
        fields = list(zip(*records))
        rows, t0, t1, h, accept = (torch.cat(part) for part in fields[:5])
        coeffs = torch.cat([c.view(8, 2, -1, self.width) for c in fields[5]], dim=2)  # (power, 2, steps, width)
        ones = coeffs.new_ones(self.width)
        times, n_t, spare = self.t, self.t.numel(), out.shape[0] - 1
        first = torch.searchsorted(times, t0, right=True)
        count = torch.where(accept, torch.searchsorted(times, t1, right=True) - first, 0)
        column = first * self.n_rows + rows
        for slot in range(int(count.max())):
            has = count > slot
            n_has = int(has.sum())
            if 4 * n_has < has.numel():
                keep = has.nonzero().squeeze(1)
                coeffs, count, column, first, t0, h, has = (
                    coeffs[:, :, keep], count[keep], column[keep], first[keep], t0[keep], h[keep], has[keep]
                )
            x = torch.outer((times[(first + slot).clamp_(max=n_t - 1)] - t0) / h, ones)  # (steps, width)
            value = coeffs[7]
            for power in range(6, -1, -1):
                value = torch.addcmul(coeffs[power], value, x)
            rows_out = value.transpose(0, 1).reshape(-1, 2 * self.width)  # (steps, (q, p) flattened)
            out.index_copy_(0, torch.where(has, column + slot * self.n_rows, spare), rows_out)

    def _initial_step(self, f: VectorField, y: Tensor, f0: Tensor, span: float) -> Tensor:
        # Hairer's starting-step heuristic (Solving ODEs I, sec. II.4) for the 7th-order error estimator, per row,
        # with RMS norms, as scipy's select_initial_step.
        n_work = f0.numel() // (2 * self.width)

        def row_rms(x: Tensor) -> Tensor:
            return x.reshape(2, n_work, -1).square().mean(dim=(0, 2)).sqrt()

        scale = self.atol + self.rtol * y.abs()
        d0, d1 = row_rms(y / scale), row_rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
        h0 = h0.clamp(max=span)
        f1 = torch.empty_like(f0)
        step = h0.view(1, -1, 1)
        _evaluate(f, (y.view(2, n_work, -1) + step * f0.view(2, n_work, -1)).view(y.shape), f1)
        d2 = row_rms((f1 - f0) / scale) / h0
        big = torch.maximum(d1, d2)
        h1 = torch.where(big <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / big.clamp_min(1e-300)) ** (1 / 8))
        return torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))


def _dense_power_basis() -> np.ndarray:
    """The ``(8, 8)`` matrix taking a step's record (y0, y1, h k_0, h k_12, h (D K)_0..3) to the coefficients of
    x^0 .. x^7 of DOP853's dense output (Hairer's form, as in scipy's ``Dop853DenseOutput``):

    y(x) = y0 + x (F0 + (1-x) (F1 + x (F2 + (1-x) (F3 + x (F4 + (1-x) (F5 + x F6)))))),
    F0 = y1 - y0, F1 = h k_0 - F0, F2 = 2 F0 - h (k_0 + k_12), F3..F6 = h (D K)_0..3.
    """
    r = np.eye(8)  # r[i]: record component i
    f0 = r[1] - r[0]
    terms = [f0, r[2] - f0, 2 * f0 - r[2] - r[3], r[4], r[5], r[6], r[7]]
    poly = np.zeros((8, 8))  # poly[power, component]
    poly[0] = terms[6]
    for i, term in zip(range(5, -1, -1), reversed(terms[:6])):
        shifted = np.roll(poly, 1, axis=0)  # x * poly (the top power stays zero: the degree is at most 7)
        poly = shifted if i % 2 == 1 else poly - shifted  # F5 takes x, F4 takes 1 - x, ...
        poly[0] += term
    poly = np.roll(poly, 1, axis=0)  # y = y0 + x * poly
    poly[0] += r[0]
    return poly


def _interpolant_from_stages(tab) -> np.ndarray:
    """The ``(8, 16)`` matrix M with: step interpolant's coefficients of x^0 .. x^7 = e_0 y0 + h M K, for the
    stages K = (k_0 .. k_15) of one step (shared by every row; h and y0 are the row's).

    The record of :func:`_dense_power_basis` is (y0, y1, h k_0, h k_12, h (D K)_0..3) with y1 = y0 + h b K, and
    y0 enters the polynomial only as its constant term (the interpolant of a step with K = 0 is y0), so every
    other term is a fixed linear map of h K: one matrix product per iteration instead of a record to expand."""
    n = tab.N_STAGES_EXTENDED
    from_stages = np.zeros((7, n))  # (y1 - y0) / h, k_0, k_12 and the rows of D, each as a combination of K
    from_stages[0, : tab.N_STAGES] = tab.B
    from_stages[1, 0], from_stages[2, tab.N_STAGES], from_stages[3:] = 1.0, 1.0, tab.D
    # Columns 1..7 of the basis take y1, h k_0, h k_12, h D K; the y0 inside y1 = y0 + h b K joins column 0's y0,
    # and the two columns sum to e_0 (tests/test_integrate.py checks the whole map against the record route).
    return _dense_power_basis()[:, 1:] @ from_stages


def _evaluate(f: VectorField, y: Tensor, out: Tensor) -> None:
    """Write f at the state ``y`` (2, *batch, *tail) into ``out`` (same shape)."""
    dq, dp = f(y[0], y[1])
    torch.stack([dq, dp], out=out)


class _Dop853Buffers:
    """The stage buffers of one working batch and the views the inner loop reuses (a view costs about as much
    as a small kernel, so they are made once per batch, not once per stage).

    ``k``: ``(16, 2, *batch, *tail)`` stage derivatives, zero-initialised; ``z``: the stage input, same shape
    as the state; ``h_flat``: each row's step size repeated over the row's elements of q (``h_q``) and p
    (``h_p``), flattened like ``z``.
    """

    def __init__(self, y: Tensor, n_rows: int, n_stages: int, n_extended: int) -> None:
        self.k = y.new_zeros((n_extended,) + tuple(y.shape))
        self.flat = self.k.view(n_extended, -1)
        self.prefix_t = [self.flat[:s].t() for s in range(n_extended + 1)]  # stage s combines k_0 .. k_{s-1}
        self.slots = list(self.k.unbind(0))
        self.error_stages = self.flat[: n_stages + 1]  # k_0 .. k_12: the stages and the first-same-as-last
        self.n_rows, self.width = n_rows, y[0].numel() // n_rows
        self.z = torch.empty_like(y)
        self.z_flat, (self.zq, self.zp) = self.z.view(-1), self.z.unbind(0)
        self.h_flat = torch.empty_like(self.z_flat)
        self.h_q, self.h_p = self.h_flat.view(2, n_rows, self.width).unbind(0)
        self.first_rows, self.last_rows = self.rows(0), self.rows(n_stages)  # k_0 and k_12
        self.ones = y.new_ones(self.width)

    def spread(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """A per-row ``x`` (rows,) repeated over the row's elements, ``(rows, width)``: an outer product with
        ones, because broadcasting ``(1, rows, 1)`` against ``(2, rows, width)`` runs ~4x slower in torch on CPU
        (a short, strided inner loop) than operands whose only broadcast axis is the outer one."""
        return torch.outer(x, self.ones) if out is None else torch.outer(x, self.ones, out=out)

    def rows(self, s: int) -> Tensor:
        """Stage derivative ``s`` as ``(2, rows, width)``."""
        return self.slots[s].view(2, self.n_rows, self.width)

    def stage(self, f: VectorField, y_flat: Tensor, a_row: Tensor, s: int) -> None:
        """k_s = f(y + h sum_j a_sj k_j): one matrix-vector product, one fused multiply-add, one field call."""
        torch.addcmul(y_flat, self.h_flat, torch.mv(self.prefix_t[s], a_row), out=self.z_flat)
        dq, dp = f(self.zq, self.zp)
        torch.stack([dq, dp], out=self.slots[s])


def simulate(system, params: dict, q0: Tensor, p0: Tensor, t: Tensor, method: str | None = None, **kwargs):
    """Integrate a :class:`systems.System` with its exact vector field (shapes as :func:`odeint_hamiltonian`).

    ``method`` defaults to leapfrog for separable systems and implicit midpoint otherwise. ``params`` tensors
    have shape ``batch`` (one row per trajectory).
    """
    if method is None:
        method = "leapfrog" if system.separable else "implicit_midpoint"
    if method in SEPARABLE_ONLY and not system.separable:
        raise ValueError(f"{method} needs a separable Hamiltonian; {system.name} is not (use implicit_midpoint)")
    n_rows = q0.shape[0] if q0.ndim == 3 else None

    def rows_field(rows: Tensor) -> VectorField:
        return system.field({k: v[rows] if v.ndim and v.shape[0] == n_rows else v for k, v in params.items()})

    if method == "dop853" and n_rows is not None:
        kwargs.setdefault("rows_field", rows_field)
    return odeint_hamiltonian(system.field(params), q0, p0, t, method=method, **kwargs)
