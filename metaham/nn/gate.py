"""Gated nonlinearity: scalars through an activation, every l > 0 channel scaled by a sigmoid gate scalar."""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
from e3nn import o3
from torch import nn

from .layout import blocks


@functools.lru_cache(maxsize=None)
def _second_moment_scale(name: str) -> float:
    """``1 / sqrt(E[f(z)^2])`` for z ~ N(0, 1) (Gauss-Hermite quadrature, deterministic): scaling an
    activation by it keeps unit-variance inputs at unit second moment, as e3nn's ``normalize2mom`` does."""
    nodes, weights = np.polynomial.hermite.hermgauss(120)
    z = torch.tensor(math.sqrt(2.0) * nodes, dtype=torch.float64)
    values = _ACTIVATIONS[name](z).pow(2).numpy()
    return float(1.0 / math.sqrt(float(np.dot(weights, values)) / math.sqrt(math.pi)))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class GatedNonlinearity(nn.Module):
    """Equivariant nonlinearity producing ``irreps_out`` from ``irreps_in = scalars + gates + gated``.

    ``0e`` scalars pass through SiLU and ``0o`` scalars through tanh (odd, so parity is kept); each l > 0
    channel is multiplied by ``sigmoid`` of its own extra ``0e`` gate scalar. Activations are rescaled to keep
    a unit second moment (as e3nn's ``Gate``, whose layout this follows).

    Args:
        irreps_out: the wanted output irreps, scalars (l = 0) listed first.

    Attributes:
        irreps_in: what the preceding linear layer must produce: ``irreps_out``'s scalars, then
            ``{number of l > 0 channels}x0e`` gates, then the l > 0 irreps.

    Shapes: ``(N, irreps_in.dim) -> (N, irreps_out.dim)``.
    """

    def __init__(self, irreps_out: o3.Irreps | str) -> None:
        super().__init__()
        irreps_out = o3.Irreps(irreps_out)
        self.scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        self.gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        if self.scalars + self.gated != irreps_out:
            raise ValueError(f"irreps_out = {irreps_out}: list the scalar (l = 0) irreps before the others")
        n_gates = self.gated.num_irreps
        self.irreps_in = self.scalars + (o3.Irreps(f"{n_gates}x0e") if n_gates else o3.Irreps("")) + self.gated
        self.irreps_out = irreps_out
        self._gated_blocks = blocks(self.gated)
        self._sizes = [mul * ir.dim for mul, ir in self.scalars] + ([n_gates] if n_gates else []) + [
            b.mul * b.dim for b in self._gated_blocks
        ]
        # (activation, second-moment scale) per scalar block; scales computed here, outside any transform.
        names = ["silu" if ir.p == 1 else "tanh" for _, ir in self.scalars]
        self._scalar_acts = [(name, _second_moment_scale(name)) for name in names]
        self._gate_scale = _second_moment_scale("sigmoid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, irreps_in.dim)`` -> ``(N, irreps_out.dim)``."""
        if x.shape[-1] != sum(self._sizes):
            raise ValueError(
                f"x must have last dimension {self.irreps_in.dim} for {self.irreps_in}, got {tuple(x.shape)}"
            )
        parts = list(x.split(self._sizes, dim=-1))
        out = [_ACTIVATIONS[a](p) * scale for (a, scale), p in zip(self._scalar_acts, parts)]
        if self._gated_blocks:
            n_scalar_blocks = len(self._scalar_acts)
            gates = torch.sigmoid(parts[n_scalar_blocks]) * self._gate_scale
            n = x.shape[0]
            for block, g, b in zip(
                parts[n_scalar_blocks + 1 :], gates.split([b.mul for b in self._gated_blocks], dim=-1),
                self._gated_blocks,
            ):
                out.append((block.reshape(n, b.mul, b.dim) * g.unsqueeze(-1)).reshape(n, b.mul * b.dim))
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"
