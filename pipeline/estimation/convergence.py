"""Has log Z converged? Figure 2 (left) as numbers, and the rule that reads it.

Table 1's joint perplexity depends on log Z only through its mean over the test prefixes
(the per-token NLL is Σ_w (−log P_LM − ... + log Z_w) / tokens), so the rule looks at the mean
over prefixes of the two estimators of Eq. 4: T_n (biased low, rising in n) and U_n (biased
high). Their expected values move like the remaining bias, so the movement over the last
doubling of n is the evidence that more samples would not move the range:

    converged at n  ⇔  n ≥ min_samples,
                       mean T_n − mean T_{n/2} < ε,   mean U_n − mean U_{n/2} < ε,
                       mean (U_n − T_n) < ε                                  (ε in nats)

with T_{n/2}, U_{n/2} from the first n/2 of the same samples. The minimum n is there because a
rare, large weight that no sample has met yet leaves T_n and U_n flat and equal (the measured
news case: gap 0.000 at n = 16 with log Z 1.2 nats higher); no finite-sample test sees such a
mode, so the rule asks for enough samples that a mode of a few per mille has been met.
A shift of Δ nats in log Z moves per-token perplexity by a factor exp(Δ / L), L tokens scored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.estimation.bounds import log_partition_bounds

RULE = (
    "converged at n when n ≥ {min_samples} and, over the last doubling (n/2 → n, nested samples), the mean over "
    "prefixes of T_n rose by less than ε = {epsilon} nats, the mean of U_n rose by less than ε, and the mean gap "
    "U_n − T_n is below ε"
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
    lower_rise: float
    upper_rise: float
    gap: float
    epsilon: float
    reason: str

    @property
    def label(self) -> str:
        return f"{'converged' if self.converged else 'not converged'} at n = {self.n}"

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("mean_log_z_lower", "mean_log_z_upper", "lower_rise", "upper_rise", "gap"):
            out[key] = round(out[key], 4)
        return out


def convergence_verdict(log_weights: np.ndarray, epsilon: float, min_samples: int) -> ConvergenceVerdict:
    """The rule of the module docstring on all n samples per prefix (log_weights [N, n] = −E)."""
    n = np.asarray(log_weights).shape[-1]
    half = max(2, n // 2)
    lower, upper = mean_log_z_bounds(log_weights, n)
    lower_half, upper_half = mean_log_z_bounds(log_weights, half)
    rise_lower, rise_upper, gap = lower - lower_half, upper - upper_half, upper - lower
    failures = []
    if n < min_samples:
        failures.append(f"n = {n} < {min_samples} samples per prefix")
    if not rise_lower < epsilon:
        failures.append(f"mean T_n rose {rise_lower:+.3f} from n = {half}")
    if not rise_upper < epsilon:
        failures.append(f"mean U_n rose {rise_upper:+.3f} from n = {half}")
    if not gap < epsilon:
        failures.append(f"mean U_n − T_n = {gap:.3f}")
    reason = "; ".join(failures) if failures else (
        f"T_n {rise_lower:+.3f}, U_n {rise_upper:+.3f} from n = {half}; gap {gap:.3f} (ε = {epsilon})"
    )
    return ConvergenceVerdict(not failures, n, half, lower, upper, rise_lower, rise_upper, gap, epsilon, reason)
