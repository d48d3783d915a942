"""The one equivariance check shared by every test of an equivariant module (nn, hamiltonian, qh9, ...).

``equivariance_error(fn, inputs, irreps_out)`` rotates (and, with ``parity=True``, also inverts) the inputs by
random orthogonal matrices and compares ``fn(rotated inputs)`` with the rotated ``fn(inputs)``.

Each input is given with how it transforms:
* an ``o3.Irreps`` (or string): a feature tensor ``(..., irreps.dim)`` transformed by ``irreps.D_from_matrix``;
* ``"cartesian"``: ``(..., 3)`` vectors transformed by the matrix itself (e3nn's ``1o`` is (x, y, z));
* ``None``: left as it is (indices, batch vectors, invariant scalars);
* a callable ``R -> D``: any other representation, e.g. features in the frame that ``axes="pyscf"`` uses,
  ``lambda R: irreps.D_from_matrix(P @ R @ P.T)`` with ``P`` the (x, y, z) -> (y, z, x) permutation.
``irreps_out`` takes the same forms.

The rotations and their Wigner D matrices are built in float64 and rounded once to each input's dtype
(a callable is called with a float64 matrix under float64 default dtype). e3nn would build D in torch's
default dtype, and float32 D matrices carry errors of several 1e-6 at l = 3 -- most of the float32
tolerance, spent on e3nn's rounding instead of the module's, so that the check would pass or fail with the
CPU's kernels. For float64 checks build the module (and its inputs) inside ``default_dtype(torch.float64)``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from e3nn import o3

#: Largest allowed relative error per dtype (the project's equivariance standard).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (restored even when the body raises)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _transform(x: torch.Tensor, how, rot: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by the float64 matrix ``rot`` as ``how`` says; D is built in float64, then rounded."""
    if how is None:
        return x
    if isinstance(how, str) and how == "cartesian":
        return x @ rot.to(x.dtype).T
    with default_dtype(torch.float64):
        d = how(rot) if callable(how) else o3.Irreps(how).D_from_matrix(rot)
    return x @ d.to(x.dtype).T


def equivariance_error(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, object]],
    irreps_out: o3.Irreps | str | Callable[[torch.Tensor], torch.Tensor],
    parity: bool = True,
    n_rotations: int = 3,
    seed: int = 0,
) -> float:
    """Largest relative error ``max |fn(D x) - D fn(x)| / max |fn(x)|`` over random rotations.

    With ``parity`` every other rotation is composed with the inversion -1 (a reflection). Raises if the
    output is identically zero (an equivariance check of a zero map would pass vacuously).
    """
    generator = torch.Generator().manual_seed(seed)
    out = fn(*[x for x, _ in inputs])
    scale = out.detach().abs().max()
    if not scale > 0:
        raise AssertionError("output is identically zero: the equivariance check would be vacuous")
    worst = 0.0
    for k in range(n_rotations):
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
        rot = q * torch.sign(torch.det(q))  # a proper rotation
        if parity and k % 2 == 1:
            rot = -rot
        rotated_in = [_transform(x, how, rot) for x, how in inputs]
        got = fn(*rotated_in)
        want = _transform(out, irreps_out, rot)
        worst = max(worst, float((got.detach() - want.detach()).abs().max() / scale))
    return worst


def assert_equivariant(fn, inputs, irreps_out, parity: bool = True, n_rotations: int = 3, seed: int = 0) -> float:
    """:func:`equivariance_error` below :data:`TOLERANCE` for the inputs' dtype; returns the error."""
    dtype = inputs[0][0].dtype
    err = equivariance_error(fn, inputs, irreps_out, parity, n_rotations, seed)
    assert err <= TOLERANCE[dtype], f"equivariance error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})"
    return err


@contextlib.contextmanager
def recorded_pair_gates(module: torch.nn.Module) -> Iterator[list]:
    """Collect the :class:`~metaham.nn.PairSelection` of every pair-gate call made inside ``module``."""
    from metaham.nn import SparsePairGate

    selections: list = []
    hooks = [
        m.register_forward_hook(lambda _m, _args, out: selections.append(out))
        for m in module.modules()
        if isinstance(m, SparsePairGate)
    ]
    try:
        yield selections
    finally:
        for hook in hooks:
            hook.remove()


def pair_gate_margin(selection) -> float:
    """How far the inputs are from a tie of a pair gate's hard top-k: the smallest gap between a graph's quantile
    (its lowest kept score) and a dropped pair's score, relative to the largest |score|; inf if none is dropped.

    A top-k gate is equivariant only away from ties: a rotation moves the (invariant) scores by rounding
    (~1e-7 relative in float32, ~1e-16 in float64), which cannot change the kept set while this gap is far
    larger, but can at a near-tie, where the kept set and so the output jump. Tests of a gated module assert a
    margin first, so that they state their premise and never pass or fail on rounding.
    """
    score, threshold = selection.score.detach(), selection.threshold.detach()
    dropped = torch.ones_like(score, dtype=torch.bool)
    dropped[selection.index] = False
    if not bool(dropped.any()):
        return math.inf
    return float((threshold[dropped] - score[dropped]).min() / score.abs().max())
