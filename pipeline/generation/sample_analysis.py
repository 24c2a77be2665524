"""Statistics of generated text (paper §4.3): unique n-grams, repetitions, log-likelihood densities.

* Figure 2 (right): percentage of unique n-grams, n = 1..4, in real text and in samples of
  the base LM and of the joint model ("the joint model has a slightly higher percentage of
  unique n-grams compared to the baseline language model with n = 2, 3, 4, although still
  not as high as the original human generated text").
* Figure 3: densities of sequence log-likelihoods of real, base-sample and joint-sample
  continuations, scored by the base LM (left) and by the joint model (right), with the
  difference of means between real data and samples (paper: 21.64 under the base LM, 6.20
  under the joint model: "a necessary condition for the model to match the data distribution").

Token sequences are anything iterable of hashable tokens (token ids from the generations
table, or words); all functions are pure and return plain Python/numpy values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SOURCES = ("real", "base", "joint")
# Which generations-table column holds each source's continuation.
SOURCE_COLUMN = {"real": "gold", "base": "base", "joint": "joint"}


def _ngrams(tokens: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _as_lists(token_sequences: Iterable[Sequence[Any]]) -> list[list[Any]]:
    out = []
    for seq in token_sequences:
        seq = seq.tolist() if hasattr(seq, "tolist") else list(seq)
        out.append(seq)
    return out


def unique_ngram_percentage(token_sequences: Iterable[Sequence[Any]], n: int, scope: str = "sequence") -> float:
    """Percentage (0–100) of n-grams that are unique, as in Figure 2 (right).

    scope="sequence" (default): 100 · Σ_i |distinct n-grams of x_i| / Σ_i |n-grams of x_i|,
      i.e. n-grams are deduplicated WITHIN each continuation and the counts are pooled over
      continuations (equal to the per-continuation mean when all have the same length, as
      the T − p = 40-token continuations do). The paper places Figure 2 (right) under
      "Repetitions. A typical artifact of auto-regressive language models is their tendency
      to repeat phrases": a property of one generation. It is 100 − 100·seq-rep-n of
      Welleck et al. (2019), and it does not depend on how many prefixes are evaluated, so
      a laptop-sized test set is comparable with the paper's.
    scope="pooled": 100 · |∪_i n-grams of x_i| / Σ_i |n-grams of x_i| over all continuations
      (also penalises generic phrases reused across prefixes; shrinks as more text is pooled).

    Sequences shorter than n contribute no n-grams; ValueError if there are none at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if scope not in ("sequence", "pooled"):
        raise ValueError(f"scope must be 'sequence' or 'pooled', got {scope!r}")
    total = 0
    distinct = 0
    pool: set[tuple[Any, ...]] = set()
    for seq in _as_lists(token_sequences):
        grams = _ngrams(seq, n)
        total += len(grams)
        if scope == "sequence":
            distinct += len(set(grams))
        else:
            pool.update(grams)
    if total == 0:
        raise ValueError(f"no {n}-grams: every sequence is shorter than {n} tokens")
    if scope == "pooled":
        distinct = len(pool)
    return 100.0 * distinct / total


def unique_ngram_rows(
    sources: Mapping[str, Iterable[Sequence[Any]]], ns: Sequence[int] = (1, 2, 3, 4), scope: str = "sequence"
) -> list[dict[str, float]]:
    """Figure 2 (right) as TSV rows for a DVC bar plot: {"n": n, <source>: unique %, ...}."""
    lists = {name: _as_lists(seqs) for name, seqs in sources.items()}
    rows = []
    for n in ns:
        row: dict[str, float] = {"n": n}
        for name, seqs in lists.items():
            row[name] = unique_ngram_percentage(seqs, n, scope)
        rows.append(row)
    return rows


def repetition_rate(
    continuations: Iterable[Sequence[Any]], n: int = 4, prefixes: Iterable[Sequence[Any]] | None = None
) -> float:
    """Fraction (0–1) of continuation n-grams that already occurred earlier in the same window.

    For each continuation token t whose n-gram x_{t−n+1..t} fits in the window (prefix +
    continuation when `prefixes` is given, else the continuation alone), the n-gram is a
    repetition if the same n-gram occurs at an earlier position of that window. The rate
    is repetitions / such n-grams, pooled over windows. With the prefix it also counts
    copying of phrases from the context, a typical LM loop ("tendency to repeat phrases",
    §4.3); without it, it equals 1 − unique_ngram_percentage(·, n, "sequence") / 100.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    conts = _as_lists(continuations)
    prefs = _as_lists(prefixes) if prefixes is not None else [[] for _ in conts]
    if len(prefs) != len(conts):
        raise ValueError(f"{len(prefs)} prefixes for {len(conts)} continuations")
    repeats = 0
    total = 0
    for prefix, cont in zip(prefs, conts, strict=True):
        window = prefix + cont
        seen: set[tuple[Any, ...]] = set()
        for start in range(len(window) - n + 1):
            gram = tuple(window[start : start + n])
            if start + n - 1 >= len(prefix):  # the n-gram ends in the continuation
                total += 1
                repeats += gram in seen
            seen.add(gram)
    if total == 0:
        raise ValueError(f"no {n}-grams end in a continuation")
    return repeats / total


def joint_log_likelihood(lm_logprob: Any, energy: Any, log_z: Any = 0.0) -> np.ndarray:
    """log P(x | prefix) = log P_LM(x | prefix) − E(x) − log Z(prefix) (the residual EBM, Eq. 2).

    With log_z omitted (0) the value is exact up to the per-prefix constant log Z; a
    difference of means between sources scored on the SAME prefixes is then exact, because
    every source subtracts the same Σ log Z.
    """
    return np.asarray(lm_logprob, np.float64) - np.asarray(energy, np.float64) - np.asarray(log_z, np.float64)


@dataclass(frozen=True)
class DensitySummary:
    """Figure 3 (one panel): histograms on shared bins plus per-source statistics."""

    rows: list[dict[str, float]]  # TSV rows: {"loglik": bin centre, <source>: density, ...}
    metrics: dict[str, Any]  # {"sources": {s: {mean, std, count}}, "mean_difference": {...}, "mean_gap": {...}}


def density_summary(
    log_likelihoods: Mapping[str, Any], bins: int = 40, reference: str = "real"
) -> DensitySummary:
    """Densities and mean differences of sequence log-likelihoods per source (Figure 3).

    All sources share one set of `bins` equal-width bins over their pooled range, so the
    curves are comparable on one plot; each density integrates to 1 (numpy density=True).
    metrics["mean_difference"][s] = mean(reference) − mean(s) for every other source s,
    signed; metrics["mean_gap"][s] = its absolute value, the number the paper reports
    (21.64 for BASE LM samples vs real text under the base LM, 6.20 for joint samples under
    the joint model). std is the population standard deviation (ddof = 0).
    """
    if reference not in log_likelihoods:
        raise ValueError(f"reference source {reference!r} not among {sorted(log_likelihoods)}")
    values = {s: np.asarray(v, dtype=np.float64).reshape(-1) for s, v in log_likelihoods.items()}
    for s, v in values.items():
        if v.size == 0:
            raise ValueError(f"source {s!r} has no log-likelihoods")
        if not np.isfinite(v).all():
            raise ValueError(f"source {s!r} has {int((~np.isfinite(v)).sum())} non-finite log-likelihood(s)")
    pooled = np.concatenate(list(values.values()))
    low, high = float(pooled.min()), float(pooled.max())
    if low == high:  # one value everywhere: give the histogram a width so it is defined
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    densities = {s: np.histogram(v, bins=edges, density=True)[0] for s, v in values.items()}
    rows = [{"loglik": float(c), **{s: float(d[i]) for s, d in densities.items()}} for i, c in enumerate(centres)]
    stats = {s: {"mean": float(v.mean()), "std": float(v.std()), "count": int(v.size)} for s, v in values.items()}
    ref_mean = stats[reference]["mean"]
    diff = {s: ref_mean - st["mean"] for s, st in stats.items() if s != reference}
    return DensitySummary(
        rows=rows,
        metrics={
            "reference": reference,
            "sources": stats,
            "mean_difference": diff,
            "mean_gap": {s: abs(d) for s, d in diff.items()},
        },
    )


def loglik_by_source(table: Any, scorer: str, log_z: Any = 0.0) -> dict[str, np.ndarray]:
    """Sequence log-likelihoods of real/base/joint continuations from a generations table.

    scorer="base_lm": Σ log P_LM (Figure 3, left); scorer="joint": log P_LM − E − log Z
    (Figure 3, right; log_z per row, default 0 — see joint_log_likelihood).
    """
    if scorer not in ("base_lm", "joint"):
        raise ValueError(f"scorer must be 'base_lm' or 'joint', got {scorer!r}")
    out = {}
    for source, column in SOURCE_COLUMN.items():
        lm = np.asarray(table.column(f"{column}_lm_logprob").to_numpy(), np.float64)
        if scorer == "base_lm":
            out[source] = lm
        else:
            energy = np.asarray(table.column(f"{column}_energy").to_numpy(), np.float64)
            out[source] = joint_log_likelihood(lm, energy, log_z)
    return out


def sample_metrics(table: Any, ns: Sequence[int] = (1, 2, 3, 4), repetition_n: int = 4) -> dict[str, Any]:
    """Every §4.3 number for one (non-empty) generations table, as a JSON-able metrics dict."""
    ids = {source: table.column(f"{column}_ids").to_pylist() for source, column in SOURCE_COLUMN.items()}
    prefixes = table.column("prefix_ids").to_pylist()
    unique = {
        scope: {f"{n}": {s: unique_ngram_percentage(seqs, n, scope) for s, seqs in ids.items()} for n in ns}
        for scope in ("sequence", "pooled")
    }
    repetition = {s: repetition_rate(seqs, repetition_n, prefixes) for s, seqs in ids.items()}
    density = {scorer: density_summary(loglik_by_source(table, scorer)).metrics for scorer in ("base_lm", "joint")}
    ess = np.asarray(table.column("ess").to_numpy(), np.float64)
    return {
        "windows": table.num_rows,
        "unique_ngram_pct": unique,
        f"repetition_rate_{repetition_n}gram_with_prefix": repetition,
        "loglik_density": density,
        "ess": {"mean": float(ess.mean()), "median": float(np.median(ess)), "min": float(ess.min())},
    }


def per_sequence_unique_pct(token_sequences: Iterable[Sequence[Any]], n: int) -> np.ndarray:
    """100 · |distinct n-grams| / |n-grams| of each sequence (nan where it has none)."""
    return np.asarray([unique_ngram_percentage([seq], n) if len(seq) >= n else math.nan
                       for seq in _as_lists(token_sequences)], dtype=np.float64)


def paired_sample_checks(table: Any, documents: np.ndarray, level: float, resamples: int, seed: int,
                         ns: Sequence[int] = (1, 2, 3, 4)) -> dict[str, Any]:
    """The §4.3 claims as paired intervals over the test documents of the prefixes.

    unique_ngrams[n]: mean over prefixes of (joint − BASE LM) unique n-gram % of the same prefix's
      two continuations; "more" holds when the interval is above 0, fails when below.
    closer_to_real: per prefix, the log-likelihood gap real − sample under the model that drew
      it (BASE LM samples under the base LM, joint samples under the joint model, log Z = 0: on
      one prefix it cancels in the difference); s = the sign of BASE LM's mean gap; the mean of
      s · (joint gap − BASE gap) below 0 means the joint samples sit closer to real text in
      Figure 3's sense, |mean gap| smaller. Decided only when both mean gaps share the sign.
    """
    from pipeline.core.seeds import bootstrap_seed
    from pipeline.estimation.intervals import document_count, studentized_mean_interval

    def interval(values: np.ndarray, name: str) -> dict[str, Any]:
        keep = np.isfinite(values)
        found = studentized_mean_interval(values[keep], documents[keep], level, resamples, bootstrap_seed(seed, name))
        if found is None:
            return {"mean": float(np.nanmean(values)), "ci": None}
        mean, low, high = found
        return {"mean": round(mean, 5), "ci": [round(low, 5), round(high, 5)]}

    ids = {source: table.column(f"{column}_ids").to_pylist() for source, column in SOURCE_COLUMN.items()}
    unique = {f"{n}": interval(per_sequence_unique_pct(ids["joint"], n) - per_sequence_unique_pct(ids["base"], n),
                               f"unique{n}") for n in ns}
    base_gap = loglik_by_source(table, "base_lm")
    joint_gap = loglik_by_source(table, "joint")
    g_base = base_gap["real"] - base_gap["base"]
    g_joint = joint_gap["real"] - joint_gap["joint"]
    sign = 1.0 if g_base.mean() >= 0 else -1.0
    closer = interval(sign * (g_joint - g_base), "closer")
    closer["same_sign"] = bool(np.sign(g_joint.mean()) == np.sign(g_base.mean()))
    closer["mean_gap"] = {"base": round(float(abs(g_base.mean())), 4), "joint": round(float(abs(g_joint.mean())), 4)}
    return {"level": level, "resamples": resamples, "documents": document_count(documents, len(documents)),
            "unique_ngrams": unique, "closer_to_real": closer}

