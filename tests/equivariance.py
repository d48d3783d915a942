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

e3nn builds Wigner D matrices in torch's default dtype; for float64 checks wrap the test in
``default_dtype(torch.float64)`` (and build the module inside it) or the ~1e-7 error of float32 D matrices
hides or fakes failures at 1e-10.
"""
from __future__ import annotations

import contextlib
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
    if how is None:
        return x
    if isinstance(how, str) and how == "cartesian":
        return x @ rot.to(x.dtype).T
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
        rot = rot.to(torch.get_default_dtype())
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
