"""Equivariant linear layer: channels of the same irrep mixed by one weight matrix per irrep type."""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from .layout import blocks, check_layout


class EquivariantLinear(nn.Module):
    """``(N, irreps_in.dim) -> (N, irreps_out.dim)``: for every irrep type ``ir``, all input channels of type
    ``ir`` (from any number of blocks) are mixed into all output channels of type ``ir`` by one weight matrix,
    shared by the ``2l + 1`` components; ``0e`` outputs get a bias.

    The same map as e3nn's fully connected ``o3.Linear`` (weights ~ N(0, 1), output divided by the square root
    of the fan-in, biases initialised to 0), computed with one matrix product per irrep type instead of one
    per block pair: on small inputs such as per-node features its cost is the number of operations, not the
    arithmetic. Output irreps that no input irrep matches are zero (plus their bias, for ``0e``).

    ``layout`` is how both input and output rows store each block: ``"mul_ir"`` (e3nn's) or ``"ir_mul"``
    (component-major, :mod:`metaham.nn.layout`), where the channels of a component are contiguous and the
    product needs no transposed copies; the weights and the map are the same.
    """

    def __init__(
        self, irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str, bias: bool = True, layout: str = "mul_ir"
    ) -> None:
        super().__init__()
        self.layout = check_layout(layout)
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self._in_blocks, self._out_blocks = blocks(self.irreps_in), blocks(self.irreps_out)
        self._in_sizes = [b.mul * b.dim for b in self._in_blocks]
        self._out_sizes = [b.mul * b.dim for b in self._out_blocks]
        self._types = []  # (weight name, input block indices, output block indices, fan-in)
        for ir in sorted({ir for _, ir in self.irreps_out}):
            ins = [i for i, (_, ir_in) in enumerate(self.irreps_in) if ir_in == ir]
            outs = [i for i, (_, ir_out) in enumerate(self.irreps_out) if ir_out == ir]
            fan_in = sum(self.irreps_in[i].mul for i in ins)
            if fan_in:
                fan_out = sum(self.irreps_out[i].mul for i in outs)
                self.register_parameter(f"weight_{ir}", nn.Parameter(torch.randn(fan_in, fan_out)))
            self._types.append((f"weight_{ir}", ins, outs, fan_in))
        self._bias_blocks = [i for i, (_, ir) in enumerate(self.irreps_out) if ir == o3.Irrep("0e")] if bias else []
        if self._bias_blocks:
            self.bias = nn.Parameter(torch.zeros(sum(self.irreps_out[i].mul for i in self._bias_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, irreps_in.dim)`` -> ``(N, irreps_out.dim)``."""
        if x.shape[-1] != sum(self._in_sizes):
            raise ValueError(
                f"x must have last dimension {self.irreps_in.dim} for {self.irreps_in}, got {tuple(x.shape)}"
            )
        n = x.shape[0]
        # Every block as (n, d, U), component-major: a transposed view of an e3nn (n, U, d) block.
        if self.layout == "ir_mul":
            parts = [p.reshape(n, b.dim, b.mul) for p, b in zip(x.split(self._in_sizes, -1), self._in_blocks)]
        else:
            parts = [
                p.reshape(n, b.mul, b.dim).transpose(1, 2) for p, b in zip(x.split(self._in_sizes, -1), self._in_blocks)
            ]
        out: list[torch.Tensor | None] = [None] * len(self._out_blocks)
        for name, ins, outs, fan_in in self._types:
            if not fan_in:
                continue
            joined = parts[ins[0]] if len(ins) == 1 else torch.cat([parts[i] for i in ins], dim=2)  # (n, d, U)
            weight = getattr(self, name) / math.sqrt(fan_in)
            # (n, d, U) -> (n d, U) @ (U, W) -> (n, d, W): one 2-D matrix product over all nodes and components.
            # 2-D on purpose: under vmap with per-task weights (MAML) it is one batched matmul, where a 3-D
            # (n, d, U) @ (U, W) copied the weight for every node (3.6x slower meta-steps).
            d = joined.shape[1]
            mixed = (joined.reshape(n * d, -1) @ weight).reshape(n, d, -1)
            if self.layout == "mul_ir":
                mixed = mixed.transpose(1, 2)  # (n, W, d)
            channel_axis = 2 if self.layout == "ir_mul" else 1
            for i, part in zip(outs, mixed.split([self._out_blocks[i].mul for i in outs], dim=channel_axis)):
                out[i] = part.reshape(n, -1)
        if self._bias_blocks:
            offset = 0
            for i in self._bias_blocks:
                mul = self._out_blocks[i].mul
                b = self.bias[offset : offset + mul]
                out[i] = b.expand(n, mul) if out[i] is None else out[i] + b
                offset += mul
        pieces = [x.new_zeros(n, size) if o is None else o for o, size in zip(out, self._out_sizes)]
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}" + (f", layout={self.layout}" if self.layout != "mul_ir" else "")
