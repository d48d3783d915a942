"""The Hamiltonian head: equivariant atom and pair features -> def2-SVP orbital blocks.

Two pieces, both stating their irreps:

* :class:`OrbitalExpansion` turns features of irreps :data:`BLOCK_IRREPS` (times a multiplicity) into padded
  ``14 x 14`` orbital blocks of :data:`~metaham.qh9.orbitals.PADDED_IRREPS` rows and columns, with the
  Clebsch-Gordan coefficients ``wigner_3j(l_row, l_col, l_in)`` looked up by the three angular momenta.
* :class:`BlockHead` builds those features from node features -- per atom from the atom alone (diagonal
  blocks), per pair ``(i, j)`` from the two atoms and their distance (off-diagonal blocks) -- with a sparse
  ``uuu`` tensor product (SPHNet's sparse tensor-product gate) whose per-row path weights, like the
  expansion's channel weights, come from an MLP of the atoms' scalars.

Orbital blocks are in e3nn order (p shells as (y, z, x), see :mod:`metaham.qh9.orbitals`): a block ``B`` of
an atom pair transforms as ``D_row(R) B D_col(R)^T`` when the features transform with ``D(R)``, which is what
makes the assembled matrix transform as ``D H D^T``.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from metaham.nn import BesselBasis, EquivariantLinear, SparseTensorProduct

from .orbitals import PADDED_IRREPS


def _natural_first(ir: o3.Irrep) -> tuple[int, bool]:
    """Sort key: by l, the natural parity ((-1)^l) before the other."""
    return ir.l, ir.p != (-1) ** ir.l


def _block_paths(irreps: o3.Irreps) -> list[tuple[int, int, o3.Irrep]]:
    """Every ``(row block, column block, ir_in)`` with ``ir_in`` in ``ir_row x ir_col`` (the full
    Clebsch-Gordan decomposition of the block: as many components as the block has entries)."""
    return [(a, b, ir) for a, (_, ir_a) in enumerate(irreps) for b, (_, ir_b) in enumerate(irreps) for ir in ir_a * ir_b]


#: The irreps a def2-SVP block is made of (0e 1o 1e 2e 2o 3o 3e 4e): ``s p d x s p d`` needs the
#: unnatural parities 1e (p x p, d x d), 2o (p x d) and 3e (d x d) besides the natural ones.
BLOCK_IRREPS = o3.Irreps(sorted({ir for _, _, ir in _block_paths(PADDED_IRREPS)}, key=_natural_first))


class OrbitalExpansion(nn.Module):
    """``(N, irreps_in.dim)`` features -> ``(N, 14, 14)`` orbital blocks (e3nn order, padded slots).

    A linear map gives one ``ir_in`` channel per ``(row channel, column channel, ir_in)`` Clebsch-Gordan path
    of the block, each channel is multiplied by its own per-row weight (``weight (N, n_channels)``, from an
    MLP of scalars), and the block is ``B[m_row, m_col] = sum_paths sqrt(2 l_in + 1) *
    wigner_3j(l_row, l_col, l_in)[m_row, m_col, m_in] * f[m_in]``. With the sqrt factors the path-to-entry
    map is orthogonal (the Clebsch-Gordan change of basis), so unit-variance channels give unit-variance
    entries.

    Args:
        irreps_in: irreps of the input features; must contain every irrep of :data:`BLOCK_IRREPS`.
        irreps_block: row (= column) irreps of the block (default def2-SVP's padded ``3x0e+2x1o+1x2e``).
    """

    def __init__(self, irreps_in: o3.Irreps | str, irreps_block: o3.Irreps | str = PADDED_IRREPS) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_block = o3.Irreps(irreps_block)
        paths = _block_paths(self.irreps_block)
        missing = sorted({ir for _, _, ir in paths} - {ir for _, ir in self.irreps_in})
        if missing:
            raise ValueError(f"irreps_in = {self.irreps_in} lacks {missing}, needed for {self.irreps_block} blocks")
        # Channels of each ir_in, in path order; their irreps are what the linear map produces.
        per_ir: dict[o3.Irrep, list[tuple[int, int, int, int]]] = {}  # ir -> [(a, b, c_row, c_col)]
        for a, b, ir in paths:
            mul_a, mul_b = self.irreps_block[a].mul, self.irreps_block[b].mul
            per_ir.setdefault(ir, []).extend((a, b, ca, cb) for ca in range(mul_a) for cb in range(mul_b))
        order = sorted(per_ir, key=_natural_first)
        self.irreps_channels = o3.Irreps([(len(per_ir[ir]), ir) for ir in order])
        self.n_channels = self.irreps_channels.num_irreps
        self.linear = EquivariantLinear(self.irreps_in, self.irreps_channels)

        d = self.irreps_block.dim
        starts = [sum(m * i.dim for m, i in self.irreps_block[:k]) for k in range(len(self.irreps_block))]
        cg = torch.zeros(self.irreps_channels.dim, d, d)
        channel_of_component = []
        row, channel = 0, 0
        for ir in order:
            for a, b, ca, cb in per_ir[ir]:
                la, lb = self.irreps_block[a].ir.l, self.irreps_block[b].ir.l
                r0 = starts[a] + ca * (2 * la + 1)
                c0 = starts[b] + cb * (2 * lb + 1)
                # By angular momentum, never by position in a list: (l_row, l_col, l_in) picks the symbol.
                w3j = o3.wigner_3j(la, lb, ir.l) * math.sqrt(2 * ir.l + 1)  # (2la+1, 2lb+1, 2l+1)
                cg[row : row + ir.dim, r0 : r0 + 2 * la + 1, c0 : c0 + 2 * lb + 1] = w3j.permute(2, 0, 1)
                channel_of_component += [channel] * ir.dim
                row += ir.dim
                channel += 1
        self.register_buffer("cg", cg.reshape(self.irreps_channels.dim, d * d), persistent=False)
        self.register_buffer("channel_index", torch.tensor(channel_of_component, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x (N, irreps_in.dim)``, ``weight (N, n_channels)`` -> ``(N, d, d)`` blocks, ``d = irreps_block.dim``."""
        f = self.linear(x) * weight.index_select(1, self.channel_index)
        d = self.irreps_block.dim
        return (f @ self.cg).reshape(-1, d, d)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_block} x {self.irreps_block} via {self.irreps_channels}"


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_out))


class _BlockBranch(nn.Module):
    """Features of one kind of block (diagonal or pair): ``uuu`` sparse TP of two linear projections, then
    the orbital expansion; both weighted per row by one MLP of invariants."""

    def __init__(self, irreps_node: o3.Irreps, mul: int, n_invariants: int, hidden: int, sparsity: float) -> None:
        super().__init__()
        natural = o3.Irreps([(mul, ir) for ir in sorted({ir for _, ir in irreps_node})])
        self.left = EquivariantLinear(irreps_node, natural)
        self.right = EquivariantLinear(irreps_node, natural)
        self.tp = SparseTensorProduct(natural, natural, o3.Irreps([(mul, ir) for _, ir in BLOCK_IRREPS]), mode="uuu", sparsity=sparsity)
        self.expansion = OrbitalExpansion(self.tp.irreps_out)
        self.weights = _mlp(n_invariants, hidden, self.tp.weight_numel + self.expansion.n_channels)

    def forward(self, left: torch.Tensor, right: torch.Tensor, invariants: torch.Tensor) -> torch.Tensor:
        w_tp, w_expansion = self.weights(invariants).split([self.tp.weight_numel, self.expansion.n_channels], dim=-1)
        return self.expansion(self.tp(self.left(left), self.right(right), w_tp), w_expansion)


class BlockHead(nn.Module):
    """Node features -> padded orbital blocks of every atom and of every given pair.

    Args:
        irreps_node: irreps of the node features (scalars first; l up to 4 recommended: d x d blocks reach 4).
        mul: multiplicity of every irrep of the block features.
        hidden: width of the weight MLPs.
        cutoff: radius of the Bessel basis of pair distances (beyond it pairs see only the atoms' scalars).
        num_basis: Bessel functions of the pair distance.
        sparsity: sparsity of both tensor-product gates (0: dense).

    ``forward(x (N, irreps_node.dim), pairs (2, P), pair_vec (P, 3))`` -> ``(diag (N, 14, 14),
    offdiag (P, 14, 14))``; ``pairs[:, k] = (i, j)``: block rows belong to atom i, columns to atom j.
    """

    def __init__(
        self,
        irreps_node: o3.Irreps | str,
        mul: int = 16,
        hidden: int = 64,
        cutoff: float = 12.0,
        num_basis: int = 8,
        sparsity: float = 0.0,
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.n_scalars = sum(m for m, ir in self.irreps_node if ir == o3.Irrep("0e"))
        if self.irreps_node[0].ir != o3.Irrep("0e"):
            raise ValueError(f"irreps_node = {self.irreps_node}: list the 0e scalars first")
        self.radial = BesselBasis(num_basis, cutoff)
        self.diag = _BlockBranch(self.irreps_node, mul, self.n_scalars, hidden, sparsity)
        # Pair invariants: both atoms' scalars (ordered: row atom first) and the distance.
        self.pair = _BlockBranch(self.irreps_node, mul, 2 * self.n_scalars + num_basis, hidden, sparsity)

    def forward(self, x: torch.Tensor, pairs: torch.Tensor, pair_vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scalars = x[:, : self.n_scalars]
        diag = self.diag(x, x, scalars)
        i, j = pairs
        invariants = torch.cat(
            [scalars.index_select(0, i), scalars.index_select(0, j), self.radial(torch.linalg.vector_norm(pair_vec, dim=-1))], dim=-1
        )
        offdiag = self.pair(x.index_select(0, i), x.index_select(0, j), invariants)
        return diag, offdiag

