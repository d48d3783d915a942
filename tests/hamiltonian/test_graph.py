"""Particle graphs: both directions of every pair, checked pair lists, and the per-edge helpers."""
import pytest
import torch

from metaham.hamiltonian import edge_index, system_edge_index
from metaham.hamiltonian.graph import relative, sum_at_targets


def test_all_pairs_both_directions():
    edges = edge_index(3)
    assert edges.dtype == torch.long and edges.shape == (2, 6)
    assert {tuple(e) for e in edges.T.tolist()} == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)}
    assert edge_index(1).shape == (2, 0)
    assert {tuple(e) for e in edge_index(4, [(0, 1), (2, 3)]).T.tolist()} == {(0, 1), (1, 0), (2, 3), (3, 2)}


@pytest.mark.parametrize(
    "n, pairs, message",
    [(3, [(0, 3)], "out of range"), (3, [(1, 1)], "itself"), (3, [(0, 1), (1, 0)], "twice"), (0, None, ">= 1")],
)
def test_bad_pairs_are_named(n, pairs, message):
    with pytest.raises(ValueError, match=message):
        edge_index(n, pairs)


def test_system_edges_follow_the_system():
    class Chain:
        n_particles = 3

        def edges(self):
            return [(0, 1), (1, 2)]

    assert system_edge_index(Chain()).shape == (2, 4)


def test_relative_and_sum_at_targets():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    edges = edge_index(3)
    rel = relative(x, edges)
    for k, (j, i) in enumerate(edges.T.tolist()):
        assert torch.equal(rel[k], x[i] - x[j])
    # Summing each node's incoming relative vectors gives n * x_i - sum_j x_j.
    expected = 3 * x - x.sum(0)
    torch.testing.assert_close(sum_at_targets(rel, edges, 3), expected)
