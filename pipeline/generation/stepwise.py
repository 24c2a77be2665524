"""Appendix A.1: the joint model factorised token by token (Eq. 5 over the base LM's top K).

For a context x_<t, each of the base LM's top K next tokens c gets n completions
x'_{t+1:T} ~ P_LM(· | x_<t, c), scored by the energy. With Z_c = E_{x'}[exp(−E(x_<t, c, x'))]
Eq. 5 restricted to those K tokens is

    P_K(c | x_<t) = P_LM(c | x_<t) · Z_c / Σ_{c' in K} P_LM(c' | x_<t) · Z_c'

(the paper takes K = 128 and n = 10,000, then shows the top 10 renormalised). Every Z_c is
known only through samples, so, as §3.2 says, each log-probability is a range from Eq. 4: the
lower end pairs the numerator's lower estimate T_n with the denominator built from the upper
estimates U_n, the upper end the reverse (`step_distribution`). At t = T − 1 (0-based: the
last token) there is nothing left to marginalise and one column, the clamped window, is exact.

The repetition claim is read on contexts from LM samples: x_t repeats when the n-gram ending at
x_t (`ngram` tokens) already occurs, ending earlier, in the same window (`repeated_positions`).
Each such context is paired with a control context of the same sample whose token repeats
nothing (`pick_pairs`). The paired control matters: x_t was drawn from the base LM, so for ANY
energy E_{c ~ P_K,base}[P_K,joint(c) / P_K,base(c)] = 1, and by Jensen the mean log-ratio at
sampled tokens is ≤ 0 — "the joint gives the sampled token less probability" holds on average
even for an energy that knows nothing about repetition. What the energy adds shows in the
difference between repetition and control contexts (`repetition_claims`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.estimation.bounds import log_partition_bounds
from pipeline.estimation.convergence import convergence_verdict

CANDIDATES_SCHEMA = pa.schema([
    ("pair", pa.int32()),  # index of the (repetition, control) pair
    ("kind", pa.string()),  # "repetition" | "control"
    ("window_id", pa.int64()),
    ("doc_id", pa.string()),
    ("position", pa.int32()),  # t, 0-based index of x_t in the window
    ("observed", pa.int32()),  # x_t of the LM sample
    ("rank_base", pa.int32()),  # the candidate's rank under the base LM (0 = most likely)
    ("token", pa.int32()),
    ("text", pa.string()),
    ("repeats", pa.bool_()),  # this candidate at x_t would repeat an earlier n-gram
    ("base_logprob", pa.float64()),  # log P_LM(c | x_<t) renormalised over the K candidates
    ("joint_logprob", pa.float64()),  # log P_K(c | x_<t) with log Z_c by T_n (the plug-in estimate)
    ("joint_logprob_low", pa.float64()),  # Eq. 4 lower end
    ("joint_logprob_high", pa.float64()),  # Eq. 4 upper end
    ("joint_logprob_half", pa.float64()),  # the plug-in estimate from the first n/2 completions
    ("converged", pa.bool_()),  # the context's verdict (every candidate shown and x_t converged)
    ("samples", pa.int32()),  # n completions per candidate (1 at the last position: exact)
])


# --------------------------------------------------------------------------- contexts
def repeated_positions(tokens: np.ndarray, ngram: int) -> np.ndarray:
    """bool [T]: position t holds a repetition when tokens[t-ngram+1 : t+1] also ends at some j < t."""
    tokens = np.asarray(tokens).tolist()
    out = np.zeros(len(tokens), dtype=bool)
    seen: set[tuple[int, ...]] = set()
    for t in range(ngram - 1, len(tokens)):
        gram = tuple(tokens[t - ngram + 1 : t + 1])
        out[t] = gram in seen
        seen.add(gram)
    return out


def would_repeat(context: np.ndarray, candidates: np.ndarray, ngram: int) -> np.ndarray:
    """bool [K]: candidate c after `context` would repeat an n-gram of the context."""
    context = np.asarray(context).tolist()
    grams = {tuple(context[j - ngram + 1 : j + 1]) for j in range(ngram - 1, len(context))}
    head = tuple(context[len(context) - ngram + 1 :]) if ngram > 1 else ()
    return np.array([head + (int(c),) in grams for c in candidates], dtype=bool)


@dataclass(frozen=True)
class ContextPair:
    row: int  # index into the sampled windows
    repetition: int  # t of the first repeated continuation token
    control: int  # t of the nearest continuation token that repeats nothing


def pick_pairs(windows: np.ndarray, prefix_len: int, ngram: int, limit: int,
               documents: np.ndarray | None = None) -> list[ContextPair]:
    """Up to `limit` pairs, at most one per sampled window: the first continuation position whose
    token repeats an earlier n-gram, and the closest non-repeating continuation position (ties:
    the earlier one). Windows without both are skipped. With `documents`, windows are taken
    round-robin over documents (each document's first usable window, then its second, …), so
    the pairs spread over as many documents as the paired intervals can resample."""
    found = []
    for row, window in enumerate(np.asarray(windows)):
        flags = repeated_positions(window, ngram)[prefix_len:]
        hits, misses = np.flatnonzero(flags), np.flatnonzero(~flags)
        if len(hits) and len(misses):
            rep = int(hits[0])
            ctrl = int(misses[np.argmin(np.abs(misses - rep) * 2 + (misses > rep))])
            found.append(ContextPair(row, prefix_len + rep, prefix_len + ctrl))
    if documents is not None:
        turns, count = [], {}
        for p in found:
            doc = str(documents[p.row])
            turns.append(count.get(doc, 0))
            count[doc] = turns[-1] + 1
        found = [found[i] for i in sorted(range(len(found)), key=lambda i: (turns[i], found[i].row))]
    return found[:limit]


# --------------------------------------------------------------------------- Eq. 5 over top K
@dataclass(frozen=True)
class StepEstimate:
    """log-probabilities [K] of the K candidates: the base LM renormalised over them, and the
    joint's plug-in estimate with its Eq. 4 range (low ≤ point ≤ high)."""

    base: np.ndarray
    point: np.ndarray
    low: np.ndarray
    high: np.ndarray


def step_distribution(base_logprob: np.ndarray, log_weights: np.ndarray) -> StepEstimate:
    """Eq. 5 over the K candidates from base log P_LM(c | x_<t) [K] and −E of the n completions of
    each [K, n] (n = 1: the exact clamped windows at the last position)."""
    base = torch.as_tensor(np.array(base_logprob, dtype=np.float64))  # a copy: arrays from Ray are read-only
    base = base - torch.logsumexp(base, 0)
    lw = torch.as_tensor(np.array(log_weights, dtype=np.float64))
    if lw.shape[-1] == 1:
        lower = upper = lw[:, 0]
    else:
        lower, upper = log_partition_bounds(lw)
    numerator_low, numerator_high = base + lower, base + upper
    denominator_low, denominator_high = torch.logsumexp(numerator_low, 0), torch.logsumexp(numerator_high, 0)
    # A probability is at most 1: an upper end above it (U_n far off at small n) is cut to log 1.
    high = torch.clamp(numerator_high - denominator_low, max=0.0)
    return StepEstimate(base.numpy(), (numerator_low - denominator_low).numpy(),
                        (numerator_low - denominator_high).numpy(), high.numpy())


def plug_in(base_logprob: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """The plug-in log P_K from the given completions only (used for n/2)."""
    return step_distribution(base_logprob, log_weights).point


def context_converged(log_weights: np.ndarray, watched: np.ndarray, epsilon: float,
                      min_samples: int) -> tuple[bool, str]:
    """The convergence rule of evaluate (pipeline/estimation/convergence.py, checked by `rebm bench
    statistics`) applied to log Z_c of each watched candidate on its own; exact at n = 1."""
    if log_weights.shape[-1] == 1:
        return True, "last position: the clamped windows are exact"
    reasons = []
    for c in watched:
        verdict = convergence_verdict(log_weights[c : c + 1], epsilon, min_samples)
        if not verdict.converged:
            reasons.append(f"candidate {int(c)}: {verdict.reason}")
    return not reasons, "; ".join(reasons) or f"every watched candidate's log Z converged (ε = {epsilon})"


# --------------------------------------------------------------------------- the claim
def repetition_claims(pairs: dict[str, np.ndarray], documents: np.ndarray, level: float, resamples: int,
                      seed: int) -> dict:
    """The claim "the joint gives a repeated token less probability than the base LM", as paired
    intervals over documents of d = log P_K,joint(x_t) − log P_K,base(x_t).

    `pairs` holds per pair the plug-in d and its Eq. 4 ends for the repetition and the control
    context: rep, rep_low, rep_high, ctrl, ctrl_low, ctrl_high. A verdict uses the end of d that
    is least favourable to it, so the estimate's own uncertainty cannot make a claim hold.
    """
    from pipeline.core.seeds import bootstrap_seed
    from pipeline.estimation.intervals import FAILS, HOLDS, INCONCLUSIVE, studentized_mean_interval

    def interval(values: np.ndarray, name: str) -> dict | None:
        result = studentized_mean_interval(values, documents, level, resamples,
                                           bootstrap_seed(seed, f"stepwise/{name}"))
        if result is None:
            return None
        return dict(zip(("mean", "low", "high"), (round(v, 4) for v in result), strict=True))

    def below_zero(point: np.ndarray, high: np.ndarray, low: np.ndarray, name: str) -> dict:
        est, pessimistic, optimistic = interval(point, name), interval(high, name), interval(low, name)
        if pessimistic is None or optimistic is None:
            verdict = INCONCLUSIVE
        elif pessimistic["high"] < 0:
            verdict = HOLDS
        elif optimistic["low"] > 0:
            verdict = FAILS
        else:
            verdict = INCONCLUSIVE
        return {"mean_log_ratio": est, "upper_end_interval": pessimistic, "lower_end_interval": optimistic,
                "share_lower": interval((point < 0).astype(np.float64), name + "/share"),
                "share_surely_lower": round(float((high < 0).mean()), 4) if len(high) else None,
                "verdict": verdict}

    rep, ctrl = (np.asarray(pairs[k], np.float64) for k in ("rep", "ctrl"))
    out = {
        "pairs": len(rep), "documents": len(set(documents.tolist())), "level": level, "resamples": resamples,
        "repetition": below_zero(rep, np.asarray(pairs["rep_high"]), np.asarray(pairs["rep_low"]), "rep"),
        "control": below_zero(ctrl, np.asarray(pairs["ctrl_high"]), np.asarray(pairs["ctrl_low"]), "ctrl"),
        "repetition_minus_control": below_zero(
            rep - ctrl, np.asarray(pairs["rep_high"]) - np.asarray(pairs["ctrl_low"]),
            np.asarray(pairs["rep_low"]) - np.asarray(pairs["ctrl_high"]), "diff"),
    }
    out["verdict"] = out["repetition_minus_control"]["verdict"]
    return out


def log_ratio_at(estimate: StepEstimate, index: int) -> tuple[float, float, float]:
    """(plug-in, low, high) of log P_K,joint − log P_K,base at one candidate."""
    base = float(estimate.base[index])
    return (float(estimate.point[index]) - base, float(estimate.low[index]) - base,
            float(estimate.high[index]) - base)
