"""The report's other sections as template context (plain values, table rows as ready Markdown
cells): the claims, the captions of Figures 1-3, the §4.3 sample statistics and how they moved
from an earlier run, the example generations (Tables 5-6), Table 3 (stepwise), the stage wall
times and the provenance."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.core.variants import display_name
from pipeline.reporting.cells import duration, fmt, md_escape, ordered
from pipeline.reporting.claims import VERDICTS, Claim, check_claims, not_converged_why, verdict_label
from pipeline.reporting.figures import SOURCE_NAMES, figure_names
from pipeline.reporting.inputs import DatasetResults, StageTime
from pipeline.reporting.provenance import Provenance

PREFIX_CHARS = 400  # the end of each example's prefix shown (Tables 5–6 show ~120 tokens)


def sample_stats(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """The §4.3 numbers behind Figures 2 (right) and 3."""
    rows = []
    for d in datasets:
        rep = _repetition(d.generation)
        dens = d.generation.get("loglik_density", {})
        for s in ("real", "base", "joint"):
            unique = [f"{r[s]:.1f}" if s in r else "—" for r in d.unique_ngrams]
            means = [dens.get(k, {}).get("sources", {}).get(s, {}).get("mean") for k in ("base_lm", "joint")]
            rows.append([md_escape(d.name), SOURCE_NAMES[s], *unique,
                         f"{100 * rep[s]:.2f}%" if s in rep else "—", fmt(means[0]), fmt(means[1])])
    notes = [{"name": d.name, "windows": g.get("windows", "?"), "energy": display_name(g.get("energy", "?")),
              "n_gen": g.get("n_gen", "?"), "top_k": g.get("top_k", "?"),
              "ess_mean": fmt(g.get("ess", {}).get("mean")), "ess_min": fmt(g.get("ess", {}).get("min"))}
             for d in datasets for g in [d.generation]]
    return {"ns": [r["n"] for r in (datasets[0].unique_ngrams if datasets else [])], "rows": rows, "notes": notes}


def dataset_claims(d: DatasetResults) -> list[Claim]:
    """One dataset's claims as the report states them: variants not applicable and energies that
    did not learn carry no verdict. The report stage's summary reads these too."""
    return check_claims(d.evaluation, d.generation, d.not_applicable, d.did_not_learn)


def claims_table(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Every claim of the paper (pipeline.reporting.claims) with each dataset's verdict, claim by
    claim, and each dataset's (verdict, count) tally."""
    by_claim: dict[str, list[list[str]]] = {}
    counts = []
    for d in datasets:
        claims = dataset_claims(d)
        for c in claims:
            by_claim.setdefault(c.claim, []).append(
                [md_escape(c.claim), md_escape(d.name), c.verdict, md_escape(c.evidence), md_escape(c.why) or "—"])
        counts.append({"name": d.name,
                       "tally": [(v, n) for v in VERDICTS if (n := sum(c.verdict == v for c in claims))]})
    return {"rows": [row for rows in by_claim.values() for row in rows], "counts": counts}


def _repetition(generation: dict) -> dict[str, float]:
    """Repeated 4-gram rate per source (the key names the n-gram and scope, e.g. _4gram_with_prefix)."""
    key = next((k for k in generation if k.startswith("repetition_rate_")), None)
    return generation.get(key, {}) if key else {}


def _sample_measures(generation: dict) -> dict[str, dict[str, str]]:
    """The §4.3 numbers compared across runs: measure -> source (base, joint) -> formatted value."""
    sequence = generation.get("unique_ngram_pct", {}).get("sequence", {})
    measures = {f"unique {n}-grams % (per sequence)": {s: f"{sequence[n][s]:.1f}" for s in ("base", "joint")
                                                      if s in sequence[n]}
                for n in sorted(sequence, key=int)}
    measures["repeated 4-grams (with prefix)"] = {s: f"{100 * v:.2f}%" for s, v in _repetition(generation).items()}
    density = generation.get("loglik_density", {})
    # Figure 3's comparison: each kind of sample scored by the model that generated it.
    gaps = {"base": density.get("base_lm", {}).get("mean_gap", {}).get("base"),
            "joint": density.get("joint", {}).get("mean_gap", {}).get("joint")}
    measures["Figure 3 mean gap to real text"] = {s: fmt(v) for s, v in gaps.items() if v is not None}
    return measures


BASELINE_MUST_MATCH = ("energy", "n_gen", "top_k", "windows")  # generate settings a baseline must share


def before_after(datasets: Sequence[DatasetResults]) -> dict[str, Any] | None:
    """The sample statistics of an earlier run (baseline_metrics.json) against this run's; None
    without one."""
    rows, notes, skipped = [], [], []
    for d in (d for d in datasets if d.generation_baseline is not None):
        # Only a baseline generated the same way is a "before": another energy or sample budget
        # (e.g. params/smollm2.yaml against the Brown default's measurement) is not compared.
        differ = [f"{key} {d.generation_baseline['metrics'].get(key)} vs {d.generation.get(key)}"
                  for key in BASELINE_MUST_MATCH
                  if d.generation_baseline["metrics"].get(key) != d.generation.get(key)]
        if differ:
            skipped.append({"name": d.name, "label": d.generation_baseline["label"], "differ": "; ".join(differ)})
            continue
        before, after = _sample_measures(d.generation_baseline["metrics"]), _sample_measures(d.generation)
        for measure in dict.fromkeys([*after, *before]):
            was, now = before.get(measure, {}), after.get(measure, {})
            rows.append([md_escape(d.name), measure,
                         *(f"{was.get(s, '—')} → {now.get(s, '—')}" for s in ("base", "joint"))])
        notes.append({"name": d.name, "label": d.generation_baseline["label"],
                      "commit": d.generation_baseline.get("commit")})
    return {"rows": rows, "notes": notes, "skipped": skipped} if rows or skipped else None


def examples(d: DatasetResults) -> dict[str, Any]:
    """Example generations laid out as the paper's Tables 5–6 (prefix; BASE LM, worst, joint, gold):
    each sample's cells (text, energy, log P_LM)."""
    joint = display_name(d.generation.get("energy", "joint"))
    windows = []
    for row in d.examples:
        prefix = row["prefix_text"].strip()
        windows.append({
            "window_id": row["window_id"],
            "prefix": ("…" + prefix[-PREFIX_CHARS:]) if len(prefix) > PREFIX_CHARS else prefix,
            **{key: [md_escape(row[f"{key}_text"].strip()), f"{row[f'{key}_energy']:.3f}",
                     f"{row[f'{key}_lm_logprob']:.2f}"] for key in ("base", "worst", "joint", "gold")},
        })
    return {"name": d.name, "joint": joint, "short": joint.removeprefix("JOINT "), "windows": windows,
            "ess": [f"{r['ess']:.1f}" for r in d.examples]}


def stepwise(d: DatasetResults) -> dict[str, Any]:
    """Table 3 and the repetition claim's rows (pipeline/generation/stepwise.py, `repetition_claims`)."""
    m = d.stepwise
    if m is None or d.table3 is None:
        return {"name": d.name, "table3": None}
    claim = m["claim"]

    def cell(entry: dict | None) -> str:
        return "—" if entry is None else f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"

    def share(entry: dict | None) -> str:
        if entry is None:
            return "—"
        return f"{entry['mean']:.2f} [{max(0.0, entry['low']):.2f}, {min(1.0, entry['high']):.2f}]"

    rows = [[label, cell(claim[key]["mean_log_ratio"]), share(claim[key]["share_lower"]), claim[key]["verdict"]]
            for label, key in (("repetition", "repetition"), ("control", "control"),
                               ("repetition − control", "repetition_minus_control"))]
    return {"name": d.name, "table3": d.table3, "pairs": claim["pairs"], "documents": claim["documents"],
            "candidates": m["candidates"], "samples": m["samples"], "level": f"{claim['level']:.0%}",
            "converged": f"{m['contexts_converged']} of {m['contexts']}", "rows": rows, "verdict": claim["verdict"]}


def stage_times(times: Sequence[StageTime]) -> dict[str, Any]:
    rows, total, recorded = [], 0.0, 0
    for t in times:
        if t.seconds is not None:
            total += t.seconds
            recorded += 1
            cell = f"{duration(t.seconds)} ({t.seconds:.1f} s)"
        else:
            cell = t.status
        rows.append([t.stage, cell, f"`{t.path}`"])
    return {"rows": rows, "total": f"{duration(total)} ({total:.1f} s)", "recorded": recorded, "count": len(times)}


def provenance_context(p: Provenance) -> dict[str, Any]:
    """The provenance and its params file in a code fence longer than any backtick run in it."""
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", p.params_text)), default=0) + 1)
    return {"provenance": p, "fence": fence, "params_text": p.params_text.rstrip("\n")}


def _convergence_note(joint: dict) -> str:
    converged = joint.get("convergence", {}).get("converged")
    return not_converged_why(joint) if converged is False else f"log Z {verdict_label(joint)}"


def figure1_caption(d: DatasetResults, figures: dict[str, bytes]) -> dict[str, Any]:
    """What Figure 1's caption tells for this dataset; the star and its bar only where the exact
    last position was computed."""
    name = figure_names(d.name)["fig1"]
    pos = d.evaluation.get("positions", {})
    energies = [{"model": display_name(e), "windows": pos[e].get("windows", "?"), "samples": pos[e].get("samples", "?"),
                 "converged": pos[e].get("positions_converged"), "positions": pos[e].get("positions", "?")}
                for e in ordered(pos)]
    exact = [(display_name(e), pos[e]["last_position"].get("exact_windows", "?")) for e in ordered(pos)
             if "exact_ppl" in pos[e].get("last_position", {})]
    return {"name": d.name, "file": name if name in figures else None, "energies": energies, "exact": exact}


def figure_captions(d: DatasetResults) -> dict[str, Any]:
    """Figures 2 and 3 of one dataset: file names, the ranges' log Z verdicts, Figure 3's gaps."""
    names = figure_names(d.name)
    joint = d.evaluation.get("joint", {})
    gaps = {k: d.generation.get("loglik_density", {}).get(k, {}).get("mean_gap", {}) for k in ("base_lm", "joint")}
    return {"name": d.name, "left": names["fig2_left"], "right": names["fig2_right"], "file": names["fig3"],
            "verdicts": [(display_name(e), _convergence_note(joint[e])) for e in ordered(joint)],
            "base_gap": fmt(gaps["base_lm"].get("base")), "joint_gap": fmt(gaps["joint"].get("joint"))}
