"""Small smooth building blocks shared by the backbones and the energy read-out."""
from __future__ import annotations

from torch import nn


def mish_mlp(n_in: int, n_hidden: int, n_out: int, out_bias: bool = True) -> nn.Sequential:
    """``Linear -> mish -> Linear``: ``(..., n_in)`` -> ``(..., n_out)``.

    mish is smooth with non-zero derivatives of every order, which second-order MAML through a Hamiltonian
    network needs (the meta-gradient contains third derivatives of the network; ReLU's are zero).
    """
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Mish(), nn.Linear(n_hidden, n_out, bias=out_bias))
