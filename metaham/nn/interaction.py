"""Interaction block: message (sparse tensor product), aggregate, update -- with both sparse gates as options."""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from .gate import GatedNonlinearity
from .layout import blocks, ir_mul_from_mul_ir, mul_ir_from_ir_mul
from .linear import EquivariantLinear
from .norm import EquivariantLayerNorm
from .pair_gate import PairInvariants, SparsePairGate, check_keep_radius
from .radial import BesselBasis, polynomial_cutoff
from .sh import sh_irreps, spherical_harmonics
from .sparse_tp import SparseTensorProduct, linear_columns


class InteractionBlock(nn.Module):
    """One equivariant message-passing layer: ``(N, irreps_in)`` node features -> ``(N, irreps_out)``.

    For each kept pair ``e = (j -> i)`` (``edge_index[:, e] = (j, i)``, source j, target i):

    * message ``m_e = TP(Linear(x)_j, Y(r_e), w_e)``, a ``"uvu"`` :class:`SparseTensorProduct` of the source's
      features with the spherical harmonics of the edge vector, weighted per edge by
      ``w_e = MLP([Bessel(|r_e|), pair invariants_e]) * cutoff(|r_e|)`` (weights vanish smoothly at the cutoff);
    * aggregate ``a_i = sum_e m_e / sqrt(avg_num_neighbors)`` over the pairs that end at i (the messages are
      computed and summed component-major, ``ir_mul``);
    * update ``y_i = Gate(Linear([a_i, x_i]))`` (+ ``x_i`` when ``irreps_in == irreps_out``), then an
      :class:`EquivariantLayerNorm`; the linear map reads the sums component-major as they are (``x_i`` is
      converted to that layout) and only its output is put in e3nn's order.

    The pair invariants (:class:`~metaham.nn.pair_gate.PairInvariants` of a ``pair_channels``-wide linear
    projection of the input features) feed the edge MLP with or without a pair gate. With ``pair_sparsity``
    set, a :class:`SparsePairGate` first keeps each graph's top pairs and gates their invariants; dropped
    pairs get no spherical harmonics, no weights and no message, so the edge work falls with the kept
    fraction. Pairs shorter than ``pair_keep_radius`` (bonded neighbours) are exempt from the gate: always kept.

    Args:
        irreps_in: node feature irreps of the input.
        irreps_out: node feature irreps of the output (scalars listed first).
        lmax_sh: highest degree of the edge spherical harmonics.
        num_basis: number of Bessel radial basis functions.
        cutoff: radius where messages vanish (same length unit as ``edge_vec``).
        radial_hidden: width of the edge MLP's hidden layer.
        pair_channels: channels per irrep type of the projection the pair invariants are computed from.
        tp_sparsity: sparsity of the tensor-product gate (0: dense).
        pair_sparsity: sparsity of the pair gate; None: no pair gate.
        pair_per_graph: the pair gate's quantile per graph (True) or over the whole batch (False).
        pair_keep_radius: pairs closer than this are never dropped by the pair gate (0: none exempt).
        tp_per_output: the tensor-product gate keeps its share of the paths into each output irrep
            (:class:`SparseTensorProduct`'s ``per_output``) instead of a share of all paths.
        avg_num_neighbors: normalisation of the aggregated messages.
        layer_norm: apply an equivariant layer norm at the end.
        sh_axes: ``"e3nn"`` or ``"pyscf"``, see :func:`~metaham.nn.sh.spherical_harmonics`.

    ``forward(x (N, irreps_in.dim), edge_vec (E, 3), edge_index (2, E), batch (N,) or None)`` ->
    ``(N, irreps_out.dim)``. ``edge_vec`` is the relative position of each pair (e.g. ``pos[i] - pos[j]``),
    never zero; ``batch`` maps nodes to graphs and matters only to a per-graph pair gate.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps | str,
        irreps_out: o3.Irreps | str,
        lmax_sh: int = 2,
        num_basis: int = 8,
        cutoff: float = 5.0,
        radial_hidden: int = 32,
        pair_channels: int = 8,
        tp_sparsity: float = 0.0,
        pair_sparsity: float | None = None,
        pair_per_graph: bool = True,
        pair_keep_radius: float = 0.0,
        tp_per_output: bool = False,
        avg_num_neighbors: float = 10.0,
        layer_norm: bool = True,
        sh_axes: str = "e3nn",
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.irreps_sh = sh_irreps(lmax_sh)
        self.lmax_sh = int(lmax_sh)
        self.cutoff = float(cutoff)
        if not (math.isfinite(avg_num_neighbors) and avg_num_neighbors > 0):
            raise ValueError(f"avg_num_neighbors must be a finite number > 0, got {avg_num_neighbors!r}")
        self.norm_factor = 1.0 / math.sqrt(avg_num_neighbors)
        if sh_axes not in ("e3nn", "pyscf"):
            raise ValueError(f"sh_axes must be 'e3nn' or 'pyscf', got {sh_axes!r}")
        self.sh_axes = sh_axes

        self.gate = GatedNonlinearity(self.irreps_out)
        irreps_mid, instructions = _message_irreps(self.irreps_in, self.irreps_sh, self.gate.irreps_in)
        self.tp = SparseTensorProduct(
            self.irreps_in, self.irreps_sh, irreps_mid, mode="uvu", sparsity=tp_sparsity, instructions=instructions,
            per_output=tp_per_output, out_layout="ir_mul",
        )
        self.radial = BesselBasis(num_basis, cutoff)
        if int(pair_channels) != pair_channels or pair_channels < 1:
            raise ValueError(f"pair_channels must be an integer >= 1, got {pair_channels!r}")
        # Invariants of a narrow projection: scoring every pair on the full features would cost as much as
        # a message and eat the pair gate's saving.
        self.irreps_pair = o3.Irreps([(int(pair_channels), ir) for ir in sorted({ir for _, ir in self.irreps_in})])
        # One linear map gives both the features that the messages carry and the narrow pair features.
        self.pre = EquivariantLinear(self.irreps_in, self.irreps_in + self.irreps_pair)
        self._pre_sizes = [self.irreps_in.dim, self.irreps_pair.dim]
        if pair_sparsity is None:
            check_keep_radius(pair_keep_radius)  # unused without a gate, but a bad value is still an error
            self.pair_gate, self.pair_invariants = None, PairInvariants(self.irreps_pair)
        else:
            self.pair_gate = SparsePairGate(self.irreps_pair, pair_sparsity, pair_per_graph, pair_keep_radius)
            self.pair_invariants = None
        self.edge_mlp = nn.Sequential(
            nn.Linear(num_basis + self.irreps_pair.num_irreps, radial_hidden),  # one invariant per channel
            nn.SiLU(),
            nn.Linear(radial_hidden, self.tp.weight_numel),
        )
        # The update reads and writes component-major rows, the layout the summed messages come in: the node
        # features (narrower) and the update's output (narrower) are converted instead of the messages.
        self.update = EquivariantLinear(irreps_mid + self.irreps_in, self.gate.irreps_in, layout="ir_mul")
        self._in_blocks, self._gate_blocks = blocks(self.irreps_in), blocks(self.gate.irreps_in)
        self.residual = self.irreps_in == self.irreps_out
        self.norm = EquivariantLayerNorm(self.irreps_out) if layer_norm else None

    def forward(
        self, x: torch.Tensor, edge_vec: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Node features ``(N, irreps_in.dim)`` -> ``(N, irreps_out.dim)``; see the class docstring."""
        features, pair_features = self.pre(x).split(self._pre_sizes, dim=-1)
        length = torch.linalg.vector_norm(edge_vec, dim=-1)
        if self.pair_gate is not None:
            kept = self.pair_gate(pair_features, edge_index, batch, length)
            edge_index = edge_index.index_select(1, kept.index)
            edge_vec, length = edge_vec.index_select(0, kept.index), length.index_select(0, kept.index)
            invariants = kept.invariants
        else:
            invariants = self.pair_invariants(pair_features, edge_index)
        hidden = self.edge_mlp[:-1](torch.cat([self.radial(length), invariants], dim=-1))
        # In the fixed phase only the kept paths' weights are computed.
        edge_weight = linear_columns(self.edge_mlp[-1], hidden, self.tp.weight_columns)
        # The message normalisation rides on the (linear) per-edge weights: one multiplication fewer.
        edge_weight = edge_weight * (polynomial_cutoff(length, self.cutoff) * self.norm_factor).unsqueeze(-1)
        sh = spherical_harmonics(self.lmax_sh, edge_vec, self.sh_axes)
        messages = self.tp(features.index_select(0, edge_index[0]), sh, edge_weight)
        # Messages come component-major (ir_mul, the product's fast layout) and are summed per node.
        aggregated = messages.new_zeros(x.shape[0], messages.shape[1]).index_add(0, edge_index[1], messages)
        mixed = self.update(torch.cat([aggregated, ir_mul_from_mul_ir(x, self._in_blocks)], dim=-1))
        out = self.gate(mul_ir_from_ir_mul(mixed, self._gate_blocks))
        if self.residual:
            out = out + x
        return self.norm(out) if self.norm is not None else out


def _message_irreps(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, wanted: o3.Irreps):
    """Message irreps for a ``uvu`` product and its instructions: one block ``mul x ir`` per multiplicity and
    reachable irrep of ``wanted``, fed by every (input block, spherical-harmonic degree) pair that reaches it.

    Paths into the same irrep share one block (their sum, normalised by e3nn's path count): the per-edge
    weights already weigh every path per channel, and separate blocks would triple the messages that are
    aggregated and the width of the update layer.
    """
    targets = {ir for _, ir in wanted}
    blocks: dict[tuple[int, o3.Irrep], int] = {}
    instructions = []
    for i1, (mul, ir1) in enumerate(irreps_in):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir_out in sorted(ir for ir in ir1 * ir2 if ir in targets):
                io = blocks.setdefault((mul, ir_out), len(blocks))
                instructions.append((i1, i2, io))
    if not blocks:
        raise ValueError(f"no message path: {irreps_in} x {irreps_sh} reaches none of {wanted}")
    return o3.Irreps(list(blocks)), instructions
