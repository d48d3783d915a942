"""Small smooth building blocks shared by the backbones and the energy read-out."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def mish(x: Tensor) -> Tensor:
    """mish(x) = x tanh(softplus(x)), elementwise, written so that derivatives of every order stay finite.

    ``torch.nn.functional.mish`` is fine to first order, but its second derivative is NaN once ``exp(x)``
    overflows (x > ~88 in float32, > ~709 in float64), and second-order MAML through a Hamiltonian network
    differentiates the activation three times: one large pre-activation (e.g. the invariant ``|p|^2`` of a
    fast particle) turned the whole meta-gradient into NaN. With ``u = sigmoid(-x)``, ``1 + e^x = 1 / u`` and
    so ``tanh(softplus(x)) = (1 - u^2) / (1 + u^2)``: every derivative is a polynomial in the bounded ``u``
    (sigmoid's derivatives are computed from its output) over a denominator in [1, 2].
    """
    u2 = torch.sigmoid(-x).square()
    return x * (1 - u2) / (1 + u2)


class Mish(nn.Module):
    """:func:`mish` as a module (no parameters: state-dict keys are those of ``torch.nn.Mish``)."""

    def forward(self, x: Tensor) -> Tensor:
        return mish(x)


def mish_mlp(n_in: int, n_hidden: int, n_out: int, out_bias: bool = True) -> nn.Sequential:
    """``Linear -> mish -> Linear``: ``(..., n_in)`` -> ``(..., n_out)``.

    mish is smooth with non-zero derivatives of every order, which second-order MAML through a Hamiltonian
    network needs (the meta-gradient contains third derivatives of the network; ReLU's are zero).
    """
    return nn.Sequential(nn.Linear(n_in, n_hidden), Mish(), nn.Linear(n_hidden, n_out, bias=out_bias))
