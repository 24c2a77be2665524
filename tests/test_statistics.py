"""The report's statistics where the truth is known (`rebm bench statistics`, issue 25): PSIS k̂,
the paired document-level interval and its coverage, the log Z rule's false-convergence rate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.estimation.diagnostics import effective_sample_size, importance_diagnostics, khat_threshold
from pipeline.estimation.intervals import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    below_verdict,
    document_sums,
    paired_ratio_interval,
)
from pipeline.tools.bench_statistics import convergence_study, interval_coverage
from stages.cli import app


def test_khat_threshold_is_the_papers_formula() -> None:
    assert khat_threshold(4096) == pytest.approx(0.7)
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(400) == pytest.approx(1 - 1 / math.log10(400))
    assert khat_threshold(5) == -math.inf


@pytest.mark.parametrize("alpha", [1.1, 1.5, 3.0])
def test_khat_estimates_the_pareto_tail_index(alpha: float) -> None:
    """k̂ ≈ 1/α for weights with a Pareto(α) tail, within the estimator's spread at S = 4096."""
    lw = np.log1p(np.random.default_rng(0).pareto(alpha, (8, 4096)))
    diag = importance_diagnostics(lw)
    assert abs(diag.mean_khat - 1 / alpha) < 0.12
    if alpha != 1.5:  # k = 0.67 sits at the 0.7 border, where the fit's noise decides
        assert diag.reliable is (alpha > 2)


def test_ess_of_equal_weights_is_the_sample_count_and_of_one_weight_is_one() -> None:
    assert effective_sample_size(np.zeros((2, 50))) == pytest.approx([50, 50])
    one = np.full(50, -1e4)
    one[7] = 0.0
    assert effective_sample_size(one) == pytest.approx(1.0)


def test_documents_are_the_resampling_unit() -> None:
    sums, counts = document_sums(np.array([1.0, 2.0, 3.0, 4.0]), np.array(["b", "a", "b", "c"]))
    assert sums.tolist() == [2.0, 4.0, 4.0] and counts.tolist() == [1.0, 2.0, 1.0]
    # Windows of one document move together: resampling documents widens the interval.
    rng = np.random.default_rng(1)
    doc_effect = np.repeat(rng.normal(0, 5, 4), 4)
    base = rng.normal(250, 30, 16)
    model = base - 4 + doc_effect + rng.normal(0, 0.5, 16)
    docs = np.repeat(np.arange(4), 4)
    by_window = paired_ratio_interval(model, base, None, 40, 0.95, 2000, seed=0)
    by_document = paired_ratio_interval(model, base, docs, 40, 0.95, 2000, seed=0)
    assert by_document.documents == 4 and by_window.documents == 16
    assert by_document.high - by_document.low > 2 * (by_window.high - by_window.low)
    assert paired_ratio_interval(model, base, np.zeros(16), 40, 0.95, 2000, seed=0) is None  # one document


def test_paired_interval_reproduces_and_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(250, 30, 40)
    model = base - rng.normal(4, 3, 40)
    first = paired_ratio_interval(model, base, None, 40, 0.95, 2000, seed=7)
    assert first == paired_ratio_interval(model, base, None, 40, 0.95, 2000, seed=7)
    assert first.low < first.point < first.high < 1
    assert first.point == pytest.approx(math.exp((model.sum() - base.sum()) / (40 * 40)))
    assert below_verdict(first) == HOLDS


def test_verdicts_follow_the_interval_and_a_missing_one_is_inconclusive() -> None:
    from pipeline.estimation.intervals import PairedInterval

    def interval(low: float, high: float) -> PairedInterval:
        return PairedInterval(point=(low + high) / 2, low=low, high=high, level=0.95, documents=5, windows=8)

    assert below_verdict(interval(0.8, 0.95)) == HOLDS
    assert below_verdict(interval(1.01, 1.2)) == FAILS
    assert below_verdict(interval(0.95, 1.02)) == INCONCLUSIVE
    assert below_verdict(None) == INCONCLUSIVE


@pytest.mark.parametrize(("scenario", "windows", "target"), [
    ("normal", 8, 0.92), ("t3", 8, 0.92), ("clustered", 8, 0.92),
    # Lognormal(0, 1) differences (skewness 6.2) on 8 windows: 0.913 with 1000 data sets, 0.007 short of the
    # target; 16 windows reach it (0.922). The README states both.
    ("lognormal", 8, 0.90), ("lognormal", 16, 0.92),
])
def test_interval_coverage_meets_its_target(scenario: str, windows: int, target: float) -> None:
    assert interval_coverage(scenario, 1000, 0.95, 1000, seed=0, windows=windows) >= target


@pytest.mark.parametrize("samples", [256, 4096])
@pytest.mark.parametrize("scenario", ["light", "pareto3", "pareto1.5", "pareto1.1", "rare_mode"])
def test_the_log_z_rule_rarely_calls_an_unconverged_estimate_converged(scenario: str, samples: int) -> None:
    study = convergence_study(scenario, 100, samples, seed=0)
    assert study.false_convergence <= 0.05
    if scenario in ("light", "pareto3"):  # and it does converge where the estimate is good
        assert study.converged >= 0.95
    if scenario in ("light", "pareto3", "pareto1.5"):  # k ≤ 0.67: a reliable estimate exists; never stopped
        assert study.stopped == 0
    if scenario == "pareto1.1" and samples == 4096:  # k = 0.91: 10^11 draws needed; the stop saves the rest
        assert study.stopped >= 0.5


def test_the_old_single_doubling_rule_fails_this_study() -> None:
    """The study can fail: the rule before issue 25 (one doubling, rises only, no k̂) on Pareto(1.1)."""
    from pipeline.estimation.convergence import mean_log_z_bounds

    rng = np.random.default_rng(0)
    false = 0
    for _ in range(100):
        lw = np.log1p(rng.pareto(1.1, (8, 4096)))
        (t, u), (t2, u2) = mean_log_z_bounds(lw, 4096), mean_log_z_bounds(lw, 2048)
        converged = t - t2 < 0.2 and u - u2 < 0.2 and u - t < 0.2
        false += converged and not t - 0.2 <= math.log(1.1 / 0.1) <= u + 0.2
    assert false / 100 > 0.5


def test_bench_statistics_quick_json_has_the_documented_keys() -> None:
    result = CliRunner().invoke(app, ["bench", "statistics", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["interval_coverage"]) == {"normal", "t3", "lognormal", "clustered"}
    assert {"pareto1.1@4096", "light@256", "rare_mode@4096"} <= set(report["false_convergence"])
    assert all(0 <= v <= 1 for v in [*report["interval_coverage"].values(), *report["false_convergence"].values()])


def test_constant_weights_have_no_tail() -> None:
    """An energy at chance gives every sample the same weight: reliable, ESS = S (PSIS's fit refuses it)."""
    lw = np.zeros((3, 64))
    lw[1] = np.random.default_rng(0).normal(0, 0.1, 64)
    diag = importance_diagnostics(lw)
    assert diag.khat[0] == -math.inf and diag.khat[2] == -math.inf and np.isfinite(diag.khat[1])
    assert diag.ess[0] == pytest.approx(64) and diag.reliable
