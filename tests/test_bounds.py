from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.estimation.bounds import leave_one_out_logsumexp, log_partition_bounds


def brute_force(log_weights: list[float]) -> tuple[float, float]:
    n = len(log_weights)
    w = [math.exp(x) for x in log_weights]
    t_n = math.log(sum(w) / n)
    loo = [math.log((sum(w) - w[j]) / (n - 1)) for j in range(n)]
    return t_n, (2 * n - 1) * t_n - 2 * (n - 1) * sum(loo) / n


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_matches_a_brute_force_loop(n: int) -> None:
    rng = np.random.default_rng(n)
    lw = rng.normal(0, 2, size=(4, n))
    lower, upper = log_partition_bounds(torch.tensor(lw))
    for row in range(4):
        expected = brute_force(lw[row].tolist())
        assert lower[row].item() == pytest.approx(expected[0], rel=1e-12, abs=1e-12)
        assert upper[row].item() == pytest.approx(expected[1], rel=1e-10, abs=1e-10)


def test_any_leading_shape_and_float64() -> None:
    lw = torch.randn(2, 3, 5, 8, dtype=torch.float32)
    lower, upper = log_partition_bounds(lw)
    assert lower.shape == upper.shape == (2, 3, 5) and lower.dtype == torch.float64


def test_lower_below_upper() -> None:
    # Jensen: T_n ≥ mean_j T_{n-1}^(j), so U_n − T_n = 2(n−1)(T_n − mean T_{n−1}) ≥ 0.
    lw = torch.randn(1000, 12, dtype=torch.float64) * 3
    lower, upper = log_partition_bounds(lw)
    assert (upper >= lower - 1e-12).all()


def test_stable_for_extreme_energies() -> None:
    lw = torch.tensor([[1000.0, -1000.0, 0.0, 5.0], [-5000.0, -5001.0, -5002.0, -5003.0]], dtype=torch.float64)
    lower, upper = log_partition_bounds(lw)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    assert lower[0].item() == pytest.approx(1000 - math.log(4))
    loo = leave_one_out_logsumexp(lw)
    assert loo[0, 0].item() == pytest.approx(math.log(math.exp(5) + 1 + math.exp(-1000)))
    assert loo[0, 1].item() == pytest.approx(1000.0)


def test_equal_weights_give_the_exact_value() -> None:
    lw = torch.full((3, 7), -2.5, dtype=torch.float64)
    lower, upper = log_partition_bounds(lw)
    assert torch.allclose(lower, torch.tensor(-2.5, dtype=torch.float64))
    assert torch.allclose(upper, torch.tensor(-2.5, dtype=torch.float64))


def test_brackets_the_exact_log_partition_and_tightens_with_n() -> None:
    """A toy 'LM' over 50 continuations with enumerable Z: E[T_n] < log Z < E[U_n], gap shrinks."""
    gen = torch.Generator().manual_seed(0)
    p_lm = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64) * 2, dim=0)
    energy = torch.randn(50, generator=gen, dtype=torch.float64) * 1.5
    log_z = torch.logsumexp(torch.log(p_lm) - energy, dim=0).item()
    gaps = []
    for n in (4, 16, 64):
        draws = torch.multinomial(p_lm.float(), 20000 * n, replacement=True, generator=gen).view(20000, n)
        lower, upper = log_partition_bounds(-energy[draws])
        assert lower.mean().item() < log_z < upper.mean().item()
        gaps.append(upper.mean().item() - lower.mean().item())
    assert gaps[0] > gaps[1] > gaps[2]


def test_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        log_partition_bounds(torch.zeros(3, 1))
