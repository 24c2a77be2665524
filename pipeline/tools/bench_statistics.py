"""`rebm bench statistics`: the report's statistics checked where the truth is known. No models.

Two questions, each by simulation with fixed seeds:

interval coverage   How often does the paired interval of `pipeline.estimation.intervals` contain
                    the true ratio, at nominal `level`? Per-window differences d_w are drawn from
                    a scenario with a known mean; the interval is computed exactly as Table 1
                    computes it (studentized bootstrap over documents).
false convergence   How often does the log Z rule of `pipeline.estimation.convergence` say
                    "converged" while the true log Z lies more than ε outside the reported
                    [mean T_n, mean U_n]? Log weights of N prefixes × S samples are drawn from a
                    distribution whose E[exp(w)] is known, and the draw stops early where the
                    evaluate stage's futility rule would stop it (mean k̂ ≥ 0.8 at n = 1024, 2048).
                    The rate it says converged at all and the rate the draw stopped are printed
                    beside it: a rule that never converges would pass the first number, and a stop
                    where the tail allows an estimate (light, Pareto 3 and 1.5) would cost verdicts.

Scenarios mirror the default's test set and rule: 8 windows (news: from 5 documents), ε = 0.2
nats, min_samples 256, S = 4096 samples per prefix (BIT*'s n_eval) and 256 (UNIT's and BIT's).
At S = 64 with min_samples 64 (the rule's earlier minimum) the rare-mode scenario was called
converged, wrongly, in 22-32 % of runs: no finite-sample test sees a mode no sample has met, which
is why the minimum is 256.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.estimation.convergence import convergence_verdict
from pipeline.estimation.diagnostics import futile_draw, look_points
from pipeline.estimation.intervals import studentized_mean_interval

WINDOWS = 8
NEWS_DOCUMENTS = (3, 2, 1, 1, 1)  # windows per document of the default's 8 news test windows
EPSILON, MIN_SAMPLES = 0.2, 256
STOP_KHAT, STOP_AFTER = 0.8, 1024  # evaluate.convergence.stop_khat / stop_after
SAMPLE_COUNTS = (256, 4096)


# --------------------------------------------------------------------------- interval coverage
def _window_differences(scenario: str, windows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """(d [windows], documents [windows], true mean of d) for one simulated test set."""
    singletons = np.arange(windows)
    if scenario == "normal":
        return rng.normal(0.0, 1.0, windows), singletons, 0.0
    if scenario == "t3":
        return rng.standard_t(3, windows), singletons, 0.0
    if scenario == "lognormal":  # skewness 6.2: one window far worse than the rest
        return rng.lognormal(0.0, 1.0, windows), singletons, math.exp(0.5)
    if scenario == "clustered":  # document effect sd 1, window noise sd 0.5; news's 8 windows in 5 documents
        sizes = np.array(NEWS_DOCUMENTS)
        documents = np.repeat(np.arange(len(sizes)), sizes)
        return rng.normal(0.0, 1.0, len(sizes))[documents] + rng.normal(0.0, 0.5, len(documents)), documents, 0.0
    raise ValueError(f"unknown interval scenario {scenario!r}")


INTERVAL_SCENARIOS = ("normal", "t3", "lognormal", "clustered")


def interval_coverage(scenario: str, replicates: int, level: float, resamples: int, seed: int,
                      windows: int = WINDOWS) -> float:
    """Fraction of simulated test sets whose interval contains the true mean difference."""
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(replicates):
        d, documents, truth = _window_differences(scenario, windows, rng)
        _, low, high = studentized_mean_interval(d, documents, level, resamples, seed=r)
        hits += low <= truth <= high
    return hits / replicates


# --------------------------------------------------------------------------- false convergence
def _log_weights(scenario: str, prefixes: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(log weights [prefixes, samples], true log E[exp(w)]) of one simulated evaluation."""
    if scenario == "light":  # lognormal weights, sd 1 nat: the well-trained energy's case
        return rng.normal(0.0, 1.0, (prefixes, samples)), 0.5
    if scenario.startswith("pareto"):  # weights 1 + Pareto(α): E[w] = α / (α − 1)
        alpha = float(scenario.removeprefix("pareto"))
        return np.log1p(rng.pareto(alpha, (prefixes, samples))), math.log(alpha / (alpha - 1))
    if scenario == "rare_mode":  # the news case: a mode 4.5 nats up, met by 0.3 % of samples
        lw = rng.normal(-4.5, 0.4, (prefixes, samples))
        mode = rng.random((prefixes, samples)) < 0.003
        lw[mode] = rng.normal(0.0, 0.3, int(mode.sum()))
        return lw, math.log(0.997 * math.exp(-4.5 + 0.08) + 0.003 * math.exp(0.045))
    raise ValueError(f"unknown weight scenario {scenario!r}")


WEIGHT_SCENARIOS = ("light", "pareto3", "pareto1.5", "pareto1.1", "rare_mode")


@dataclass(frozen=True)
class ConvergenceStudy:
    false_convergence: float  # P(converged and the truth more than ε outside [T, U])
    converged: float  # P(converged)
    stopped: float  # P(the draw stopped as futile at a look before S)


def convergence_study(scenario: str, replicates: int, samples: int, seed: int, prefixes: int = WINDOWS,
                      stop_khat: float | None = STOP_KHAT) -> ConvergenceStudy:
    """The evaluate stage's procedure on simulated weights: draw S per prefix, stopping at a look
    (`STOP_AFTER`, 2·`STOP_AFTER`, …) where `futile_draw` says so, then the verdict on what was drawn."""
    rng = np.random.default_rng(seed)
    false = converged = stopped = 0
    for _ in range(replicates):
        lw, truth = _log_weights(scenario, prefixes, samples, rng)
        n = next((k for k in look_points(STOP_AFTER, samples) if futile_draw(lw[:, :k], stop_khat)), samples)
        verdict = convergence_verdict(lw[:, :n], EPSILON, MIN_SAMPLES)
        outside = not verdict.mean_log_z_lower - EPSILON <= truth <= verdict.mean_log_z_upper + EPSILON
        converged += verdict.converged
        false += verdict.converged and outside
        stopped += n < samples
    return ConvergenceStudy(false / replicates, converged / replicates, stopped / replicates)


# --------------------------------------------------------------------------- the study
def statistics_study(quick: bool = False, seed: int = 0, level: float = 0.95) -> dict:
    """Both studies on every scenario. quick: fewer replicates (about 1 minute on 2 cores)."""
    started = time.perf_counter()
    interval_reps, weight_reps, resamples = (400, 100, 1000) if quick else (2000, 400, 2000)
    coverage = {s: round(interval_coverage(s, interval_reps, level, resamples, seed), 4)
                for s in INTERVAL_SCENARIOS}
    false, rate, stopped = {}, {}, {}
    for samples in SAMPLE_COUNTS:
        for scenario in WEIGHT_SCENARIOS:
            key = f"{scenario}@{samples}"
            study = convergence_study(scenario, weight_reps, samples, seed)
            false[key], rate[key] = round(study.false_convergence, 4), round(study.converged, 4)
            stopped[key] = round(study.stopped, 4)
    return {
        "interval_coverage": coverage,
        "false_convergence": false,
        "converged_rate": rate,
        "stopped_rate": stopped,
        "nominal_level": level,
        "replicates": {"interval": interval_reps, "convergence": weight_reps, "bootstrap_resamples": resamples},
        "design": {"windows": WINDOWS, "clustered_documents": list(NEWS_DOCUMENTS), "epsilon": EPSILON,
                   "min_samples": MIN_SAMPLES, "stop_khat": STOP_KHAT, "stop_after": STOP_AFTER},
        "seed": seed,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def format_report(r: dict) -> str:
    level = r["nominal_level"]
    lines = [f"rebm bench statistics — {r['replicates']['interval']} simulated test sets of {r['design']['windows']} "
             f"windows per interval scenario, {r['replicates']['convergence']} simulated evaluations per weight "
             f"scenario (seed {r['seed']}, {r['wall_seconds']} s)",
             f"interval coverage at nominal {level} (target ≥ 0.92):"]
    lines += [f"  {s:10s} {c:.3f}{'' if c >= 0.92 else '   BELOW TARGET'}" for s, c in r["interval_coverage"].items()]
    lines.append(f"log Z rule, ε = {r['design']['epsilon']}, draw stopped where mean k̂ ≥ {r['design']['stop_khat']}: "
                 "false convergence (target ≤ 0.05) / converged at all / draw stopped:")
    lines += [f"  {s:16s} {f:.3f} / {r['converged_rate'][s]:.3f} / {r['stopped_rate'][s]:.3f}"
              f"{'' if f <= 0.05 else '   ABOVE TARGET'}" for s, f in r["false_convergence"].items()]
    return "\n".join(lines)
