"""The Hamiltonian head: equivariant atom and pair features -> def2-SVP orbital blocks.

Two pieces, both stating their irreps:

* :class:`OrbitalExpansion` turns features of irreps :data:`BLOCK_IRREPS` (times a multiplicity) into padded
  ``14 x 14`` orbital blocks of :data:`~metaham.qh9.orbitals.PADDED_IRREPS` rows and columns, with the
  Clebsch-Gordan coefficients ``wigner_3j(l_row, l_col, l_in)`` looked up by the three angular momenta.
* :class:`BlockHead` builds those features from node features -- per atom from the atom alone (diagonal
  blocks), per pair ``(i, j)`` from a two-centre term of the pair vector plus an environment term from both
  atoms' features for the pairs the sparse pair gate keeps (off-diagonal blocks) -- with sparse ``uuu``
  tensor products (SPHNet's sparse tensor-product gate) whose per-row path weights, like the expansion's
  channel weights, come from MLPs of the atoms' scalars and the pair invariants.

Orbital blocks are in e3nn order (p shells as (y, z, x), see :mod:`metaham.qh9.orbitals`): a block ``B`` of
an atom pair transforms as ``D_row(R) B D_col(R)^T`` when the features transform with ``D(R)``, which is what
makes the assembled matrix transform as ``D H D^T``.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from metaham.nn import (
    BesselBasis,
    EquivariantLinear,
    PairInvariants,
    SparsePairGate,
    SparseTensorProduct,
    linear_columns,
    spherical_harmonics,
)

from metaham.nn.layout import blocks, ir_mul_from_mul_ir
from metaham.nn.pair_gate import check_keep_radius

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
        layout: how the input features store each block, ``"mul_ir"`` (e3nn's) or ``"ir_mul"``
            (component-major, :mod:`metaham.nn.layout`); the channels then follow the same layout, so the linear
            map needs no transposed copies. The blocks come out the same.
    """

    def __init__(
        self, irreps_in: o3.Irreps | str, irreps_block: o3.Irreps | str = PADDED_IRREPS, layout: str = "mul_ir"
    ) -> None:
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
        self.linear = EquivariantLinear(self.irreps_in, self.irreps_channels, layout=layout)

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
        channel_index = torch.tensor(channel_of_component, dtype=torch.long)
        if layout == "ir_mul":  # the same rows, in the order the component-major channels come in
            positions = torch.arange(self.irreps_channels.dim)[None]
            ir_mul_rows = ir_mul_from_mul_ir(positions, blocks(self.irreps_channels))[0]
            cg, channel_index = cg[ir_mul_rows], channel_index[ir_mul_rows]
        self.register_buffer("cg", cg.reshape(self.irreps_channels.dim, d * d), persistent=False)
        self._block_dim = d
        self.register_buffer("channel_index", channel_index, persistent=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x (N, irreps_in.dim)``, ``weight (N, n_channels)`` -> ``(N, d, d)`` blocks, ``d = irreps_block.dim``."""
        f = self.linear(x) * weight.index_select(1, self.channel_index)
        return (f @ self.cg).reshape(-1, self._block_dim, self._block_dim)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_block} x {self.irreps_block} via {self.irreps_channels}"


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_out))


class BlockHead(nn.Module):
    """Node features -> padded orbital blocks of every atom and of every given pair.

    * Diagonal block of atom i: features ``Linear(x_i) + TP(L(x_i), R(x_i))`` (a ``uuu`` sparse tensor
      product of two projections, which yields the parities a block needs that the node features lack:
      1e, 2o, 3e), expanded with channel weights from an MLP of the atom's scalars.
    * Block of a pair ``(i, j)``: a two-centre part for every pair -- the spherical harmonics ``Y(r_ij)`` up
      to l = 4 with per-channel radial coefficients, as in a Slater-Koster table -- plus, for the pairs the
      :class:`~metaham.nn.SparsePairGate` keeps (all pairs when dense; always those closer than
      ``pair_keep_radius``), the environment part
      ``TP(L(x_i), R(x_j))``. Coefficients and weights come from MLPs of pair invariants: both atoms'
      scalars, the distance's Bessel basis and channel inner products of a narrow projection of the features
      (gated by ``sigmoid(score - quantile)`` for kept pairs, which is how the pair scorer learns).

    Args:
        irreps_node: irreps of the node features (``0e`` scalars first).
        mul: multiplicity of every irrep of the block features.
        hidden: width of the weight MLPs.
        cutoff: radius of the Bessel basis of pair distances, Angstrom (beyond it a pair's radial
            features are zero and only the atoms' scalars remain).
        num_basis: Bessel functions of the pair distance.
        pair_channels: channels per irrep type of the projection the pair invariants are computed from.
        tp_sparsity: sparsity of both tensor-product gates (0: dense).
        pair_sparsity: sparsity of the pair gate on the environment part; None: every pair gets it.
        pair_keep_radius: pairs closer than this (Angstrom) always get the environment part.
        tp_per_output: the tensor-product gates keep their share of the paths into each block irrep.

    ``forward(x (N, irreps_node.dim), pairs (2, P), pair_vec (P, 3), batch (N,))`` -> ``(diag (N, 14, 14),
    offdiag (P, 14, 14))``; ``pairs[:, k] = (i, j)``: rows belong to atom i, columns to atom j;
    ``pair_vec = pos[i] - pos[j]``; ``batch`` maps atoms to molecules (the pair gate keeps its share per
    molecule).
    """

    LMAX_TWO_CENTRE = 4  # d x d blocks reach l = 4

    def __init__(
        self,
        irreps_node: o3.Irreps | str,
        mul: int = 16,
        hidden: int = 64,
        cutoff: float = 12.0,
        num_basis: int = 8,
        pair_channels: int = 8,
        tp_sparsity: float = 0.0,
        pair_sparsity: float | None = None,
        pair_keep_radius: float = 0.0,
        tp_per_output: bool = False,
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        if self.irreps_node[0].ir != o3.Irrep("0e"):
            raise ValueError(f"irreps_node = {self.irreps_node}: list the 0e scalars first")
        self.n_scalars = self.irreps_node[0].mul
        self.irreps_features = o3.Irreps([(mul, ir) for _, ir in BLOCK_IRREPS])
        natural = o3.Irreps([(mul, ir) for ir in sorted({ir for _, ir in self.irreps_node}, key=_natural_first)])

        # diagonal blocks
        self.diag_linear = EquivariantLinear(self.irreps_node, self.irreps_features)
        self.diag_left = EquivariantLinear(self.irreps_node, natural)
        self.diag_right = EquivariantLinear(self.irreps_node, natural)
        self.diag_tp = SparseTensorProduct(
            natural, natural, self.irreps_features, mode="uuu", sparsity=tp_sparsity, per_output=tp_per_output
        )
        self.diag_expansion = OrbitalExpansion(self.irreps_features)
        self.diag_weights = _mlp(self.n_scalars, hidden, self.diag_tp.weight_numel + self.diag_expansion.n_channels)

        # pair blocks
        self.radial = BesselBasis(num_basis, cutoff)
        self.irreps_pair = o3.Irreps([(int(pair_channels), ir) for ir in sorted({ir for _, ir in self.irreps_node})])
        self.pair_projection = EquivariantLinear(self.irreps_node, self.irreps_pair)
        self.pair_invariants = PairInvariants(self.irreps_pair)
        if pair_sparsity is None:
            check_keep_radius(pair_keep_radius)  # unused without a gate, but a bad value is still an error
            self.pair_gate = None
        else:
            self.pair_gate = SparsePairGate(self.irreps_pair, pair_sparsity, keep_radius=pair_keep_radius)
        n_invariants = 2 * self.n_scalars + num_basis + self.pair_invariants.n_invariants
        # Two-centre features: the harmonics of natural parity (the only ones Y(r) has), one coefficient each.
        self._feature_blocks = blocks(self.irreps_features)
        self._two_centre = [(k, b.l) for k, b in enumerate(self._feature_blocks) if b.p == (-1) ** b.l]
        # The pair features are component-major (ir_mul) from the two-centre term and the product to the
        # expansion's linear map: no transposed copies of the widest (pairs x features) tensors.
        self.pair_expansion = OrbitalExpansion(self.irreps_features, layout="ir_mul")
        self.pair_weights = _mlp(n_invariants, hidden, mul * len(self._two_centre) + self.pair_expansion.n_channels)
        self.pair_left = EquivariantLinear(self.irreps_node, natural)
        self.pair_right = EquivariantLinear(self.irreps_node, natural)
        self.pair_tp = SparseTensorProduct(
            natural, natural, self.irreps_features, mode="uuu", sparsity=tp_sparsity, per_output=tp_per_output,
            out_layout="ir_mul",
        )
        self.pair_tp_weights = _mlp(n_invariants, hidden, self.pair_tp.weight_numel)
        self.mul = mul

    def forward(
        self, x: torch.Tensor, pairs: torch.Tensor, pair_vec: torch.Tensor, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scalars = x[:, : self.n_scalars]
        # In the fixed phase only the kept paths' weights are computed (and all expansion weights).
        columns, n_expansion = self.diag_tp.weight_columns, self.diag_expansion.n_channels
        if columns is not None:
            expansion = torch.arange(n_expansion, device=columns.device) + self.diag_tp.weight_numel
            columns = torch.cat([columns, expansion])
        weights = linear_columns(self.diag_weights[-1], self.diag_weights[:-1](scalars), columns)
        w_tp, w_expansion = weights.split([weights.shape[-1] - n_expansion, n_expansion], -1)
        features = self.diag_linear(x) + self.diag_tp(self.diag_left(x), self.diag_right(x), w_tp)
        diag = self.diag_expansion(features, w_expansion)
        return diag, self._pairs(x, scalars, pairs, pair_vec, batch)

    def _pairs(self, x, scalars, pairs, pair_vec, batch) -> torch.Tensor:
        i, j = pairs
        length = torch.linalg.vector_norm(pair_vec, dim=-1)
        common = torch.cat([scalars.index_select(0, i), scalars.index_select(0, j), self.radial(length)], dim=-1)
        projected = self.pair_projection(x)
        invariants = self.pair_invariants(projected, pairs)
        coefficients, w_expansion = self.pair_weights(torch.cat([common, invariants], -1)).split(
            [self.mul * len(self._two_centre), self.pair_expansion.n_channels], -1
        )
        features = self._two_centre_features(coefficients, spherical_harmonics(self.LMAX_TWO_CENTRE, pair_vec, "pyscf"))
        if self.pair_gate is None:
            kept, kept_invariants = None, invariants
        else:
            selection = self.pair_gate(projected, pairs, batch, length, invariants)
            kept, kept_invariants = selection.index, selection.invariants
            common, i, j = common.index_select(0, kept), i.index_select(0, kept), j.index_select(0, kept)
        hidden = self.pair_tp_weights[:-1](torch.cat([common, kept_invariants], -1))
        w_tp = linear_columns(self.pair_tp_weights[-1], hidden, self.pair_tp.weight_columns)
        environment = self.pair_tp(self.pair_left(x).index_select(0, i), self.pair_right(x).index_select(0, j), w_tp)
        features = features + environment if kept is None else features.index_add(0, kept, environment)
        return self.pair_expansion(features, w_expansion)

    def _two_centre_features(self, coefficients: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        """``(P, irreps_features.dim)``, component-major (``ir_mul``): ``coefficient[u, l] * Y_l`` in the
        natural-parity blocks, 0 elsewhere."""
        n = sh.shape[0]
        coefficients = coefficients.reshape(n, self.mul, len(self._two_centre))
        by_block = {k: c for c, (k, _) in enumerate(self._two_centre)}
        pieces = []
        for k, b in enumerate(self._feature_blocks):
            if k in by_block:
                y = sh[:, b.l**2 : (b.l + 1) ** 2]
                pieces.append((y[:, :, None] * coefficients[:, None, :, by_block[k]]).reshape(n, b.dim * b.mul))
            else:
                pieces.append(sh.new_zeros(n, b.mul * b.dim))
        return torch.cat(pieces, dim=-1)
