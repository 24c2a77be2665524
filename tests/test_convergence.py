"""The log Z convergence rule, the self-normalised reference point and the bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.estimation.convergence import convergence_verdict, doubling_counts, mean_log_z_bounds
from pipeline.estimation.evaluation_summary import self_normalised_perplexity

EPS, MIN_N = 0.2, 64


def heavy_tailed(n: int, prefixes: int = 8, rare: float = 0.003, seed: int = 0, height: float = 4.5,
                 ) -> tuple[np.ndarray, float]:
    """Log-weights of a lognormal bulk plus a rare mode `height` nats higher, and the true log Z."""
    rng = np.random.default_rng(seed)
    lw = rng.normal(-height, 0.4, (prefixes, n))
    mode = rng.random((prefixes, n)) < rare
    lw[mode] = rng.normal(0.0, 0.3, mode.sum())
    true = math.log((1 - rare) * math.exp(-height + 0.4**2 / 2) + rare * math.exp(0.3**2 / 2))
    return lw, true


def test_a_two_mode_log_z_is_not_converged_at_small_n_and_converged_at_large_n() -> None:
    lw, true = heavy_tailed(8192, rare=0.03, height=2.0)
    small = convergence_verdict(lw[:, :64], EPS, MIN_N)
    assert not small.converged  # the second mode is still being met: its tail and T_n both say so
    large = convergence_verdict(lw, EPS, MIN_N)
    assert large.converged, large.reason
    assert large.label == "converged at n = 8192" and large.previous_n == 4096
    assert abs(large.mean_log_z_lower - true) < EPS and abs(large.mean_log_z_upper - true) < EPS


def test_a_far_rare_mode_passes_the_doublings_but_not_psis() -> None:
    """A mode 4.5 nats up at 0.3 %: the doublings and halves see nothing move at n = 8192 (the old rule
    said converged), but the tail of the weights is a Pareto tail to PSIS, so the rule does not pass."""
    lw, _ = heavy_tailed(8192)
    verdict = convergence_verdict(lw, EPS, MIN_N)
    moves = (verdict.lower_rise, verdict.upper_rise, verdict.earlier_lower_rise, verdict.earlier_upper_rise,
             verdict.halves_lower_diff, verdict.halves_upper_diff)
    assert all(abs(m) < EPS for m in moves) and verdict.gap < EPS
    assert not verdict.converged and verdict.reason.endswith("the weights' tail is too heavy for an estimate")
    assert verdict.diagnostics.pooled_khat >= 0.7


def test_pareto_weights_without_a_variance_are_never_converged() -> None:
    """Pareto(α = 1.1) weights, 8 prefixes × 4096: k̂ ≈ 1/α ≈ 0.9 (the simulation of issue 25)."""
    rng = np.random.default_rng(2)
    verdict = convergence_verdict(np.log(rng.pareto(1.1, (8, 4096)) + 1), EPS, MIN_N)
    assert not verdict.converged and 0.75 < verdict.diagnostics.pooled_khat < 1.2


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
