"""Table 1 of the report, built once for report.md (and so report.html): the headline lines, the
test perplexities with the datasets side by side, the reference points beside them (paired
intervals, self-normalised perplexity) and Figure 1's last-position check (estimate vs exact)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, display_name
from pipeline.estimation.evaluation import format_parameters
from pipeline.estimation.evaluation_summary import drawn_label
from pipeline.reporting.cells import fmt, md_escape, ordered
from pipeline.reporting.claims import ci_level, ci_text, exact_vs_range, not_converged_why, verdict_label
from pipeline.reporting.inputs import DatasetResults


def _n_eval(evaluation: dict, energy: str) -> Any:
    """LM samples per prefix behind an energy's log Z (older metrics: one n for every energy)."""
    joint = evaluation.get("joint", {}).get(energy, {})
    n = joint.get("n_eval", evaluation.get("n_eval", "?"))
    n = n.get(energy, "?") if isinstance(n, dict) else n
    return drawn_label(joint) if "n_eval" in joint else n


def _joint_gain(j: dict) -> str:
    """The 'vs BASE LM' cell of a joint range: a gain only from a converged log Z estimate."""
    if "convergence" not in j:
        return "— (convergence not checked)"
    if not j["convergence"]["converged"]:
        return "— (not converged)"
    return f"{j['vs_base_pct_low']:+.2f}% … {j['vs_base_pct_high']:+.2f}%"


def _diagnostics_note(j: dict) -> str:
    """'; k̂ 0.31, ESS ≥ 812 of 4096': the PSIS evidence beside a log Z verdict ('' in older metrics)."""
    diag = j.get("convergence", {}).get("diagnostics")
    if diag is None:
        return ""
    ess = diag["ess_min"]
    digits = 1 if ess < 10 else 0  # 2.5 of 4096 must not read as 2
    return f"; k̂ {diag['pooled_khat']:.2f}, ESS ≥ {ess:.{digits}f} of {diag['samples']}"


def headline(datasets: Sequence[DatasetResults]) -> list[str]:
    """One line per dataset on the best-placed joint model (BIT-LARGE*, else BIT-BASE*): its range
    against BASE LM with the paired interval and verdict. A range whose log Z did not converge says
    so first: its numbers state no gain."""
    lines = []
    for d in datasets:
        joint = d.evaluation.get("joint", {})
        base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
        variant = next((v for v in ("bit_large", "bit_star") if v in joint), None)
        if variant is None or base is None:
            continue
        j = joint[variant]
        converged = j.get("convergence", {}).get("converged") is not False
        pair = d.evaluation.get("paired", {}).get(f"{variant}/base", {})
        ci = pair.get("ci")
        # No verdict from an unconverged range: its interval is shown, not read.
        verdict = f", {pair.get('below', 'inconclusive')}" if converged else ""
        interval = "no paired interval" if ci is None else f"paired {ci_level(d.evaluation)} CI of the ratio to " \
            f"BASE LM [{ci[0]:.3f}, {ci[1]:.3f}]{verdict}"
        text = (f"{display_name(variant)} {fmt(j['ppl_low'])}–{fmt(j['ppl_high'])} vs BASE LM {fmt(base)} "
                f"({interval})")
        if not converged:
            lines.append(f"**{md_escape(d.name)}: log Z NOT CONVERGED, so this range states no gain** — "
                         f"{md_escape(text)}; {md_escape(not_converged_why(j))}")
        else:
            lines.append(f"**{md_escape(d.name)}**: {md_escape(text)}; {md_escape(verdict_label(j))}"
                         f"{md_escape(_diagnostics_note(j))}")
    return lines


def table1(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Table 1 with the datasets side by side: exact LM perplexity, joint [low–high] ranges with
    their convergence verdict; a note per dataset (windows, n, the convergence rule)."""
    def shown(variants: Sequence[str], key: str) -> list[str]:  # evaluated or not applicable, in registry order
        present = {v for d in datasets for v in d.evaluation.get(key, {})}
        present |= {v for d in datasets for v in d.not_applicable if v in variants}
        return [v for v in variants if v in present] + sorted(present - set(variants))

    lms, joints = shown(LM_VARIANTS, "perplexity"), shown(ENERGY_VARIANTS, "joint")
    rows = []

    def absent(d: DatasetResults, v: str) -> list[str]:  # a dataset's cells for a row it has no number for
        return ["not applicable" if v in d.not_applicable else "—", "—", "—"]

    def params_cell(values: list[str]) -> str:
        distinct = list(dict.fromkeys(v for v in values if v))
        return " / ".join(distinct) or "—"

    for v in lms:
        cells, params = [], []
        for d in datasets:
            lm = d.evaluation.get("perplexity", {}).get(v)
            base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
            if lm is None:
                cells += absent(d, v)
                continue
            params.append(format_parameters(lm["parameters"]) if "parameters" in lm else "")
            vs = "—" if v == "base" or not base else f"{100 * (lm['ppl'] / base - 1):+.2f}%"
            cells += [fmt(lm["ppl"]), "exact", vs]
        rows.append([display_name(v), params_cell(params), *cells])
    for v in joints:
        cells, params = [], []
        for d in datasets:
            j = d.evaluation.get("joint", {}).get(v)
            if j is None:
                cells += absent(d, v)
                continue
            if "energy_parameters" in j and "parameters" in j:
                params.append(f"{format_parameters(j['parameters'] - j['energy_parameters'])}"
                              f"+{format_parameters(j['energy_parameters'])}")
            cells += [f"{fmt(j['ppl_low'])}–{fmt(j['ppl_high'])}", verdict_label(j) + _diagnostics_note(j),
                      "— (did not learn)" if v in d.did_not_learn else _joint_gain(j)]
        rows.append([display_name(v), params_cell(params), *cells])
    notes = [{"name": d.name, "windows": _windows_used(ev), "tokens": ev.get("continuation_tokens", "?"),
              "n_eval": ", ".join(f"{_n_eval(ev, e)} ({display_name(e)})" for e in ordered(ev.get("joint", {})))
              or "?",
              "epsilon": ev.get("convergence_epsilon", "?"),
              "rule": ev["convergence_rule"].rstrip(".") if "convergence_rule" in ev else None}
             for d in datasets for ev in [d.evaluation]]
    inapplicable = sorted({(display_name(v), why) for d in datasets for v, why in d.not_applicable.items()
                           if v in (*lms, *joints)})
    at_chance = [f"{display_name(v)} ({d.name}): {why}" for d in datasets for v, why in d.did_not_learn.items()
                 if v in joints]
    return {"names": [d.name for d in datasets], "rows": rows, "notes": notes,
            "not_applicable": [f"{name}: {why}" for name, why in inapplicable], "did_not_learn": at_chance}


def _ratio(value: float, base: float | None, ci: Sequence[float] | None, level: str) -> str:
    return "—" if not base else f"{value / base:.3f}, {ci_text(ci, level)}"


def reference(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Beside Table 1: each model's perplexity ratio to BASE LM with its bootstrap interval, and
    what a joint model's perplexity would be were its energy self-normalised (log Z = 0)."""
    rows = []
    for d in datasets:
        ppl, level = d.evaluation.get("perplexity", {}), ci_level(d.evaluation)
        base = ppl.get("base", {}).get("ppl")
        for v in ordered(set(ppl) - {"base"}):
            rows.append([md_escape(d.name), display_name(v),
                         _ratio(ppl[v]["ppl"], base, ppl[v].get("ratio_to_base_ci"), level), "— (normalised)"])
        joint = d.evaluation.get("joint", {})
        for v in ordered(joint):
            j = joint[v]
            ratio = (f"T_n end {_ratio(j['ppl_low'], base, j.get('ratio_to_base_ci_low'), level)}; "
                     f"U_n end {_ratio(j['ppl_high'], base, j.get('ratio_to_base_ci_high'), level)}")
            if j.get("convergence", {}).get("converged") is False:
                ratio += " (log Z not converged)"
            self_normalised = "—"
            if "self_normalised_ppl" in j:
                self_normalised = (f"{fmt(j['self_normalised_ppl'])} "
                                   f"({j['vs_base_pct_self_normalised']:+.2f}% vs BASE LM)")
            rows.append([md_escape(d.name), display_name(v), ratio, self_normalised])
    notes = [{"name": d.name, "resamples": b["resamples"], "seed": b["seed"], "level": ci_level(d.evaluation),
              "method": b.get("method", "percentile bootstrap over test windows"),
              "documents": b.get("documents", "?"), "covers": b.get("covers")}
             for d in datasets if (b := d.evaluation.get("bootstrap")) is not None]
    return {"rows": rows, "notes": notes}


def _windows_used(evaluation: dict) -> str:
    """'99' when every test window was scored, else '100 of 333 (evenly spaced)'."""
    used, available = evaluation.get("test_windows", "?"), evaluation.get("test_windows_available")
    if available is None or available == used:
        return str(used)
    return f"{used} of {available} (evenly spaced)"


def last_position(datasets: Sequence[DatasetResults]) -> list[list[str]]:
    """Figure 1's sanity check (rows): at the last position the sum over the vocabulary is exact."""
    rows = []
    for d in datasets:
        positions = d.evaluation.get("positions", {})
        for e in ordered(positions):
            last = positions[e].get("last_position", {})
            where = exact_vs_range(last)
            if where is None:
                continue
            low, high = last["estimated_ppl_low_on_exact_windows"], last["estimated_ppl_high_on_exact_windows"]
            rows.append([md_escape(d.name), display_name(e), str(last.get("exact_windows", "?")),
                         fmt(last["base_ppl_on_exact_windows"]), f"{fmt(low)}–{fmt(high)}",
                         fmt(last["exact_ppl"]), where])
    return rows
