from __future__ import annotations

import math

import pytest
import torch

from pipeline.estimation.joint import (
    expectation_bounds,
    joint_sequence_nll_bounds,
    last_position_logprob,
    perplexity_range,
    position_logprob_bounds,
)


def test_zero_energy_reproduces_the_base_lm_exactly() -> None:
    lm_logprob = torch.tensor([-120.5, -98.25, -140.0], dtype=torch.float64)  # 40-token continuations
    low, high = joint_sequence_nll_bounds(lm_logprob, torch.zeros(3), torch.zeros(3, 16))
    assert torch.equal(low, -lm_logprob) and torch.equal(high, -lm_logprob)
    base_ppl = math.exp(-lm_logprob.sum().item() / 120)
    assert perplexity_range(low, high, 120) == pytest.approx((base_ppl, base_ppl), rel=1e-15)


def test_low_end_uses_the_lower_log_partition_estimate() -> None:
    gen = torch.Generator().manual_seed(1)
    lm_logprob = -torch.rand(50, generator=gen, dtype=torch.float64) * 100
    energy = torch.randn(50, generator=gen, dtype=torch.float64)
    samples = torch.randn(50, 8, generator=gen, dtype=torch.float64) * 2
    low, high = joint_sequence_nll_bounds(lm_logprob, energy, samples)
    assert (low <= high + 1e-12).all()
    # Lowering every sample's energy raises Z, so the joint likelihood of x⁺ drops.
    low2, high2 = joint_sequence_nll_bounds(lm_logprob, energy, samples - 1.0)
    assert torch.allclose(low2, low + 1.0) and torch.allclose(high2, high + 1.0)


def test_joint_nll_brackets_the_exact_value_on_an_enumerable_model() -> None:
    """64 possible continuations (3 tokens over 4 symbols): Z by enumerating all of them."""
    gen = torch.Generator().manual_seed(0)
    p_lm = torch.softmax(torch.randn(64, generator=gen, dtype=torch.float64), 0)
    energy = torch.randn(64, generator=gen, dtype=torch.float64)
    log_z = torch.logsumexp(p_lm.log() - energy, 0)
    real = 5  # the observed continuation
    exact_nll = -(p_lm[real].log() - energy[real] - log_z)
    trials, n = 20000, 32
    draws = torch.multinomial(p_lm.float(), trials * n, replacement=True, generator=gen).view(trials, n)
    low, high = joint_sequence_nll_bounds(p_lm[real].log().expand(trials), energy[real].expand(trials), energy[draws])
    assert low.mean() < exact_nll < high.mean()


def test_position_bounds_order_and_exact_single_sample() -> None:
    gen = torch.Generator().manual_seed(2)
    lower, upper = position_logprob_bounds(
        torch.full((5,), -3.0), torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    )
    assert (lower <= upper).all()
    # At t = T: one exact numerator column; the denominator enumerated exactly has equal weights.
    lo, hi = expectation_bounds(torch.tensor([[-0.7]]))
    assert lo.item() == hi.item() == pytest.approx(-0.7)


def test_last_position_by_enumeration_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    lm_logprobs = torch.log_softmax(torch.randn(4, 30, generator=gen, dtype=torch.float64), -1)
    energies = torch.randn(4, 30, generator=gen, dtype=torch.float64) * 2
    target = torch.tensor([0, 7, 29, 13])
    got = last_position_logprob(lm_logprobs, energies, target)
    for row in range(4):
        weights = [math.exp(lm_logprobs[row, v].item() - energies[row, v].item()) for v in range(30)]
        expected = math.log(weights[target[row]] / sum(weights))
        assert got[row].item() == pytest.approx(expected, rel=1e-12)
    # A proper distribution over the vocabulary: the probabilities of all targets sum to one.
    all_targets = torch.arange(30).expand(4, 30)
    total = torch.stack([last_position_logprob(lm_logprobs, energies, all_targets[:, v]) for v in range(30)], -1)
    assert torch.allclose(total.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    # With E ≡ 0 the joint's last step is the LM's.
    assert torch.allclose(last_position_logprob(lm_logprobs, torch.zeros(4, 30), target),
                          lm_logprobs.gather(-1, target[:, None]).squeeze(-1))
