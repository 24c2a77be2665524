"""Asymptotic bounds on log Z from LM samples (paper Theorem 2, after Nowozin 2018).

For one prefix with n samples x_i ~ P_LM, the log-weights are −E(x_i) and
Z = E_{P_LM}[exp(−E)]. Then, for large n,

    E[T_n] < log Z < E[(2n − 1) T_n − 2(n − 1) T_{n−1}]                    (Eq. 4)

with T_n = logsumexp_i(−E_i) − log n and T_{n−1} the leave-one-out average.
"""

from __future__ import annotations

import math

import torch


def leave_one_out_logsumexp(log_weights: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension with element j left out, for every j.

    Built from prefix and suffix log-cum-sum-exps, so no exp(·) of a raw weight is formed
    and no cancellation (a subtraction of large sums) happens when one weight dominates.
    """
    n = log_weights.shape[-1]
    prefix = torch.logcumsumexp(log_weights, dim=-1)
    suffix = torch.logcumsumexp(log_weights.flip(-1), dim=-1).flip(-1)
    neg_inf = torch.full_like(log_weights[..., :1], -math.inf)
    before = torch.cat([neg_inf, prefix[..., : n - 1]], dim=-1)  # lse of x_0..x_{j-1}
    after = torch.cat([suffix[..., 1:], neg_inf], dim=-1)  # lse of x_{j+1}..x_{n-1}
    return torch.logaddexp(before, after)


def log_partition_bounds(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) estimates of log Z from −E of n LM samples in the last dimension.

    lower = T_n (biased low), upper = (2n−1)·T_n − 2(n−1)·mean_j T_{n−1}^{(j)} (biased high),
    both in float64, for any leading shape. Needs n ≥ 2.
    """
    lw = torch.as_tensor(log_weights).to(torch.float64)
    n = lw.shape[-1]
    if n < 2:
        raise ValueError(f"log_partition_bounds needs at least 2 samples per prefix, got {n}")
    t_n = torch.logsumexp(lw, dim=-1) - math.log(n)
    t_n_minus_1 = (leave_one_out_logsumexp(lw) - math.log(n - 1)).mean(dim=-1)
    upper = (2 * n - 1) * t_n - 2 * (n - 1) * t_n_minus_1
    return t_n, upper
