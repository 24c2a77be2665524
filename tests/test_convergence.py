"""The log Z convergence rule, the self-normalised reference point and the bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.estimation.convergence import convergence_verdict, doubling_counts, mean_log_z_bounds
from pipeline.estimation.evaluation_summary import bootstrap_ratio_interval, self_normalised_perplexity

EPS, MIN_N = 0.2, 64


def heavy_tailed(n: int, prefixes: int = 8, rare: float = 0.003, seed: int = 0) -> tuple[np.ndarray, float]:
    """Log-weights of a lognormal bulk plus a rare mode 4.5 nats higher, and the true log Z."""
    rng = np.random.default_rng(seed)
    lw = rng.normal(-4.5, 0.4, (prefixes, n))
    mode = rng.random((prefixes, n)) < rare
    lw[mode] = rng.normal(0.0, 0.3, mode.sum())
    true = math.log((1 - rare) * math.exp(-4.5 + 0.4**2 / 2) + rare * math.exp(0.3**2 / 2))
    return lw, true


def test_a_heavy_tailed_log_z_is_not_converged_at_small_n_and_converged_at_large_n() -> None:
    lw, true = heavy_tailed(8192)
    small = convergence_verdict(lw[:, :64], EPS, MIN_N)
    assert not small.converged and "rose" in small.reason  # the rare mode is being met: T_n still moving
    large = convergence_verdict(lw, EPS, MIN_N)
    assert large.converged, large.reason
    assert large.label == "converged at n = 8192" and large.previous_n == 4096
    assert abs(large.mean_log_z_lower - true) < EPS and abs(large.mean_log_z_upper - true) < EPS


def test_an_unmet_rare_mode_is_caught_by_the_minimum_sample_count() -> None:
    lw, true = heavy_tailed(16)
    verdict = convergence_verdict(lw, EPS, MIN_N)
    # The measured news case: at n = 16 the two estimators agree, far below the true log Z ...
    assert verdict.gap < 0.05 and verdict.mean_log_z_upper < true - 0.2
    # ... so agreement alone must not pass.
    assert not verdict.converged and "< 64 samples" in verdict.reason


def test_a_light_tailed_log_z_converges_as_soon_as_the_minimum_n_allows() -> None:
    lw = np.random.default_rng(1).normal(0.0, 0.3, (8, 64))
    verdict = convergence_verdict(lw, EPS, MIN_N)
    assert verdict.converged, verdict.reason
    assert verdict.mean_log_z_lower <= verdict.mean_log_z_upper
    assert abs(verdict.mean_log_z_lower - 0.045) < 0.05  # log E[e^w] = σ²/2


def test_the_curve_doubles_n_and_ends_at_n() -> None:
    assert doubling_counts(512) == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert doubling_counts(100) == [2, 4, 8, 16, 32, 64, 100]
    lw, _ = heavy_tailed(256)
    curve = [(k, *mean_log_z_bounds(lw, k)) for k in doubling_counts(256)]
    assert [k for k, _, _ in curve] == doubling_counts(256)
    assert all(t <= u + 1e-12 for _, t, u in curve)
    verdict = convergence_verdict(lw, EPS, MIN_N)
    assert curve[-1][1] == pytest.approx(verdict.mean_log_z_lower)
    assert verdict.lower_rise == pytest.approx(curve[-1][1] - curve[-2][1])


def test_self_normalised_perplexity_is_the_formula_by_hand() -> None:
    lm = np.array([-50.0, -60.0, -55.0])  # sequence log P_LM of three windows
    energy = np.array([-2.0, 1.0, 0.5])
    tokens = 3 * 40
    by_hand = math.exp(-((-50 + 2) + (-60 - 1) + (-55 - 0.5)) / tokens)
    assert self_normalised_perplexity(lm, energy, tokens) == pytest.approx(by_hand, rel=1e-12)
    # Lower energy on real text (a better joint model) gives lower perplexity than the LM's.
    assert self_normalised_perplexity(lm, np.full(3, -1.0), tokens) < math.exp(-lm.sum() / tokens)


def test_the_bootstrap_interval_reproduces_for_a_seed_and_contains_the_point_estimate() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(250, 30, 40)
    model = base - rng.normal(4, 3, 40)  # better on most windows
    L = 40
    point = math.exp((model.sum() - base.sum()) / (40 * L))
    first = bootstrap_ratio_interval(model, base, L, 2000, seed=7, level=0.95)
    assert first == bootstrap_ratio_interval(model, base, L, 2000, seed=7, level=0.95)
    assert first != bootstrap_ratio_interval(model, base, L, 2000, seed=8, level=0.95)
    assert first[0] < point < first[1] < 1.0
    # Pairing: the window-to-window spread of the base LM (sd 30 nats) cancels; unpaired it would not.
    assert first[1] - first[0] < 0.1  # paired: ≈ 4 · 3/√40 / 40 ≈ 0.05; unpaired ≈ 0.6


def test_a_figure_1_position_is_converged_only_when_both_its_expectations_are() -> None:
    from pipeline.core.config import ConvergenceConfig
    from pipeline.estimation.evaluation_summary import positions_converged

    rng = np.random.default_rng(4)
    energies = rng.normal(0.0, 0.05, (4, 5, 64))  # [windows, positions, samples]: light-tailed everywhere ...
    energies[:, 2, 32:] = -rng.exponential(3.0, (4, 32))  # ... except column 2, whose second half meets big weights
    ok = positions_converged(energies, ConvergenceConfig(epsilon=EPS, min_samples=MIN_N))
    # Column 2 is the denominator of position 2 and the numerator of position 1; the last has an exact numerator.
    assert ok.tolist() == [True, False, False, True, True]
    assert not positions_converged(energies[:, :, :32], ConvergenceConfig(epsilon=EPS, min_samples=MIN_N)).any()
