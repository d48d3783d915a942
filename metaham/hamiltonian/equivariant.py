"""``equivariant`` (formerly ``sparse_equivariant``): an E(3)-equivariant backbone on the layers of :mod:`metaham.nn`.

The 2-D states are embedded in 3-D as ``(x, y, 0)``; e3nn's ``1o`` is plain Cartesian ``(x, y, z)`` with
``D(R) = R`` (see :mod:`metaham.nn.sh`), so the embedded vectors are ``1o`` features as they are. A rotation
of the plane is a rotation about z, one of the 3-D rotations the layers commute with.

Per particle ``i`` the *node vectors* are

* ``p_i`` (a polar vector, ``1o``), always;
* with ``external_field=True`` also the absolute position ``q_i`` and ``directions`` learned global vectors
  ``d_1..d_k`` (3-D, shared by all particles and states). These are the symmetry-breaking inputs: a fixed
  direction is what pendulum gravity (``V ~ -g . q``) and the 3-fold Henon-Heiles cubic (which needs a
  reference angle) require, and ``q_i`` itself is what any external potential of a single particle depends
  on (a single particle has no edges, so without it H could depend only on ``|p|^2``). A learned origin is
  not needed: ``|q - o|^2 = |q|^2 - 2 o . q + const`` and ``o . q`` is already a ``d . q`` input.

Network (irreps ``H = {hidden}x0e + {vectors}x1o``):

* **node embedding**: the Gram matrix of the node vectors (every dot product ``v_a . v_b``, ``a <= b``) is a
  complete set of rotation/reflection invariants of those vectors; a mish MLP maps it to ``hidden x 0e``,
  and an equivariant linear map mixes the node vectors into ``vectors x 1o``. The Gram invariants matter for
  a single particle: with no edges the interaction blocks below only mix channels, and no linear map or gate
  turns vectors into scalars.
* ``layers`` x :class:`~metaham.nn.InteractionBlock` ``(H -> H)``: messages ``TP(x_j, Y(q_i - q_j))`` from
  relative positions only (translation invariant), SiLU/sigmoid gates, residual; no layer norm (it would
  bound the features and hence H, while physical energies grow like ``|p|^2`` and ``|q|^2``). The radial basis
  is Bessel with a large cutoff (``cutoff``, default 10) so that gravitational pairs at any sampled distance
  interact.
* **edge features** for ``j -> i``: a mish MLP of ``[s_i, s_j, Gaussian(r), r, 1/r]`` (``s`` the node
  features returned, ``r = |q_i - q_j|``): no cutoff here, and ``1/r`` makes the n-body
  ``-G m_i m_j / r`` easy to express (it is singular at ``r = 0`` exactly like the physics).

Output: node features ``(..., n, hidden)`` = the ``0e`` part of the last block plus a linear map of the
squared norms of its ``1o`` channels, edge features
``(..., E, hidden)`` (``None`` when ``E == 0``), both invariant. Hence with ``external_field=False`` H is
exactly invariant under rotations and reflections of the embedded vectors and translations of ``q``; with
``external_field=True`` it is invariant when ``d`` is rotated along with the inputs (both tested).

Sparsity, and the name: until 2026-12-08 this backbone was called ``sparse_equivariant`` (still accepted), but
its gates are off. ``tp_sparsity`` (default 0, dense) is the tensor-product gate of the blocks: these models
are tiny (a few paths, a few particles), and there dense products are at least as fast as sparse ones. With
``tp_sparsity > 0`` drive the phases with :class:`~metaham.nn.SparsityScheduler` (``metaham meta-train``
does, from ``train.sparsity``); in the random phase a ``vmap`` needs ``randomness="same"`` (MAML's and the
pre-trained baseline's have it), and evaluation mode (``model.eval()``) uses the kept paths instead of a draw.
The pair gate is not offered at all, whatever the number of particles: it keeps the pairs whose learned score
passes a quantile, so the kept set changes with the state, H jumps where a pair enters or leaves it and the
vector field dH/dq is undefined there. A Hamiltonian must be smooth; a Hamiltonian *matrix* (QH9) need not be.

Shapes: ``q, p`` ``(..., n, 2)``, ``edge_index`` ``(2, E)``; any leading axes (they are flattened into one
graph batch internally), works under ``torch.func.grad`` (any order) and ``vmap``. All activations are smooth
(mish, SiLU, sigmoid): MAML through an HNN takes third derivatives.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor, nn

from metaham.nn import EquivariantLinear, InteractionBlock

from ._layers import mish_mlp
from .backbones import register_backbone
from .graph import relative

_EDGE_DISTANCE_FEATURES = 2  # r and 1/r, next to the Gaussian basis of r


@register_backbone("equivariant")
class Equivariant(nn.Module):
    """Equivariant message passing on 2-D states embedded in 3-D; see the module docstring.

    Args:
        hidden: number of ``0e`` channels (the width of the returned node and edge features).
        layers: number of :class:`~metaham.nn.InteractionBlock` rounds (>= 0).
        vectors: number of ``1o`` channels (default ``max(1, hidden // 4)``).
        external_field: feed the absolute position and learned global directions (symmetry breaking).
        directions: number of learned global direction vectors (default 2 with an external field; must be 0
            or None without one).
        lmax_sh: highest degree of the edge spherical harmonics.
        num_basis: number of Bessel (blocks) and Gaussian (edge features) radial functions.
        cutoff: radius of the blocks' Bessel basis and of the Gaussian centres' range.
        tp_sparsity: sparsity of the blocks' tensor-product gate (0: dense).
    """

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 2,
        vectors: int | None = None,
        external_field: bool = True,
        directions: int | None = None,
        lmax_sh: int = 1,
        num_basis: int = 8,
        cutoff: float = 10.0,
        tp_sparsity: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 0:
            raise ValueError(
                f"equivariant backbone: need hidden >= 1 and layers >= 0, got hidden={hidden}, layers={layers}"
            )
        vectors = max(1, hidden // 4) if vectors is None else vectors
        if vectors < 1:
            raise ValueError(f"equivariant backbone: vectors must be >= 1, got {vectors}")
        if directions is None:
            directions = 2 if external_field else 0
        if directions < 0 or (directions and not external_field):
            raise ValueError(
                f"equivariant backbone: directions={directions} needs external_field=True "
                "(learned directions break rotation invariance on purpose)"
            )
        if not (math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"equivariant backbone: cutoff must be a finite number > 0, got {cutoff!r}")
        self.hidden = hidden
        self.external_field = bool(external_field)
        self.irreps_hidden = o3.Irreps(f"{hidden}x0e + {vectors}x1o")
        n_vectors = 1 + (1 + directions if external_field else 0)  # p, then q and the directions
        self.register_buffer("_gram", torch.triu_indices(n_vectors, n_vectors), persistent=False)  # pairs a <= b
        # Learned global directions, initialised at unit-scale random 3-D vectors (in-plane and off-plane
        # parts: the model may use either).
        self.directions = nn.Parameter(torch.randn(directions, 3)) if directions else None
        self.scalar_embedding = mish_mlp(self._gram.shape[1], hidden, hidden)
        self.vector_embedding = EquivariantLinear(f"{n_vectors}x1o", f"{vectors}x1o")
        self.blocks = nn.ModuleList(
            InteractionBlock(
                self.irreps_hidden,
                self.irreps_hidden,
                lmax_sh=lmax_sh,
                num_basis=num_basis,
                cutoff=cutoff,
                tp_sparsity=tp_sparsity,
                avg_num_neighbors=2.0,  # few particles: 1-2 neighbours for the systems here
                layer_norm=False,
            )
            for _ in range(layers)
        )
        self.vector_norms = nn.Linear(vectors, hidden, bias=False)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_basis), persistent=False)
        self._width = cutoff / max(1, num_basis - 1)
        self.edge_encoder = mish_mlp(2 * hidden + num_basis + _EDGE_DISTANCE_FEATURES, hidden, hidden)

    def forward(self, q: Tensor, p: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor | None]:
        """``q, p`` ``(..., n, 2)`` -> node ``(..., n, hidden)``, edge ``(..., E, hidden)`` or ``None``."""
        return self._forward_3d(_embed(q), _embed(p), edge_index)

    def _forward_3d(self, q: Tensor, p: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor | None]:
        # The same on vectors already in 3-D, ``(..., n, 3)``: where the tests apply general 3-D rotations.
        batch_shape, n = q.shape[:-2], q.shape[-2]
        n_edges = edge_index.shape[1]
        flat = math.prod(batch_shape)
        q3 = q.reshape(flat * n, 3)
        p3 = p.reshape(flat * n, 3)
        vectors = [p3]
        if self.external_field:
            vectors.append(q3)
            if self.directions is not None:
                vectors += list(self.directions.unsqueeze(1).expand(-1, flat * n, -1).unbind(0))
        stacked = torch.stack(vectors, dim=1)  # (N, n_vectors, 3): e3nn's layout of n_vectors x 1o
        gram = (stacked[:, self._gram[0]] * stacked[:, self._gram[1]]).sum(-1)
        x = torch.cat([self.scalar_embedding(gram), self.vector_embedding(stacked.reshape(flat * n, -1))], dim=-1)

        # One graph per state: copies of edge_index shifted by n per state (shapes only, so vmap-safe). With no
        # pairs (one particle) the messages are empty, but each block's update still mixes and gates channels.
        offsets = torch.arange(flat, device=edge_index.device) * n
        graph = (edge_index.unsqueeze(1) + offsets.view(1, -1, 1)).reshape(2, flat * n_edges)
        edge_vec = relative(q3, graph)  # q_target - q_source, (flat * E, 3)
        for block in self.blocks:
            x = block(x, edge_vec, graph)

        scalars, vecs = x.split([self.hidden, x.shape[-1] - self.hidden], dim=-1)
        # The final vectors reach H through their squared norms (else the last block's 1o weights are dead).
        scalars = scalars + self.vector_norms(vecs.reshape(flat * n, -1, 3).pow(2).sum(-1))
        node = scalars.reshape(*batch_shape, n, self.hidden)
        if not n_edges:
            return node, None
        r = torch.linalg.vector_norm(edge_vec, dim=-1, keepdim=True)
        gauss = torch.exp(-((r - self.centres.to(r.dtype)) / self._width) ** 2)
        pair = torch.cat([scalars.index_select(0, graph[1]), scalars.index_select(0, graph[0]), gauss, r, 1 / r], -1)
        edge = self.edge_encoder(pair).reshape(*batch_shape, n_edges, self.hidden)
        return node, edge


def _embed(v: Tensor) -> Tensor:
    """2-D vectors ``(..., 2)`` -> 3-D ``(..., 3)`` as ``(x, y, 0)``: in-plane rotations become rotations about z."""
    return torch.cat([v, v.new_zeros(v.shape[:-1] + (1,))], dim=-1)
