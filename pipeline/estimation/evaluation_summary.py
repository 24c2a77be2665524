"""Table 1, Figure 1 and Figure 2 (left) of one dataset, from the evaluate stage's arrays.

`summarise` combines the LM log-probs, the energies of the real windows and of the LM samples
(pipeline/estimation/evaluation_work.py) with the estimators: the [T_n, U_n] ranges (Eq. 4), the
convergence verdict of each with its PSIS diagnostics (pipeline/estimation/convergence.py), the
self-normalised perplexity (log Z = 0, Theorem 1), paired intervals over test documents for every
row against BASE LM and for every pair of rows (pipeline/estimation/intervals.py), and Eq. 5 per
position.

What an interval covers: the sampling of test windows from their documents, with everything else
fixed (the trained models, the LM samples behind log Z). It does not cover what changes between
two honest runs of the pipeline (training seeds, bf16 vs fp32 numerics): that is the run-to-run
spread, measured separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.io import write_json, write_text, write_tsv
from pipeline.core.seeds import bootstrap_seed
from pipeline.core.variants import DISPLAY_NAMES
from pipeline.estimation.bounds import log_partition_bounds
from pipeline.estimation.convergence import RULE, convergence_verdict, doubling_counts
from pipeline.estimation.diagnostics import stop_reason
from pipeline.estimation.evaluation import (
    JointRange,
    exact_last_logprob,
    format_parameters,
    per_position_logprob_bounds,
    position_perplexity,
)
from pipeline.estimation.intervals import METHOD, below_verdict, document_count, paired_ratio_interval
from pipeline.estimation.joint import joint_nll_given_log_z, perplexity_range


def self_normalised_perplexity(lm_logprob: np.ndarray, real_energy: np.ndarray, tokens: int) -> float:
    """Per-token perplexity of P_LM · exp(−E) taking log Z = 0.

    Theorem 1: at NCE's optimum the energy is self-normalised (Z = 1), so this is what the joint
    model's perplexity would be if training had reached it; a reference point, not a bound.
    """
    return math.exp(-(np.asarray(lm_logprob, np.float64) - np.asarray(real_energy, np.float64)).sum() / tokens)


def row_nlls(lm_logprobs: dict[str, np.ndarray], joint_nll: dict[str, tuple[np.ndarray, np.ndarray]]
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every Table 1 row's per-window sequence NLL as (low end, high end): an LM row's both ends
    are its exact NLL; a joint row's are its T_n and U_n ends."""
    rows = {v: (-lp.sum(axis=1), -lp.sum(axis=1)) for v, lp in lm_logprobs.items()}
    return rows | joint_nll


def paired_comparisons(rows: dict[str, tuple[np.ndarray, np.ndarray]], documents: np.ndarray, L: int, boot,
                       seed: int) -> dict[str, dict]:
    """For every ordered pair (a, b) of rows: the paired interval of ppl(a) / ppl(b) taking a at its
    HIGH end and b at its LOW end (so "a below b" is claimed only when a's worst case beats b's best
    case, window by window), and the verdict of "a below b" from it."""
    out = {}
    for a, (_, a_high) in rows.items():
        for b, (b_low, _) in rows.items():
            if a == b:
                continue
            ci = paired_ratio_interval(a_high, b_low, documents, L, boot.level, boot.resamples,
                                       bootstrap_seed(seed, f"{a}/{b}"))
            out[f"{a}/{b}"] = {"ratio": None if ci is None else round(ci.point, 5),
                               "ci": None if ci is None else ci.as_list(), "below": below_verdict(ci)}
    return out


@dataclass
class EvaluationInputs:
    """Everything `summarise` combines, on N test windows of T tokens (prefix p, L = T − p)."""

    dataset: str
    window_ids: np.ndarray  # [N]
    window_documents: np.ndarray  # [N] the document each window was cut from: the resampling unit
    windows: np.ndarray  # [N, T]
    prefix_len: int
    available_windows: int  # test windows in the file; N of them were scored
    lm_logprobs: dict[str, np.ndarray]  # LM variant -> [N, L] log P(x_t | x_<t)
    parameters: dict[str, int]  # variant -> saved parameter count
    energies: dict[str, dict[str, np.ndarray]]  # energy -> real [N], samples [N, n], positions, last_candidates
    position_rows: np.ndarray  # rows of the Figure 1 windows
    exact_rows: np.ndarray  # the first of them, last position enumerated
    last_lm: np.ndarray | None  # [E, V] log P_LM(v | x_<T) on the exact rows


@dataclass(frozen=True)
class _Baseline:
    """BASE LM on the N test windows: what every Table 1 row is compared with."""

    seq: np.ndarray  # [N] log P_LM of each window's continuation
    ppl: float
    tokens: int  # N · L
    L: int
    documents: np.ndarray  # [N] the resampling unit of the intervals

    def vs(self, ppl: float) -> float:
        """`ppl` relative to BASE LM's, in percent."""
        return round(100 * (ppl / self.ppl - 1), 3)

    def ratio_ci(self, nll: np.ndarray, name: str, boot, seed: int) -> list[float] | None:
        ci = paired_ratio_interval(nll, -self.seq, self.documents, self.L, boot.level, boot.resamples,
                                   bootstrap_seed(seed, name))
        return None if ci is None else ci.as_list()


def _nll_by_samples(base_seq: np.ndarray, real: np.ndarray, log_weights: np.ndarray) -> dict[int, tuple]:
    """Per-prefix T_k, U_k once for every k of Figure 2 (left), from the draws' log weights -E [N, n];
    Table 1 is its last point, k = n: k -> (NLL low end [N], NLL high end [N], mean lower log Z,
    mean upper log Z)."""
    nll = {}
    for k in doubling_counts(log_weights.shape[1]):
        lower_log_z, upper_log_z = log_partition_bounds(torch.from_numpy(log_weights[:, :k]))
        nll[k] = (*joint_nll_given_log_z(base_seq, real, lower_log_z, upper_log_z),
                  float(lower_log_z.mean()), float(upper_log_z.mean()))
    return nll


def _joint_row(variant: str, e: dict[str, np.ndarray], base: _Baseline, parameters: dict[str, int], cfg,
               seed: int) -> tuple[dict, tuple[np.ndarray, np.ndarray], dict]:
    """One energy's Table 1 row: (its metrics, its per-window NLL ends, its Figure 2 curve)."""
    n = e["samples"].shape[1]  # n_eval, or fewer where the draw stopped as futile
    log_weights = -e["samples"]
    nll = _nll_by_samples(base.seq, e["real"], log_weights)
    nll_low, nll_high = nll[n][0].numpy(), nll[n][1].numpy()
    joint = JointRange(*perplexity_range(nll_low, nll_high, base.tokens))
    verdict = convergence_verdict(log_weights, cfg.convergence.epsilon, cfg.convergence.min_samples)
    self_normalised = self_normalised_perplexity(base.seq, e["real"], base.tokens)
    # the verdict fitted k̂ on these same draws: the stop's reason reads it rather than fitting again
    stopped = (stop_reason(n, verdict.diagnostics.mean_khat, cfg.convergence.stop_khat)
               if n < cfg.n_eval[variant] else None)
    metrics = {
        "n_eval": n,
        "n_eval_cap": cfg.n_eval[variant],
        "stopped": stopped,
        "ppl_low": round(joint.low, 3),
        "ppl_high": round(joint.high, 3),
        "vs_base_pct_low": base.vs(joint.low),
        "vs_base_pct_high": base.vs(joint.high),
        "high_below_base": joint.high < base.ppl,
        "self_normalised_ppl": round(self_normalised, 3),
        "vs_base_pct_self_normalised": base.vs(self_normalised),
        # The T_n end against BASE LM is no pair of `paired` (a row enters it at its U_n end).
        "ratio_to_base_ci_low": base.ratio_ci(nll_low, f"{variant}/low", cfg.bootstrap, seed),
        "convergence": verdict.as_dict() | ({"reason": f"{stopped}; {verdict.reason}"} if stopped else {}),
        "verdict": verdict.label,
        "parameters": parameters["base"] + parameters[variant],
        "energy_parameters": parameters[variant],
        "mean_energy_real": round(float(e["real"].mean()), 4),
        "mean_energy_lm_samples": round(float(e["samples"].mean()), 4),
    }
    curve = {k: (JointRange(*perplexity_range(low, high, base.tokens)), t, u) for k, (low, high, t, u) in nll.items()}
    return metrics, (nll_low, nll_high), curve


def summarise(inputs: EvaluationInputs, cfg, seed: int) -> dict:
    """metrics.json, Table 1 and the Figure 1 / Figure 2 (left) rows from the evaluate stage's arrays."""
    x = inputs
    N, L = x.windows.shape[0], x.windows.shape[1] - x.prefix_len
    tokens = N * L
    base_seq = x.lm_logprobs["base"].sum(axis=1)
    base = _Baseline(base_seq, float(np.exp(-base_seq.sum() / tokens)), tokens, L, x.window_documents)
    boot = cfg.bootstrap

    metrics_lm, metrics_joint, curves, joint_nll = {}, {}, {}, {}
    for variant, logprobs in x.lm_logprobs.items():
        ppl = float(np.exp(-logprobs.sum() / tokens))
        metrics_lm[variant] = {"ppl": round(ppl, 3), "parameters": x.parameters[variant]}
    for variant, e in x.energies.items():
        metrics_joint[variant], joint_nll[variant], curves[variant] = _joint_row(variant, e, base, x.parameters,
                                                                                 cfg, seed)

    paired = paired_comparisons(row_nlls(x.lm_logprobs, joint_nll), x.window_documents, L, boot, seed)
    for variant in metrics_lm.keys() - {"base"}:
        metrics_lm[variant]["ratio_to_base_ci"] = paired[f"{variant}/base"]["ci"]
    for variant in metrics_joint:
        metrics_joint[variant]["ratio_to_base_ci_high"] = paired[f"{variant}/base"]["ci"]
    positions = position_summary(x, cfg)
    metrics = {
        "dataset": x.dataset,
        "test_windows": N,
        "test_windows_available": x.available_windows,  # N is evaluate.windows of them, evenly spaced
        "continuation_tokens": tokens,
        "n_eval": {v: cfg.n_eval[v] for v in x.energies},
        "convergence_epsilon": cfg.convergence.epsilon,
        "convergence_rule": RULE.format(min_samples=cfg.convergence.min_samples, epsilon=cfg.convergence.epsilon),
        "bootstrap": {"resamples": boot.resamples, "seed": seed, "level": boot.level, "method": METHOD,
                      "unit": "document", "documents": document_count(x.window_documents, N),
                      "covers": "test-window sampling only (models and LM samples fixed), not run-to-run spread"},
        "paired": paired,
        "perplexity": metrics_lm,
        "joint": metrics_joint,
        "positions": positions["metrics"],
    }
    return {
        "metrics": metrics,
        "table1": table1_markdown(metrics),
        "ppl_vs_samples": samples_rows(curves),
        "positions": positions["rows"],
        "last_position": positions["last_rows"],
    }


def samples_rows(curves: dict[str, dict[int, tuple[JointRange, float, float]]]) -> list[dict]:
    """Figure 2 (left) as TSV rows: one per n, empty cells where an energy used fewer samples."""
    rows = []
    for k in sorted({k for points in curves.values() for k in points}):
        row: dict = {"samples": k}
        for variant, points in curves.items():
            joint, t, u = points.get(k, (None, None, None))
            row[f"{variant}_ppl_low"] = "" if joint is None else joint.low
            row[f"{variant}_ppl_high"] = "" if joint is None else joint.high
            row[f"{variant}_mean_log_z_lower"] = "" if t is None else t
            row[f"{variant}_mean_log_z_upper"] = "" if u is None else u
        rows.append(row)
    return rows


def position_summary(x: EvaluationInputs, cfg) -> dict:
    """Figure 1: per-position perplexity bounds (Eq. 5) and the exact last position where computed."""
    rows, last_rows, metrics = [], [], {}
    pos_rows, exact_rows = x.position_rows, x.exact_rows
    variants = [v for v in cfg.positions.energies if v in x.energies and "positions" in x.energies[v]]
    if not len(pos_rows) or not variants:
        return {"rows": rows, "last_rows": last_rows, "metrics": metrics}
    base_tok = x.lm_logprobs["base"][pos_rows]  # [W, L]
    base_pos = position_perplexity(base_tok)
    columns, converged = {}, {}
    for variant in variants:
        e = x.energies[variant]
        lower, upper = per_position_logprob_bounds(base_tok, e["real"][pos_rows], e["positions"])
        columns[variant] = (position_perplexity(upper), position_perplexity(lower))  # (ppl low, ppl high)
        converged[variant] = positions_converged(e["positions"], cfg.convergence)
        entry = {
            "windows": len(pos_rows),
            "samples": cfg.positions.samples,
            "last_position": {
                "converged": bool(converged[variant][-1]),  # its LM-sample expectation, by the log Z rule
                "base_ppl": round(float(base_pos[-1]), 3),
                "estimated_ppl_low": round(float(columns[variant][0][-1]), 3),
                "estimated_ppl_high": round(float(columns[variant][1][-1]), 3),
            },
            # Medians and counts: with few samples per position the U_n end is heavy-tailed.
            "median_gain_low": round(float(np.median(base_pos - columns[variant][1])), 3),
            "median_gain_high": round(float(np.median(base_pos - columns[variant][0])), 3),
            "positions_gain_in_both_bounds": int((columns[variant][1] < base_pos).sum()),
            "positions": len(base_pos),
            "positions_converged": int(converged[variant].sum()),
        }
        if len(exact_rows):
            k = len(exact_rows)
            exact = exact_last_logprob(x.last_lm, e["last_candidates"], x.windows[exact_rows, -1])
            exact_ppl = float(np.exp(-exact.mean()))
            est_low, est_high = float(np.exp(-upper[:k, -1].mean())), float(np.exp(-lower[:k, -1].mean()))
            entry["last_position"].update({
                "exact_windows": k,
                "exact_precision": "fp32",  # candidates scored in fp32 (EvaluationWork.energies)
                "exact_ppl": round(exact_ppl, 3),
                # exact vs the estimated range on the same windows: 0 inside, else % beyond the nearer end
                "exact_gap_pct": round(0.0 if est_low <= exact_ppl <= est_high else
                                       100 * (exact_ppl / (est_low if exact_ppl < est_low else est_high) - 1), 2),
                "base_ppl_on_exact_windows": round(float(np.exp(-base_tok[:k, -1].mean())), 3),
                "estimated_ppl_low_on_exact_windows": round(est_low, 3),
                "estimated_ppl_high_on_exact_windows": round(est_high, 3),
            })
            for i, row in enumerate(exact_rows):
                last_rows.append({
                    "window_id": int(x.window_ids[row]), "energy": variant,
                    "base_logprob": float(base_tok[i, -1]), "exact_logprob": float(exact[i]),
                    "estimated_logprob_lower": float(lower[i, -1]), "estimated_logprob_upper": float(upper[i, -1]),
                })
        metrics[variant] = entry
    for j in range(base_tok.shape[1]):
        row = {"position": int(x.prefix_len + j + 1), "base_ppl": float(base_pos[j])}
        for variant, (low, high) in columns.items():
            row[f"{variant}_ppl_low"], row[f"{variant}_ppl_high"] = float(low[j]), float(high[j])
            row[f"{variant}_gain_low"] = float(base_pos[j] - high[j])
            row[f"{variant}_gain_high"] = float(base_pos[j] - low[j])
            row[f"{variant}_converged"] = int(converged[variant][j])
        rows.append(row)
    return {"rows": rows, "last_rows": last_rows, "metrics": metrics}


def positions_converged(position_energies: np.ndarray, rule) -> np.ndarray:
    """Per position of Figure 1: did both expectations of Eq. 5 converge by the log Z rule? [L] bool.

    Column j of position_energies [W, L, s] holds the completions from token p + j on: the
    denominator at position j and the numerator at j − 1. Position j is converged when its
    denominator's column and (except at the last position, whose numerator is exact) its
    numerator's column both pass `convergence_verdict` over the W windows.

    The tolerance is Table 1's on the perplexity scale: Table 1 accepts a move of ε nats in the
    mean log Z of an L-token continuation, a factor exp(ε / L) on per-token perplexity; a column
    moves one position's log-probability, so the same factor there is ε / L nats (0.005 for the
    default's ε = 0.2, L = 40: ×1.005, where ε alone would be ×1.22).
    """
    e = np.asarray(position_energies, dtype=np.float64)
    epsilon = rule.epsilon / e.shape[1]
    column_ok = np.array([convergence_verdict(-e[:, j], epsilon, rule.min_samples).converged
                          for j in range(e.shape[1])])
    return column_ok & np.append(column_ok[1:], True)


def drawn_label(joint: dict) -> str:
    """A joint row's n as drawn: "1024 of 4096, the draw at n = 1024: mean … k̂ …" where the
    futility rule stopped it (metrics.json `stopped`), else just n. Table 1 and the report use it."""
    stopped = joint.get("stopped")
    n = joint["n_eval"]
    return f"{n} of {joint.get('n_eval_cap', '?')}, the draw {stopped.removeprefix('stopped ')}" if stopped else str(n)


def table1_markdown(metrics: dict) -> str:
    """Table 1 for one dataset: exact LM perplexity; joint ranges with their convergence verdict,
    the self-normalised reference point and the bootstrap interval of the ratio to BASE LM."""
    base = metrics["perplexity"]["base"]["ppl"]
    level = round(100 * metrics["bootstrap"]["level"])
    lines = [
        f"### Table 1 — {metrics['dataset']} (test: {metrics['test_windows']} windows, "
        f"{metrics['continuation_tokens']} continuation tokens)",
        "",
        f"| model | parameters | test perplexity | vs BASE LM | log Z | self-normalised (log Z = 0) | "
        f"ratio to BASE LM, {level}% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, row in metrics["perplexity"].items():
        vs = "—" if variant == "base" else f"{100 * (row['ppl'] / base - 1):+.2f}%"
        ci = "—" if variant == "base" or row["ratio_to_base_ci"] is None else "{:.3f}–{:.3f}".format(
            *row["ratio_to_base_ci"])
        lines.append(f"| {DISPLAY_NAMES[variant]} | {format_parameters(row['parameters'])} | {row['ppl']:.2f} | {vs} "
                     f"| exact | — | {ci} |")
    for variant, row in metrics["joint"].items():
        converged = row["convergence"]["converged"]
        vs = (f"{row['vs_base_pct_low']:+.2f}% … {row['vs_base_pct_high']:+.2f}%" if converged
              else "— (not converged)")
        low_ci, high_ci = row["ratio_to_base_ci_low"], row["ratio_to_base_ci_high"]
        ci = "—" if low_ci is None or high_ci is None else f"{low_ci[0]:.3f}–{high_ci[1]:.3f}"
        diag = row["convergence"]["diagnostics"]
        lines.append(
            f"| {DISPLAY_NAMES[variant]} | {format_parameters(row['parameters'] - row['energy_parameters'])}"
            f"+{format_parameters(row['energy_parameters'])} | {row['ppl_low']:.2f}–{row['ppl_high']:.2f} | {vs} "
            f"| {row['verdict']}; k̂ {diag['pooled_khat']:.2f}, ESS ≥ {diag['ess_min']:.0f} "
            f"| {row['self_normalised_ppl']:.2f} ({row['vs_base_pct_self_normalised']:+.2f}%) "
            f"| {ci} |"
        )
    n = ", ".join(f"{DISPLAY_NAMES[v]} {drawn_label(metrics['joint'][v]) if v in metrics['joint'] else k}"
                  for v, k in metrics["n_eval"].items())
    lines += [
        "",
        f"Joint ranges: log Z of each prefix from n BASE LM samples (full distribution; n: {n}), lower end with "
        f"T_n, upper end with U_n (Eq. 4). Perplexity is per continuation token. log Z verdict: "
        f"{metrics['convergence_rule']}. k̂: PSIS Pareto shape of the pooled importance weights; ESS: the smallest "
        f"prefix's effective sample size. A range that is not converged states no gain. The ratio interval is "
        f"paired, over the {metrics['bootstrap'].get('documents', '?')} test documents "
        f"({metrics['bootstrap'].get('method', 'bootstrap')}, {metrics['bootstrap']['resamples']} resamples; for "
        "joint rows, from the T_n end's lower end to the U_n end's upper end). It covers the sampling of test "
        "windows only; the models and the LM samples are held fixed.",
        "",
    ]
    return "\n".join(lines)


def write_evaluation(out: Path, result: dict, wall: dict[str, float]) -> None:
    """results/<dataset>/evaluation/: Figure 2 (left), Figure 1 and last-position TSVs, table1.md, metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(out / "ppl_vs_samples.tsv", result["ppl_vs_samples"])
    write_tsv(out / "position_ppl.tsv", result["positions"])
    write_tsv(out / "last_position.tsv", result["last_position"])
    write_text(out / "table1.md", result["table1"])
    write_json(out / "metrics.json", {**result["metrics"], "wall_seconds": wall})
