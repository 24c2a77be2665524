"""The paper's claims, checked on one dataset's evaluate and generate metrics.

`check_claims` turns results/<ds>/evaluation/metrics.json and results/<ds>/generation/metrics.json
into one `Claim` per statement of the paper (Table 1, Figures 1-3), each with a verdict:

* holds / does not hold: a comparison between models holds when the point estimates say so and
  the two rows' bootstrap intervals of the ratio to BASE LM do not overlap (a difference inside
  that noise does not hold); the evidence quotes both;
* not converged: the claim needs a joint range whose log Z estimate had not converged at the
  n used, so no comparison is made from that range;
* not computed: the metrics lack a number the claim needs;
* not applicable: a model the claim compares is null in this run's params (e.g. BALM when the
  base LM is a pretrained SmolLM2 with no larger sibling to train), so its stage trained nothing.

Pure: dicts in, dataclasses out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.variants import display_name as name

HOLDS, FAILS, NOT_CONVERGED, NOT_COMPUTED = "holds", "does not hold", "not converged", "not computed"
NOT_APPLICABLE = "not applicable"
VERDICTS = (HOLDS, FAILS, NOT_CONVERGED, NOT_COMPUTED, NOT_APPLICABLE)
EXACT_TOLERANCE = 1e-5  # relative; metrics.json rounds perplexities to three decimals
PAPER_MEAN_GAPS = "paper: 6.20 vs 21.64"  # Figure 3, joint vs BASE LM samples


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # one of VERDICTS
    evidence: str  # the numbers the verdict rests on
    why: str = ""  # one line when it does not hold, is not converged or not computed (or is weak)


def verdict_label(joint: dict[str, Any]) -> str:
    """The range's verdict as evaluate wrote it ('converged at n = 512', …), or 'convergence not checked'."""
    return joint["verdict"] if "convergence" in joint else "convergence not checked"


def not_converged_why(joint: dict[str, Any]) -> str:
    c = joint["convergence"]
    return f"log Z not converged at n = {c['n']} ({c['reason']})"


def exact_vs_range(last: dict[str, Any]) -> str | None:
    """Where the exact last-position perplexity lies against the estimate on the same windows:
    'inside', '1.23% below' or '1.23% above'; None when the exact value was not computed."""
    if "exact_ppl" not in last:
        return None
    low, high = last["estimated_ppl_low_on_exact_windows"], last["estimated_ppl_high_on_exact_windows"]
    exact = last["exact_ppl"]
    if low * (1 - EXACT_TOLERANCE) <= exact <= high * (1 + EXACT_TOLERANCE):
        return "inside"
    side, end = ("below", low) if exact < low else ("above", high)
    return f"{100 * abs(exact / end - 1):.2f}% {side}"


def ci_level(evaluation: dict[str, Any]) -> str:
    """'95 %': the bootstrap intervals' level ('?' in metrics without a bootstrap)."""
    level = evaluation.get("bootstrap", {}).get("level")
    return "?" if level is None else f"{100 * level:g} %"


def ci_text(ci: Sequence[float] | None, level: str) -> str:
    return "CI not computed" if ci is None else f"{level} CI [{ci[0]:.3f}, {ci[1]:.3f}]"


def _range(joint: dict[str, Any]) -> str:
    return f"{joint['ppl_low']:.2f}–{joint['ppl_high']:.2f}"


def _unusable(joint: dict[str, Any], variants: Sequence[str]) -> tuple[str, str] | None:
    """(verdict, why) when a joint range the claim compares is absent, unchecked or not converged."""
    missing = [name(v) for v in variants if v not in joint]
    if missing:
        return NOT_COMPUTED, f"{', '.join(missing)} not evaluated"
    unchecked = [name(v) for v in variants if "convergence" not in joint[v]]
    if unchecked:
        return NOT_COMPUTED, f"no log Z convergence check recorded for {', '.join(unchecked)}"
    failed = [v for v in variants if not joint[v]["convergence"]["converged"]]
    if failed:
        return NOT_CONVERGED, "; ".join(f"{name(v)}: {not_converged_why(joint[v])}" for v in failed)
    return None


def _interval(evaluation: dict[str, Any], variant: str, end: str) -> tuple[float, float] | None:
    """The bootstrap interval of a row's perplexity ratio to BASE LM: an LM row's, or a joint row's
    at its T_n end ("low") or U_n end ("high"); BASE LM's own is exactly 1. None if not recorded."""
    if variant == "base":
        return (1.0, 1.0)
    if variant in evaluation.get("joint", {}):
        ci = evaluation["joint"][variant].get(f"ratio_to_base_ci_{end}")
    else:
        ci = evaluation.get("perplexity", {}).get(variant, {}).get("ratio_to_base_ci")
    return None if ci is None else (float(ci[0]), float(ci[1]))


def _below(point: float, rival_point: float, ci: tuple[float, float] | None,
           rival_ci: tuple[float, float] | None) -> tuple[bool, str]:
    """(holds, why-not) for "this model is below its rival": the point estimates say so AND the two
    bootstrap intervals of the ratio to BASE LM do not overlap. A difference inside that noise (an
    energy at chance moves perplexity by 0.00x %) is not evidence of a gain."""
    if point >= rival_point:
        return False, ""
    if ci is None or rival_ci is None:
        return True, "no bootstrap interval: decided on the point estimates alone"
    if ci[1] < rival_ci[0]:
        return True, ""
    return False, f"lower by {100 * (1 - point / rival_point):.3f}%, inside the bootstrap intervals' overlap"


def _lm_below_base(evaluation: dict[str, Any], lm: str) -> Claim:
    claim = f"{name(lm)} below BASE LM"
    ppl = evaluation.get("perplexity", {})
    missing = [name(v) for v in ("base", lm) if v not in ppl]
    if missing:
        return Claim(claim, NOT_COMPUTED, "—", f"{', '.join(missing)} not evaluated")
    value, base = ppl[lm]["ppl"], ppl["base"]["ppl"]
    ci = _interval(evaluation, lm, "")
    evidence = f"{name(lm)} {value:.2f} vs BASE LM {base:.2f}; ratio {value / base:.3f}, {ci_text(ci, ci_level(evaluation))}"
    holds, why = _below(value, base, ci, (1.0, 1.0))
    if not holds and not why:
        why = f"{name(lm)} is {100 * (value / base - 1):.2f}% above BASE LM"
    return Claim(claim, HOLDS if holds else FAILS, evidence, why)


def _unit_below_base(evaluation: dict[str, Any]) -> Claim:
    claim = "JOINT UNIT below BASE LM (whole range)"
    joint, base = evaluation.get("joint", {}), evaluation.get("perplexity", {}).get("base", {}).get("ppl")
    if base is None:
        return Claim(claim, NOT_COMPUTED, "—", "BASE LM not evaluated")
    if gate := _unusable(joint, ["unit"]):
        return Claim(claim, gate[0], "—", gate[1])
    unit = joint["unit"]
    ci = _interval(evaluation, "unit", "high")
    evidence = (f"UNIT {_range(unit)} vs BASE LM {base:.2f}; U_n-end ratio {unit['ppl_high'] / base:.5f}, "
                f"{ci_text(ci, ci_level(evaluation))}")
    holds, why = _below(unit["ppl_high"], base, ci, (1.0, 1.0))
    return Claim(claim, HOLDS if holds else FAILS, evidence,
                 why or ("" if holds else "the upper end (U_n) is not below BASE LM"))


def _bit_below_unit(evaluation: dict[str, Any]) -> Claim:
    claim = "JOINT BIT-BASE below JOINT UNIT"
    joint = evaluation.get("joint", {})
    if gate := _unusable(joint, ["bit", "unit"]):
        return Claim(claim, gate[0], "—", gate[1])
    bit, unit = joint["bit"], joint["unit"]
    holds, why = _below(bit["ppl_high"], unit["ppl_low"], _interval(evaluation, "bit", "high"),
                        _interval(evaluation, "unit", "low"))
    return Claim(claim, HOLDS if holds else FAILS, f"BIT-BASE {_range(bit)} vs UNIT {_range(unit)}",
                 why or ("" if holds else "BIT-BASE's upper end is not below UNIT's lower end"))


def _lowest(evaluation: dict[str, Any], variant: str, beside: Sequence[str] = ()) -> Claim:
    """`variant`'s joint range lowest of all models but those in `beside` (BIT-BASE* beside BIT-LARGE*)."""
    joint, lms = evaluation.get("joint", {}), evaluation.get("perplexity", {})
    beside = [v for v in beside if v in joint]
    claim = f"{name(variant)} lowest of all models" + "".join(f" except {name(v)}" for v in beside)
    if gate := _unusable(joint, [variant, *(v for v in joint if v != variant and v not in beside)]):
        return Claim(claim, gate[0], "—", gate[1])
    high, ci = joint[variant]["ppl_high"], _interval(evaluation, variant, "high")
    # A joint model is beaten only when this one's upper end is below its lower end.
    rivals = {**{v: lm["ppl"] for v, lm in lms.items()},
              **{v: j["ppl_low"] for v, j in joint.items() if v != variant and v not in beside}}
    evidence = f"{name(variant)} ≤ {high:.2f} vs " + ", ".join(
        f"{name(v)} {'≥ ' if v in joint else ''}{p:.2f}" for v, p in rivals.items())
    verdicts = {v: _below(high, p, ci, _interval(evaluation, v, "low")) for v, p in rivals.items()}
    beaten_by = [name(v) for v, (holds, _) in verdicts.items() if not holds]
    notes = sorted({why for holds, why in verdicts.values() if holds and why})
    return Claim(claim, FAILS if beaten_by else HOLDS, evidence,
                 f"{name(variant)}'s upper end is not clearly below {', '.join(beaten_by)}" if beaten_by
                 else "; ".join(notes))


def _exact_inside(evaluation: dict[str, Any]) -> list[Claim]:
    positions = evaluation.get("positions", {})
    if not positions:
        return [Claim("exact last-position ppl inside its estimated range (Figure 1)", NOT_COMPUTED, "—",
                      "no per-position estimate")]
    claims = []
    for e, pos in positions.items():
        claim = f"{name(e)}: exact last-position ppl inside its estimated range (Figure 1)"
        last = pos.get("last_position", {})
        where = exact_vs_range(last)
        if where is None:
            claims.append(Claim(claim, NOT_COMPUTED, "—", "the exact enumeration was not computed"))
            continue
        evidence = (f"exact {last['exact_ppl']:.2f} vs estimated {last['estimated_ppl_low_on_exact_windows']:.2f}–"
                    f"{last['estimated_ppl_high_on_exact_windows']:.2f} on {last.get('exact_windows', '?')} windows")
        if last.get("converged") is False:
            # The estimate's own LM-sample expectation failed the log Z rule: a miss says nothing of Eq. 5.
            claims.append(Claim(claim, NOT_CONVERGED, evidence,
                                f"the last position's LM-sample expectation did not converge with "
                                f"{pos.get('samples', '?')} samples (exact value {where} the range)"))
            continue
        claims.append(Claim(claim, HOLDS if where == "inside" else FAILS, evidence,
                            "" if where == "inside" else f"exact value {where} the range"))
    return claims


def _unique_ngrams(generation: dict[str, Any]) -> Claim:
    claim = "joint samples: unique n-grams ≥ BASE LM samples (Figure 2 right)"
    sequence = generation.get("unique_ngram_pct", {}).get("sequence", {})
    if not sequence:
        return Claim(claim, NOT_COMPUTED, "—", "no unique n-gram statistics")
    ns = sorted(sequence, key=int)
    evidence = "joint vs BASE LM %: " + ", ".join(
        f"{n}-grams {sequence[n]['joint']:.1f} vs {sequence[n]['base']:.1f}" for n in ns)
    fewer = [n for n in ns if sequence[n]["joint"] < sequence[n]["base"]]
    return Claim(claim, FAILS if fewer else HOLDS, evidence,
                 f"fewer unique n-grams than BASE LM for n = {', '.join(fewer)}" if fewer else "")


def _closer_to_real(generation: dict[str, Any]) -> Claim:
    claim = "joint samples closer to real text (Figure 3)"
    density = generation.get("loglik_density", {})
    joint_gap = density.get("joint", {}).get("mean_gap", {}).get("joint")
    base_gap = density.get("base_lm", {}).get("mean_gap", {}).get("base")
    if joint_gap is None or base_gap is None:
        return Claim(claim, NOT_COMPUTED, "—", "no log-likelihood densities")
    evidence = (f"mean log-lik gap to real text: joint samples {joint_gap:.2f} (joint model) vs BASE LM samples "
                f"{base_gap:.2f} (BASE LM); {PAPER_MEAN_GAPS}")
    holds = joint_gap < base_gap
    return Claim(claim, HOLDS if holds else FAILS, evidence,
                 "" if holds else "the joint samples' gap is not smaller than the BASE LM samples'")


def check_claims(evaluation: dict[str, Any], generation: dict[str, Any],
                 not_applicable: Mapping[str, str] | None = None) -> list[Claim]:
    """Every claim of the paper on one dataset, in the paper's order (Table 1, Figures 1-3).
    `not_applicable` ({variant: reason}) turns a claim that lacks such a variant into "not applicable"."""
    na = dict(not_applicable or {})
    table1 = [
        (("balm",), _lm_below_base(evaluation, "balm")),
        (("ralm",), _lm_below_base(evaluation, "ralm")),
        (("unit",), _unit_below_base(evaluation)),
        (("bit", "unit"), _bit_below_unit(evaluation)),
        (("bit_star",), _lowest(evaluation, "bit_star", beside=["bit_large"])),
        (("bit_large",), _lowest(evaluation, "bit_large")),
    ]
    claims = []
    for needs, c in table1:
        if c.verdict == NOT_COMPUTED and (missing := [v for v in needs if v in na]):
            c = Claim(c.claim, NOT_APPLICABLE, "—", "; ".join(f"{name(v)}: {na[v]}" for v in missing))
        if "bit_large" in needs and c.verdict == NOT_COMPUTED:
            continue  # a run without a BIT-LARGE* row (older metrics) makes no claim about it
        claims.append(c)
    return [*claims, *_exact_inside(evaluation), _unique_ngrams(generation), _closer_to_real(generation)]
