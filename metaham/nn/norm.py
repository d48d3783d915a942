"""Equivariant layer norm on e3nn's layout: each irrep block normalised over its channels, per node."""
from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from .layout import blocks


class EquivariantLayerNorm(nn.Module):
    """Layer norm that commutes with rotations and reflections.

    e3nn stores a block ``mul x ir`` as ``mul`` contiguous copies of ``2l + 1`` components, so each block is
    viewed as ``(N, mul, 2l + 1)`` (channel-major; viewing it as ``(N, 2l + 1, mul)`` mixes components of
    different channels and breaks equivariance once the scales differ per channel). Per node and block:

    * l = 0: centred over the channels, divided by the RMS over the channels (ordinary layer norm), then a
      per-channel scale and -- for ``0e`` only, a constant would break a ``0o``'s parity -- a bias;
    * l > 0: divided by the RMS of all its components over the channels (``sqrt(mean_u |x_u|^2 / (2l+1))``,
      so unit-variance components stay unit), then a per-channel scale. Norms only: no centring, no bias.

    Args:
        irreps: irreps of the features (input and output).
        eps: added to the mean square before the square root.
        affine: learn the per-channel scales (init 1) and ``0e`` biases (init 0).

    Shapes: ``(N, irreps.dim) -> (N, irreps.dim)``.
    """

    def __init__(self, irreps: o3.Irreps | str, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.eps = float(eps)
        self.affine = bool(affine)
        self._blocks = blocks(self.irreps)
        n_scalars_0e = sum(b.mul for b in self._blocks if b.even_scalar)
        if self.affine:
            self.scale = nn.Parameter(torch.ones(self.irreps.num_irreps))
            self.bias = nn.Parameter(torch.zeros(n_scalars_0e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, irreps.dim)`` -> ``(N, irreps.dim)``."""
        if x.shape[-1] != sum(b.mul * b.dim for b in self._blocks):
            raise ValueError(f"x must have last dimension {self.irreps.dim} for {self.irreps}, got {tuple(x.shape)}")
        n = x.shape[0]
        if self.affine:
            scales = self.scale.split([b.mul for b in self._blocks])
            biases = iter(self.bias.split([b.mul for b in self._blocks if b.even_scalar]))
        pieces = []
        # split(), not slices: one cat in the backward instead of a full-size zero tensor per block.
        parts = x.split([b.mul * b.dim for b in self._blocks], -1)
        for index, (block, b) in enumerate(zip(parts, self._blocks)):
            block = block.reshape(n, b.mul, b.dim)
            if b.l == 0:
                block = block - block.mean(dim=1, keepdim=True)
            block = block * torch.rsqrt(block.pow(2).mean(dim=(1, 2), keepdim=True) + self.eps)
            if self.affine:
                block = block * scales[index].reshape(1, b.mul, 1)
                if b.even_scalar:
                    block = block + next(biases).reshape(1, b.mul, 1)
            pieces.append(block.reshape(n, b.mul * b.dim))
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}, affine={self.affine}"
