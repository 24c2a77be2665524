"""Likelihoods of the joint model P_LM(x) · exp(−E(x)) / Z (paper §3.2, Eq. 5).

Z is only known through LM samples, so every quantity here is a pair (lower, upper) built
from the T_n / U_n estimators of `pipeline.estimation.bounds`; all arithmetic is float64 in log space.
"""

from __future__ import annotations

import math

import torch

from pipeline.estimation.bounds import log_partition_bounds


def _f64(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def expectation_bounds(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) of log E[exp(w)] from samples in the last dimension; exact for one sample.

    One sample is the case of nothing left to marginalise (the numerator of Eq. 5 at t = T),
    where the "expectation" is the single clamped sequence's weight.
    """
    lw = _f64(log_weights)
    if lw.shape[-1] == 1:
        value = lw[..., 0]
        return value, value
    return log_partition_bounds(lw)


def joint_sequence_nll_bounds(
    lm_logprob: torch.Tensor, energy: torch.Tensor, lm_sample_energies: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) negative log-likelihood of continuations under the joint model.

    log P(x⁺) = log P_LM(x⁺) − E(x⁺) − log Z, with log Z from the energies of LM samples for the
    same prefix (drawn from the full LM distribution). The lower estimate of log Z (T_n) gives
    the LOW end of the NLL — hence of perplexity — and U_n the HIGH end, like Table 1's ranges.
    """
    lower_log_z, upper_log_z = log_partition_bounds(-_f64(lm_sample_energies))
    return joint_nll_given_log_z(lm_logprob, energy, lower_log_z, upper_log_z)


def joint_nll_given_log_z(
    lm_logprob: torch.Tensor, energy: torch.Tensor, lower_log_z: torch.Tensor, upper_log_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) sequence NLL of the joint model from per-prefix log Z estimates (T_n, U_n)."""
    log_p_unnormalised = _f64(lm_logprob) - _f64(energy)
    return -(log_p_unnormalised - lower_log_z), -(log_p_unnormalised - upper_log_z)


def perplexity_range(nll_low: torch.Tensor, nll_high: torch.Tensor, tokens: int) -> tuple[float, float]:
    """Perplexity per continuation token from summed sequence NLLs: (low, high)."""
    return math.exp(_f64(nll_low).sum().item() / tokens), math.exp(_f64(nll_high).sum().item() / tokens)


def position_logprob_bounds(
    lm_token_logprob: torch.Tensor, numerator_log_weights: torch.Tensor, denominator_log_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) of log P(x_t | x_<t) by Eq. 5.

    numerator: −E of x_≤t completed by LM samples x'_{t+1:T} (one column at t = T: no future);
    denominator: −E of x_<t completed by LM samples x'_{t:T}. As the paper says, the lower
    bound pairs the numerator's lower with the denominator's upper estimate, and vice versa.
    """
    num_low, num_high = expectation_bounds(numerator_log_weights)
    den_low, den_high = expectation_bounds(denominator_log_weights)
    base = _f64(lm_token_logprob)
    return base + num_low - den_high, base + num_high - den_low


def last_position_logprob(
    lm_logprobs: torch.Tensor, energies: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Exact log P(x_T | x_<T) by enumerating the vocabulary (Eq. 5 at t = T).

    lm_logprobs, energies: [..., V] — log P_LM(v | x_<T) and E(x_<T, v) for every token v;
    target: [...] the observed x_T. No future to marginalise, so nothing is estimated.
    """
    lp, e = _f64(lm_logprobs), _f64(energies)
    idx = target.long().unsqueeze(-1)
    numerator = lp.gather(-1, idx).squeeze(-1) - e.gather(-1, idx).squeeze(-1)
    return numerator - torch.logsumexp(lp - e, dim=-1)
