"""The blocks of an irreps as plain integers, for forward passes to read.

A forward pass that iterates an ``o3.Irreps`` reads e3nn ``Irrep`` objects. ``torch.compile`` cannot guard on
them (``Irrep.__len__`` raises in e3nn 0.6, so tracing stops with ``NotImplementedError``), and every
``Irrep("0e")`` built in a forward parses a string. Modules therefore turn their irreps into :class:`Block`
tuples once, at construction.

Example::

    >>> [tuple(b) for b in blocks("2x0e + 1x1o")]
    [(2, 0, 1, 1), (1, 1, -1, 3)]
"""
from __future__ import annotations

from typing import NamedTuple

from e3nn import o3


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
