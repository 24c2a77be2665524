"""Has log Z converged? Figure 2 (left) as numbers, and the rule that reads it.

Table 1's joint perplexity depends on log Z only through its mean over the test prefixes
(the per-token NLL is Σ_w (−log P_LM − ... + log Z_w) / tokens), so the rule looks at the mean
over prefixes of the two estimators of Eq. 4: T_n (biased low, rising in n) and U_n (biased
high). Converged at n means all of:

    n ≥ min_samples                                        enough draws to have met a rare mode
    pooled PSIS k̂ < min(1 − 1/log10(N·n), 0.7),           the weights' tail allows an estimate
    mean per-prefix k̂ < min(1 − 1/log10 n, 0.7)
    |Δ mean T|, |Δ mean U| < ε over the last two doublings  n/4 → n/2 → n, nested samples
    |mean T_{n/2}(first half) − mean T_{n/2}(second half)| < ε, same for U: two disjoint halves agree
    mean (U_n − T_n) < ε                                   (ε in nats)

Why each part. A rare, large weight that no sample has met leaves T_n and U_n flat and equal
(the measured news case: gap 0.000 at n = 16 with log Z 1.2 nats higher); no finite-sample test
sees such a mode, hence the minimum n. A weight distribution with a Pareto tail of index α ≤ 2
has no variance: the estimate drifts by rare jumps, and one doubling often shows none. The
earlier rule (one doubling, rises only) called Pareto(α = 1.1) weights converged in 77 % of runs
at n = 4096 while log Z sat 0.43 nats above T_n; k̂ ≈ 1/α sees the tail directly (pipeline/
estimation/diagnostics.py), two doublings and two disjoint halves see a jump that one doubling
happened to miss, and |Δ| instead of the rise alone catches a bound that falls. `rebm bench
statistics` measures the rule's false-convergence rate where the truth is known.
A shift of Δ nats in log Z moves per-token perplexity by a factor exp(Δ / L), L tokens scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.estimation.bounds import log_partition_bounds
from pipeline.estimation.diagnostics import ImportanceDiagnostics, importance_diagnostics

RULE = (
    "converged at n when n ≥ {min_samples}, the pooled PSIS k̂ of the N prefixes' weights (each divided by its mean) "
    "is below min(1 − 1/log10(N·n), 0.7) and their mean per-prefix k̂ below min(1 − 1/log10 n, 0.7), "
    "the means over prefixes of T and U moved by less than ε = {epsilon} nats over each of the last two doublings "
    "(n/4 → n/2 → n, nested samples), the two disjoint halves of the samples agree on both within ε, and the mean "
    "gap U_n − T_n is below ε"
)


def doubling_counts(n: int, start: int = 2) -> list[int]:
    """Sample counts start, 2·start, 4·start, … up to n, with n itself last (Figure 2's x-axis)."""
    counts, k = [], start
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def mean_log_z_bounds(log_weights: np.ndarray, k: int) -> tuple[float, float]:
    """(mean T_k, mean U_k) over prefixes from the first k samples of each: log_weights [N, n]."""
    lower, upper = log_partition_bounds(torch.from_numpy(np.asarray(log_weights, dtype=np.float64)[:, :k]))
    return float(lower.mean()), float(upper.mean())


@dataclass(frozen=True)
class ConvergenceVerdict:
    converged: bool
    n: int
    previous_n: int
    mean_log_z_lower: float
    mean_log_z_upper: float
    lower_rise: float  # mean T_n − mean T_{n/2}
    upper_rise: float  # mean U_n − mean U_{n/2}
    earlier_lower_rise: float  # mean T_{n/2} − mean T_{n/4}
    earlier_upper_rise: float
    halves_lower_diff: float  # mean T_{n/2} of the second half − of the first half
    halves_upper_diff: float
    gap: float
    epsilon: float
    diagnostics: ImportanceDiagnostics
    reason: str

    @property
    def label(self) -> str:
        return f"{'converged' if self.converged else 'not converged'} at n = {self.n}"

    def as_dict(self) -> dict:
        out = {key: getattr(self, key) for key in ("converged", "n", "previous_n", "epsilon", "reason")}
        for key in ("mean_log_z_lower", "mean_log_z_upper", "lower_rise", "upper_rise", "earlier_lower_rise",
                    "earlier_upper_rise", "halves_lower_diff", "halves_upper_diff", "gap"):
            out[key] = round(getattr(self, key), 4)
        out["diagnostics"] = self.diagnostics.as_dict()
        return out


def convergence_verdict(log_weights: np.ndarray, epsilon: float, min_samples: int) -> ConvergenceVerdict:
    """The rule of the module docstring on all n samples per prefix (log_weights [N, n] = −E)."""
    lw = np.asarray(log_weights, dtype=np.float64)
    n = lw.shape[-1]
    half, quarter = max(2, n // 2), max(2, n // 4)
    lower, upper = mean_log_z_bounds(lw, n)
    lower_half, upper_half = mean_log_z_bounds(lw, half)
    lower_quarter, upper_quarter = mean_log_z_bounds(lw, quarter)
    second_lower, second_upper = mean_log_z_bounds(lw[:, n - half :], half) if n >= 4 else (lower_half, upper_half)
    diagnostics = importance_diagnostics(lw)
    moves = {
        f"mean T moved {lower - lower_half:+.3f} from n = {half}": lower - lower_half,
        f"mean U moved {upper - upper_half:+.3f} from n = {half}": upper - upper_half,
        f"mean T moved {lower_half - lower_quarter:+.3f} from n = {quarter} to {half}": lower_half - lower_quarter,
        f"mean U moved {upper_half - upper_quarter:+.3f} from n = {quarter} to {half}": upper_half - upper_quarter,
        f"the disjoint halves' mean T differ by {second_lower - lower_half:+.3f}": second_lower - lower_half,
        f"the disjoint halves' mean U differ by {second_upper - upper_half:+.3f}": second_upper - upper_half,
    }
    failures = []
    if n < min_samples:
        failures.append(f"n = {n} < {min_samples} samples per prefix")
    if not diagnostics.reliable:
        failures.append(diagnostics.reason)
    failures += [text for text, move in moves.items() if not abs(move) < epsilon]
    if not upper - lower < epsilon:
        failures.append(f"mean U_n − T_n = {upper - lower:.3f}")
    reason = "; ".join(failures) if failures else (
        f"T, U moved {lower - lower_half:+.3f}, {upper - upper_half:+.3f} from n = {half} and "
        f"{lower_half - lower_quarter:+.3f}, {upper_half - upper_quarter:+.3f} before; halves agree within "
        f"{max(abs(second_lower - lower_half), abs(second_upper - upper_half)):.3f}; gap {upper - lower:.3f} "
        f"(ε = {epsilon}); {diagnostics.reason}"
    )
    return ConvergenceVerdict(
        not failures, n, half, lower, upper, lower - lower_half, upper - upper_half, lower_half - lower_quarter,
        upper_half - upper_quarter, second_lower - lower_half, second_upper - upper_half, upper - lower, epsilon,
        diagnostics, reason)
