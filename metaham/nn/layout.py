"""The blocks of an irreps as plain integers, for forward passes to read, and the two layouts of a feature row.

A forward pass that iterates an ``o3.Irreps`` reads e3nn ``Irrep`` objects. ``torch.compile`` cannot guard on
them (``Irrep.__len__`` raises in e3nn 0.6, so tracing stops with ``NotImplementedError``), and every
``Irrep("0e")`` built in a forward parses a string. Modules therefore turn their irreps into :class:`Block`
tuples once, at construction.

Example::

    >>> [tuple(b) for b in blocks("2x0e + 1x1o")]
    [(2, 0, 1, 1), (1, 1, -1, 3)]
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from e3nn import o3

LAYOUTS = ("mul_ir", "ir_mul")


class Block(NamedTuple):
    """One ``mul x ir`` block of an irreps."""

    mul: int  #: multiplicity
    l: int  #: degree
    p: int  #: parity, +1 or -1
    dim: int  #: ``2 l + 1``, the size of one copy

    @property
    def even_scalar(self) -> bool:
        """``0e``: the only block a bias may be added to."""
        return self.l == 0 and self.p == 1


def blocks(irreps: o3.Irreps | str) -> tuple[Block, ...]:
    """``irreps``' blocks, in order, as :class:`Block` tuples of ints."""
    return tuple(Block(int(mul), int(ir.l), int(ir.p), int(ir.dim)) for mul, ir in o3.Irreps(irreps))


def check_layout(layout: str, name: str = "layout") -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else a ValueError naming the argument ``name`` and the value."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
    return layout


def mul_ir_from_ir_mul(x: torch.Tensor, layout: Sequence[Block]) -> torch.Tensor:
    """``(N, dim)`` rows with every block stored ``ir_mul`` (component-major: ``2l + 1`` runs of ``mul``
    channels) -> the same rows in e3nn's ``mul_ir`` (``mul`` copies of ``2l + 1`` components).

    ``ir_mul`` is how a row-wise product multiplies a per-channel factor into a block over whole contiguous
    rows of channels, several times faster on a CPU than over trailing runs of ``2l + 1`` components; the
    conversion is then paid once, e.g. per node after a sum over edges instead of per edge.
    """
    return _transpose_blocks(x, [(b.dim, b.mul) for b in layout])


def ir_mul_from_mul_ir(x: torch.Tensor, layout: Sequence[Block]) -> torch.Tensor:
    """The inverse of :func:`mul_ir_from_ir_mul`."""
    return _transpose_blocks(x, [(b.mul, b.dim) for b in layout])


def _transpose_blocks(x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Each block of the rows, stored as a ``(rows, columns)`` matrix of ``shapes``, stored transposed."""
    n = x.shape[0]
    pieces = x.split([a * b for a, b in shapes], -1)
    return torch.cat([p.reshape(n, a, b).transpose(1, 2).reshape(n, -1) for p, (a, b) in zip(pieces, shapes)], -1)
