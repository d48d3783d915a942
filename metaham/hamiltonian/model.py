"""``HamiltonianGNN``: a graph network that outputs a scalar Hamiltonian, and its symplectic vector field.

H(q, p) = sum_i E_node(h_i) + sum_(j->i) E_edge(e_ij), with ``(h, e)`` the node and edge features of a
backbone (see :mod:`metaham.hamiltonian.backbones`) and ``E_node``, ``E_edge`` small mish MLPs (the
*read-out*, parameter prefix ``readout.``, which is what ANIL adapts). Their last linear layers have no bias:
a constant added to H changes no trajectory, so a vector-field loss could never train it (and a parameter
that gets no gradient breaks ``autograd.grad`` and wastes an optimizer slot).

The vector field (dq/dt, dp/dt) = (dH/dp, -dH/dq) is taken with ``torch.func.grad``, not
``torch.autograd.grad``: the latter cannot run inside ``torch.func`` transforms, and MAML differentiates
this gradient again (second order) and maps it over tasks (``vmap``). Written this way the same call works in
a plain autograd loop, under ``torch.func.grad`` and under ``vmap``.

>>> import torch
>>> from metaham.hamiltonian import HamiltonianGNN, edge_index
>>> model = HamiltonianGNN(backbone="gcn", hidden=16, layers=1)
>>> q, p = torch.randn(8, 3, 2), torch.randn(8, 3, 2)      # 8 states of 3 particles in 2-D
>>> graph = edge_index(3)                                   # all pairs interact
>>> model(q, p, graph).shape                                # one H per state
torch.Size([8])
>>> dq_dt, dp_dt = model.vector_field(q, p, graph)          # each (8, 3, 2)
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._layers import mish_mlp
from .backbones import build_backbone, current_name

DIM = 2


class HamiltonianGNN(nn.Module):
    """Learned Hamiltonian of ``n`` interacting particles in 2-D (any ``n``, any edge list).

    Args:
        backbone: registered backbone name (``metaham.hamiltonian.backbone_names()``); the default
            ``equivariant`` is E(3)-invariant up to its symmetry-breaking inputs, ``gcn`` is the
            paper's (non-invariant) graph network and about 3x faster per MAML step (measured on single particles).
        hidden: feature width of the backbone and the read-out.
        layers: message-passing rounds of the backbone.
        **backbone_options: passed on to the backbone's constructor.

    ``config`` holds the constructor arguments (plain values), so ``HamiltonianGNN(**model.config)`` rebuilds
    the architecture for a checkpoint.
    """

    def __init__(
        self, backbone: str = "equivariant", hidden: int = 64, layers: int = 2, **backbone_options
    ) -> None:
        super().__init__()
        backbone = current_name(backbone)
        self.config = {"backbone": backbone, "hidden": hidden, "layers": layers, **backbone_options}
        self.backbone = build_backbone(backbone, hidden=hidden, layers=layers, **backbone_options)
        self.readout = nn.ModuleDict(
            {
                "node": mish_mlp(hidden, hidden, 1, out_bias=False),
                "edge": mish_mlp(hidden, hidden, 1, out_bias=False),
            }
        )

    def forward(self, q: Tensor, p: Tensor, edge_index: Tensor) -> Tensor:
        """H for each state: ``q, p`` ``(..., n, 2)``, ``edge_index`` ``(2, E)`` -> ``(...)``."""
        _check_inputs(q, p, edge_index)
        node, edge = self.backbone(q, p, edge_index)
        energy = self.readout["node"](node).squeeze(-1).sum(-1)
        if edge is not None:
            energy = energy + self.readout["edge"](edge).squeeze(-1).sum(-1)
        return energy

    def vector_field(
        self, q: Tensor, p: Tensor, edge_index: Tensor, params: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(dq/dt, dp/dt) = (dH/dp, -dH/dq), each shaped like ``q`` ``(..., n, 2)``.

        ``params`` (a dict name -> tensor, e.g. MAML's adapted weights) replaces the module's own parameters
        for this call, through ``torch.func.functional_call``; missing names keep the module's values.
        """

        def total_energy(q_: Tensor, p_: Tensor) -> Tensor:
            # States are independent, so the gradient of the summed H is the per-state gradient.
            if params is None:
                return self(q_, p_, edge_index).sum()
            return functional_call(self, dict(params), (q_, p_, edge_index)).sum()

        dh_dq, dh_dp = torch.func.grad(total_energy, argnums=(0, 1))(q, p)
        return dh_dp, -dh_dq


def _check_inputs(q: Tensor, p: Tensor, edge_index: Tensor) -> None:
    # Shape checks only: they are static, so they also run inside grad/vmap (values cannot be read there).
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    if q.ndim < 2 or q.shape[-1] != DIM:
        raise ValueError(f"q and p must have shape (..., n_particles, {DIM}), got {tuple(q.shape)}")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.long:
        raise ValueError(
            f"edge_index must be a (2, E) long tensor (see metaham.hamiltonian.edge_index), "
            f"got shape {tuple(edge_index.shape)} and dtype {edge_index.dtype}"
        )
