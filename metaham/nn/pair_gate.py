"""Sparse pair gate: keep the most important pairs (edges) of each graph, drop the rest before any message.

Each pair ``(i, j)`` is scored from rotation invariants of its two endpoint features (see
:class:`PairInvariants`) by a learnable linear map. In each graph (or, optionally, over the whole batch) the
pairs whose score is at or above the sparsity-quantile are kept: the quantile of a graph with ``E_g`` pairs
is its ``k_g``-th largest score, ``k_g = max(1, round((1 - sparsity) * E_g))``, so a graph keeps ``k_g``
pairs (more only on exact ties: every pair whose score equals the quantile is kept). A pair listed in both
directions (i, j) and (j, i) is scored once, so its two directions hold the very same score -- equal bit for
bit, not only to rounding -- and are kept or dropped together (a matrix product may round two equal rows
differently, which would split a pair at the quantile). The kept pairs' invariants are multiplied by
``sigmoid(score - quantile)`` (>= 0.5, differentiable), which is how the scorer learns; dropped pairs return
nothing, so the caller computes no message for them.

Optionally the pairs shorter than ``keep_radius`` (e.g. a bond length) are exempt: they are kept with their
invariants unscaled, and the quantile and ``k_g`` are taken over each graph's other pairs only.
On small molecules a plain quantile keeps so few pairs that atoms lose their bonded neighbours; exempting
the short pairs leaves the gate to prune what it is meant for, the many weak long-range pairs.

Data-dependent output sizes: the gate works eagerly and under ``functional_call`` / ``grad``, not under
``vmap``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from e3nn import o3
from torch import nn

from .sparse_tp import check_sparsity, n_kept


class PairInvariants(nn.Module):
    """Rotation- and reflection-invariant, symmetric features of each pair of nodes.

    For every block ``mul x ir`` of ``irreps``: for ``0e`` the mean of the two endpoints' scalars; for every
    other irrep the per-channel inner product ``<x_i[u], x_j[u]> / (2l + 1)`` (invariant, even parity).
    Computed as ``(x_i * x_j) @ P + (x_i + x_j) @ S`` with constant matrices ``P``, ``S``: a fixed number of
    passes over the pairs whatever the number of blocks (``x S`` is taken per node, before the gather).

    ``forward(x (N, irreps.dim), edge_index (2, E)) -> (E, n_invariants)``, ``n_invariants`` = the total
    multiplicity of ``irreps`` (one number per channel).
    """

    def __init__(self, irreps: o3.Irreps | str) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.n_invariants = sum(mul for mul, _ in self.irreps)
        products = torch.zeros(self.irreps.dim, self.n_invariants)
        sums = torch.zeros(self.irreps.dim, self.n_invariants)
        row = column = 0
        for mul, ir in self.irreps:
            for _ in range(mul):
                if ir == o3.Irrep("0e"):
                    sums[row, column] = 0.5
                else:
                    products[row : row + ir.dim, column] = 1.0 / ir.dim
                row += ir.dim
                column += 1
        self.register_buffer("products", products, persistent=False)
        self.register_buffer("sums", sums, persistent=False)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``(N, irreps.dim)`` node features, ``(2, E)`` pairs -> ``(E, n_invariants)``."""
        if x.shape[-1] != self.products.shape[0]:
            raise ValueError(f"x must have last dimension {self.irreps.dim} for {self.irreps}, got {tuple(x.shape)}")
        src, dst = x.index_select(0, edge_index[0]), x.index_select(0, edge_index[1])
        # The scalar half (x_i + x_j) S = x_i S + x_j S (bit for bit: S holds 0.5 and zeros) per node, then
        # gathered: a product over the nodes and two narrow gathers instead of a full-width sum over the pairs.
        half = x @ self.sums.to(x.dtype)
        half_sum = half.index_select(0, edge_index[0]) + half.index_select(0, edge_index[1])
        return (src * dst) @ self.products.to(x.dtype) + half_sum

    def extra_repr(self) -> str:
        return f"{self.irreps} -> {self.n_invariants}x0e"


class PairSelection(NamedTuple):
    """What :class:`SparsePairGate` returns."""

    index: torch.Tensor  #: ``(K,)`` indices of the kept pairs into the input ``edge_index``, ascending
    invariants: torch.Tensor  #: ``(K, n_invariants)`` kept pairs' invariants times sigmoid(score - quantile)
    score: torch.Tensor  #: ``(E,)`` scores of all pairs
    threshold: torch.Tensor  #: ``(E,)`` the quantile each pair was compared with


class SparsePairGate(nn.Module):
    """Scores pairs from endpoint invariants and keeps those at or above the per-graph sparsity-quantile.

    Args:
        irreps_node: irreps of the node features.
        sparsity: fraction of pairs dropped in each graph, in [0, 1).
        per_graph: True (default): a quantile per graph, so every graph of a batch keeps its share of its own
            pairs; False: one quantile over all pairs of the batch.
        keep_radius: pairs shorter than this are exempt (0: none); ``forward`` then needs their lengths.

    ``forward(x (N, irreps_node.dim), edge_index (2, E), batch (N,) or None, length (E,) or None,
    invariants (E, n_invariants) or None) -> PairSelection``; ``batch`` maps nodes to graphs (PyG convention;
    None: one graph); ``invariants``: ``self.invariants(x, edge_index)`` when the caller has computed them
    already (they are not computed twice). A pair belongs to its source node's graph. Pairs shorter than
    ``keep_radius`` are kept ungated and take no part in the quantile (their ``threshold`` entry is ``-inf``).
    """

    def __init__(
        self, irreps_node: o3.Irreps | str, sparsity: float, per_graph: bool = True, keep_radius: float = 0.0
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.sparsity = check_sparsity(sparsity, "pair sparsity")
        self.per_graph = bool(per_graph)
        self.keep_radius = check_keep_radius(keep_radius)
        self.invariants = PairInvariants(self.irreps_node)
        self.n_invariants = self.invariants.n_invariants
        self.scorer = nn.Linear(self.n_invariants, 1)

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        batch: torch.Tensor | None = None,
        length: torch.Tensor | None = None,
        invariants: torch.Tensor | None = None,
    ) -> PairSelection:
        # One invariant row and one score per unordered pair, shared by its two directions (see the module doc).
        pair, first = _unordered_pairs(edge_index, x.shape[0])
        if invariants is None:
            invariants = self.invariants(x, edge_index.index_select(1, first))
        elif invariants.shape != (edge_index.shape[1], self.n_invariants):
            raise ValueError(
                f"invariants must have shape ({edge_index.shape[1]}, {self.n_invariants}), "
                f"got {tuple(invariants.shape)}"
            )
        else:  # the caller's rows (one per column of edge_index), e.g. a head that also reads them itself
            invariants = invariants.index_select(0, first)
        score = self.scorer(invariants).squeeze(-1).index_select(0, pair)
        if batch is None or not self.per_graph:
            graph = torch.zeros_like(edge_index[0])
        else:
            graph = batch.index_select(0, edge_index[0])
        if self.keep_radius == 0:
            threshold = _segment_quantile(score, graph, self.sparsity)
        else:
            if length is None:
                raise ValueError(f"this pair gate exempts pairs shorter than {self.keep_radius}: pass their lengths")
            # Exempt pairs pass any threshold; the others compete among themselves only. One length per unordered
            # pair too, so that both directions are exempt or neither, even at a length within rounding of the radius.
            length = length.index_select(0, first).index_select(0, pair)
            free = torch.nonzero(length >= self.keep_radius).flatten()
            threshold = torch.full_like(score, -torch.inf).index_put(
                (free,), _segment_quantile(score.index_select(0, free), graph.index_select(0, free), self.sparsity)
            )
        index = torch.nonzero(score >= threshold).flatten()
        factor = torch.sigmoid(score.index_select(0, index) - threshold.index_select(0, index))  # 1 when exempt
        # Straight from the unordered pairs' rows to the kept columns: no all-pairs copy (and none in backward).
        kept_invariants = invariants.index_select(0, pair.index_select(0, index))
        return PairSelection(index, kept_invariants * factor.unsqueeze(-1), score, threshold)

    def extra_repr(self) -> str:
        return f"{self.irreps_node}, sparsity={self.sparsity}, per_graph={self.per_graph}, keep_radius={self.keep_radius}"


def check_keep_radius(radius: float, what: str = "pair_keep_radius") -> float:
    """``radius`` as a float >= 0, or a ValueError naming ``what`` and the value."""
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {radius!r}")
    return float(radius)


def _unordered_pairs(edge_index: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair (E,), first (P,))``: the index of each column's unordered pair ``{i, j}`` among the ``P``
    distinct ones, and for each distinct pair the first column that holds it."""
    src, dst = edge_index[0], edge_index[1]
    key = torch.minimum(src, dst) * n_nodes + torch.maximum(src, dst)
    distinct, pair = torch.unique(key, return_inverse=True)
    columns = torch.arange(key.numel(), device=key.device)
    first = torch.full_like(distinct, key.numel()).scatter_reduce(0, pair, columns, "amin")
    return pair, first


def _segment_quantile(score: torch.Tensor, segment: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-element threshold: the ``k``-th largest score of its segment, ``k = max(1, round((1-s) E_seg))``.

    Vectorised over segments: the scores go into a ``(segments, longest segment)`` table padded with ``-inf``,
    and one ``topk`` along its rows gives every segment's ``k``-th largest value. The threshold is a value, so
    how ties are ordered does not matter, and it stays differentiable: its gradient reaches the score it copies.
    """
    if score.numel() == 0:
        return score
    counts = torch.bincount(segment)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(segment)
    grouped = segment.index_select(0, order)
    column = torch.arange(segment.numel(), device=segment.device) - starts.index_select(0, grouped)
    table = score.new_full((counts.numel(), int(counts.max())), -torch.inf)
    table = table.index_put((grouped, column), score.index_select(0, order))
    # The same rounding rule as the tensor-product gate (Python's round), on the few per-segment counts.
    keep = torch.tensor([n_kept(sparsity, c) for c in counts.tolist()], dtype=torch.long, device=score.device)
    largest = table.topk(int(keep.max()), dim=1).values
    # Empty segments (graphs with no pair) read column 0 of a row of -inf; nothing reads their threshold.
    per_segment = largest.gather(1, (keep - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return per_segment.index_select(0, segment)
