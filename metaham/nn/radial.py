"""Radial basis and smooth cutoff of edge lengths, in plain torch operations.

e3nn's ``soft_one_hot_linspace(basis="smooth_finite")`` is built on a custom autograd Function that fails
under ``torch.func`` (grad, vmap); these functions use only elementwise torch operations, so they work under
``functional_call``, ``grad`` (any order) and ``vmap``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """Smooth envelope ``u(r / cutoff)`` that is 1 at r = 0 and 0 for r >= cutoff.

    ``u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2)`` for d < 1 (DimeNet's envelope):
    its first and second derivatives vanish at the cutoff, so energies and forces built on it are smooth
    when an atom crosses the cutoff.

    Args:
        r: ``(...)`` distances (>= 0).
        cutoff: radius beyond which the envelope is exactly 0.
        p: polynomial order (>= 2).

    Returns:
        ``(...)`` envelope values in [0, 1].
    """
    d = r / cutoff
    poly = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * d**p
        + p * (p + 2.0) * d ** (p + 1)
        - p * (p + 1.0) / 2.0 * d ** (p + 2)
    )
    # torch.where, not masking in place: both branches are finite, so gradients stay finite under torch.func.
    return torch.where(d < 1.0, poly, torch.zeros_like(poly))


class BesselBasis(nn.Module):
    """Bessel radial basis times a polynomial cutoff: ``(E,)`` distances -> ``(E, num_basis)`` features.

    ``b_n(r) = sqrt(2 / c) * sin(n pi r / c) / r * u(r / c)``, n = 1..num_basis, c the cutoff and u
    :func:`polynomial_cutoff`. Written with ``torch.sinc`` so r = 0 is finite.

    Args:
        num_basis: number of basis functions (>= 1).
        cutoff: radius beyond which every feature is exactly 0 (> 0).
        p: order of the polynomial cutoff.
    """

    def __init__(self, num_basis: int, cutoff: float, p: int = 6) -> None:
        super().__init__()
        if int(num_basis) != num_basis or num_basis < 1:
            raise ValueError(f"num_basis must be an integer >= 1, got {num_basis!r}")
        if not (math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a finite number > 0, got {cutoff!r}")
        if int(p) != p or p < 2:
            raise ValueError(f"cutoff polynomial order p must be an integer >= 2, got {p!r}")
        self.num_basis = int(num_basis)
        self.cutoff = float(cutoff)
        self.p = int(p)
        self.register_buffer("frequencies", torch.arange(1, self.num_basis + 1, dtype=torch.get_default_dtype()))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` ``(...)`` distances -> ``(..., num_basis)`` basis values."""
        c = self.cutoff
        x = r.unsqueeze(-1) / c * self.frequencies.to(r.dtype)
        # sin(n pi r / c) / r = (n pi / c) * sinc(n r / c)
        bessel = math.sqrt(2.0 / c) * (math.pi / c) * self.frequencies.to(r.dtype) * torch.sinc(x)
        return bessel * polynomial_cutoff(r, c, self.p).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}, p={self.p}"
