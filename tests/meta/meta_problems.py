"""Small float64 problems shared by the meta-learning tests."""
import torch
from torch import nn
from torch.func import functional_call

from metaham.hamiltonian import HamiltonianGNN, edge_index
from metaham.meta import MetaTask


def linear_loss(model, params, data, graph):
    """Mean squared error of a linear model y = x . w (the closed-form case)."""
    x, y = data
    return (functional_call(model, params, (x,)).squeeze(-1) - y).pow(2).mean()


def make_linear_model():
    """A 4-input linear model without bias, float64."""
    return nn.Linear(4, 1, bias=False).double()


def linear_task(n_support=5, n_query=7, d=4):
    def points(k):
        x = torch.randn(k, d, dtype=torch.float64)
        return x, x @ torch.randn(d, dtype=torch.float64) + 0.1 * torch.randn(k, dtype=torch.float64)

    return MetaTask(points(n_support), points(n_query), None)


def tiny_hnn(**kw):
    return HamiltonianGNN(backbone="gcn", hidden=kw.pop("hidden", 8), layers=kw.pop("layers", 1)).double()


def hamiltonian_task(n_particles, k=5):
    """Random states with random vector-field targets: generic data, every derivative order matters."""

    def points():
        q, p = torch.randn(2, k, n_particles, 2, dtype=torch.float64)
        return q, p, torch.randn_like(q), torch.randn_like(p)

    return MetaTask(points(), points(), edge_index(n_particles))
