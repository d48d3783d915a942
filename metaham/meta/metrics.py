"""Dynamics metrics of a learned Hamiltonian against the truth (Song and Jeong, ICLR 2024, sec. 5).

Both per-trajectory errors have the bounded form ``|a - b| / (|a| + |b|)`` of the paper: 0 for a perfect
prediction, at most 1, and about 1 for a rollout that has run away. A trajectory's error is the mean over its
time steps after the initial state (which both rollouts share); errors of many trajectories are aggregated with
:func:`geometric_mean`, because chaotic systems spread them over orders of magnitude.

>>> import torch
>>> q = torch.zeros(1, 3, 1, 2); p = torch.ones(1, 3, 1, 2)       # 1 trajectory, 3 time points
>>> rollout_relative_error(q, p, q, p)                              # identical rollouts
tensor([0.])
"""
from __future__ import annotations

import torch
from torch import Tensor


def rollout_relative_error(q_true: Tensor, p_true: Tensor, q_pred: Tensor, p_pred: Tensor) -> Tensor:
    """Mean over time of ``|z_t - z_hat_t| / (|z_t| + |z_hat_t|)``, with ``z = (q, p)`` the whole phase-space state.

    Args:
        q_true, p_true, q_pred, p_pred: ``(..., T, n, 2)``; time step 0 (the shared initial state) is skipped.

    Returns:
        ``(...)``: one error per trajectory, in ``[0, 1]``.
    """
    if q_true.shape[-3] < 2:
        raise ValueError(f"a rollout needs at least 2 time points, got shape {tuple(q_true.shape)}")
    z = torch.cat([q_true, p_true], dim=-1).flatten(-2)  # (..., T, 4n)
    z_hat = torch.cat([q_pred, p_pred], dim=-1).flatten(-2)
    return _bounded_ratio(torch.linalg.vector_norm(z - z_hat, dim=-1), z.norm(dim=-1), z_hat.norm(dim=-1))[..., 1:].mean(-1)


def energy_relative_error(energy: Tensor) -> Tensor:
    """Mean over time of ``|H(z_hat_t) - H(z_0)| / (|H(z_0)| + |H(z_hat_t)|)``.

    Args:
        energy: ``(..., T)``, the TRUE Hamiltonian evaluated along a predicted rollout whose first state
            ``z_0`` is the exact initial state, so ``energy[..., 0]`` is the true (conserved) energy. A learned H
            is defined only up to a constant, so it cannot be compared directly; the true H can.

    Returns:
        ``(...)``: one error per trajectory, in ``[0, 1]``; 0 for a rollout that conserves the true energy.
    """
    if energy.shape[-1] < 2:
        raise ValueError(f"an energy series needs at least 2 time points, got shape {tuple(energy.shape)}")
    reference = energy[..., :1]
    ratio = _bounded_ratio((energy - reference).abs(), reference.abs(), energy.abs())
    return ratio[..., 1:].mean(-1)


def geometric_mean(values: Tensor, floor: float = 1e-30) -> float:
    """``exp(mean(log(values)))`` over all entries; entries below ``floor`` count as ``floor`` (an exact 0
    would make the mean -inf)."""
    values = values.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("geometric_mean of no values")
    return float(torch.exp(torch.log(values.clamp_min(floor)).mean()))


def _bounded_ratio(difference: Tensor, a: Tensor, b: Tensor) -> Tensor:
    # 0/0 (both states exactly zero) is a perfect match, not NaN; a non-finite prediction counts as the worst (1).
    ratio = difference / (a + b).clamp_min(torch.finfo(difference.dtype).tiny)
    return torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))


__all__ = ["energy_relative_error", "geometric_mean", "rollout_relative_error"]
