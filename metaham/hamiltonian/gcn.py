"""``gcn``: the reference graph-convolution backbone (the paper's graph network with mish activations).

The Song and Jeong (ICLR 2024) model: one node per particle holding that particle's (q, p), a graph network
with sum aggregation and mish. We write it as an interaction network (Battaglia et al. 2016; the form
Sanchez-Gonzalez et al. 2019 use for Hamiltonian graph networks), with residual updates:

* node input ``[q_i, p_i]`` (4 numbers: the absolute state, so external fields such as pendulum gravity or the
  Henon-Heiles potential are representable; the price is that this backbone is not translation or rotation
  invariant, which the ``equivariant`` backbone is);
* edge input for ``j -> i``: ``[q_i - q_j, p_i - p_j, |q_i - q_j|]`` (5 numbers; the distance makes central
  forces such as gravity easy to express);
* each layer: edge update ``e_ij += MLP_e([h_j, h_i, e_ij])``, then node update
  ``h_i += MLP_h([h_i, sum_j e_ij])``; every MLP is ``Linear -> mish -> Linear``.

A single particle (``E == 0``) skips the edge path, so the same weights serve 1-particle systems (their node
update sees a zero aggregate) and interacting ones.

Shapes: ``q, p`` ``(..., n, 2)``, ``edge_index`` ``(2, E)`` -> node features ``(..., n, hidden)`` and edge
features ``(..., E, hidden)`` (``None`` when ``E == 0``). No irreps: the inputs are raw Cartesian numbers and
the features plain (non-equivariant) vectors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._layers import mish_mlp
from .backbones import register_backbone
from .graph import relative, sum_at_targets

_NODE_IN = 4  # [q_x, q_y, p_x, p_y]
_EDGE_IN = 5  # [dq_x, dq_y, dp_x, dp_y, |dq|]


@register_backbone("gcn")
class GCN(nn.Module):
    """Interaction-network backbone with mish; ``layers`` message-passing rounds of width ``hidden``."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        if hidden < 1 or layers < 0:
            raise ValueError(f"gcn backbone: need hidden >= 1 and layers >= 0, got hidden={hidden}, layers={layers}")
        self.hidden = hidden
        self.node_encoder = mish_mlp(_NODE_IN, hidden, hidden)
        self.edge_encoder = mish_mlp(_EDGE_IN, hidden, hidden)
        self.edge_updates = nn.ModuleList(mish_mlp(3 * hidden, hidden, hidden) for _ in range(layers))
        self.node_updates = nn.ModuleList(mish_mlp(2 * hidden, hidden, hidden) for _ in range(layers))

    def forward(self, q: Tensor, p: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor | None]:
        n = q.shape[-2]
        h = self.node_encoder(torch.cat([q, p], dim=-1))
        if edge_index.shape[1] == 0:
            e = None
            aggregate = torch.zeros_like(h)
        else:
            dq, dp = relative(q, edge_index), relative(p, edge_index)
            distance = torch.linalg.vector_norm(dq, dim=-1, keepdim=True)
            e = self.edge_encoder(torch.cat([dq, dp, distance], dim=-1))
        for edge_update, node_update in zip(self.edge_updates, self.node_updates):
            if e is not None:
                e = e + edge_update(torch.cat([h[..., edge_index[0], :], h[..., edge_index[1], :], e], dim=-1))
                aggregate = sum_at_targets(e, edge_index, n)
            h = h + node_update(torch.cat([h, aggregate], dim=-1))
        return h, e
