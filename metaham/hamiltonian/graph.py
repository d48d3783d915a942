"""Particle graphs: which particles interact, as a fixed edge list.

An ``edge_index`` is a ``(2, E)`` long tensor of directed edges ``source -> target``; every interacting pair
appears in both directions, so a message passed along every edge reaches both particles. It is built once
per system, outside any ``torch.func`` transform (building a graph needs Python loops and checks that a
transform cannot trace), and then passed unchanged to every forward call: indexing with a fixed index tensor
is fine under ``grad`` and ``vmap``.

>>> edge_index(3)                     # all pairs of 3 particles, both directions
tensor([[0, 1, 0, 2, 1, 2],
        [1, 0, 2, 0, 2, 1]])
>>> edge_index(1).shape               # one particle: no edges
torch.Size([2, 0])
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def edge_index(
    n_particles: int, pairs: Iterable[tuple[int, int]] | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Directed edges for ``n_particles`` particles, shape ``(2, E)`` (``E`` = twice the number of pairs).

    Args:
        n_particles: number of particles (nodes), >= 1.
        pairs: undirected interacting pairs ``(i, j)``; default: all pairs ``i < j``.
        device: where the tensor lives (put it on the device of the data).

    Raises:
        ValueError: naming the first pair that is out of range, a self-loop or a duplicate.
    """
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 1:
        raise ValueError(f"n_particles must be an integer >= 1, got {n_particles!r}")
    if pairs is None:
        pairs = [(i, j) for i in range(n_particles) for j in range(i + 1, n_particles)]
    seen: set[frozenset[int]] = set()
    directed: list[tuple[int, int]] = []
    for pair in pairs:
        i, j = (int(v) for v in pair)
        if not (0 <= i < n_particles and 0 <= j < n_particles):
            raise ValueError(f"edge {pair}: particle index out of range for {n_particles} particles")
        if i == j:
            raise ValueError(f"edge {pair}: a particle cannot interact with itself")
        key = frozenset((i, j))
        if key in seen:
            raise ValueError(f"edge {pair}: listed twice")
        seen.add(key)
        directed += [(i, j), (j, i)]
    if not directed:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    return torch.tensor(directed, dtype=torch.long, device=device).T.contiguous()


def system_edge_index(system, device: torch.device | str | None = None) -> Tensor:
    """The edge index of a :class:`systems.System` from its ``n_particles`` and ``edges()``."""
    return edge_index(system.n_particles, system.edges(), device=device)


def relative(x: Tensor, edges: Tensor) -> Tensor:
    """Per-edge differences ``x[target] - x[source]``: ``(..., n, d)`` -> ``(..., E, d)``."""
    return x[..., edges[1], :] - x[..., edges[0], :]


def sum_at_targets(messages: Tensor, edges: Tensor, n_nodes: int) -> Tensor:
    """Sum the messages of the edges that end at each node: ``(..., E, d)`` -> ``(..., n_nodes, d)``."""
    shape = messages.shape[:-2] + (n_nodes, messages.shape[-1])
    # Out-of-place index_add: it has batching and double-backward rules, an in-place scatter does not
    # under vmap.
    return messages.new_zeros(shape).index_add(-2, edges[1], messages)
