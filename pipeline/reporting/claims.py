"""The paper's claims, checked on one dataset's evaluate and generate metrics.

`check_claims` turns results/<ds>/evaluation/metrics.json and results/<ds>/generation/metrics.json
into one `Claim` per statement of the paper (Table 1, Figures 1-3), each with a verdict:

* holds / fails / inconclusive: every comparison is decided by one paired interval over the
  test documents (pipeline/estimation/intervals.py), never by overlapping marginal ranges. "A
  below B" holds when the interval of ppl(A) / ppl(B), A at its upper (U_n) end and B at its
  lower (T_n) end, lies wholly below 1, fails when it lies wholly above 1, and is inconclusive
  when it contains 1 or was not computed (a missing interval never makes a claim hold);
* not converged: the claim needs a joint range whose log Z estimate had not converged at the
  n used, so no comparison is made from that range;
* not computed: the metrics lack a number the claim needs;
* not applicable: a model the claim compares is null in this run's params (e.g. BALM when the
  base LM is a pretrained SmolLM2 with no larger sibling to train), so its stage trained nothing;
* did not learn: an energy the claim compares tells real text from LM samples no better than
  chance on the validation pairs (`chance_level_reason`), so its row carries no claim.

Pure: dicts in, dataclasses out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.variants import display_name as name
from pipeline.estimation.intervals import FAILS, HOLDS, INCONCLUSIVE

NOT_CONVERGED, NOT_COMPUTED = "not converged", "not computed"
NOT_APPLICABLE, DID_NOT_LEARN = "not applicable", "did not learn"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_CONVERGED, NOT_COMPUTED, NOT_APPLICABLE, DID_NOT_LEARN)
EXACT_TOLERANCE = 1e-5  # relative; metrics.json rounds perplexities to three decimals
PAPER_MEAN_GAPS = "paper: 6.20 vs 21.64"  # Figure 3, joint vs BASE LM samples


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # one of VERDICTS
    evidence: str  # the numbers the verdict rests on
    why: str = ""  # one line when it fails, is inconclusive, not converged or not computed


def chance_level_reason(energy_metrics: dict[str, Any], z: float = 1.96) -> str | None:
    """Why an energy did not learn, or None: its validation pair accuracy (real window scored below
    its LM sample) has a 95 % Wilson interval that reaches 0.5. None for metrics without one."""
    accuracy, pairs = energy_metrics.get("valid_pair_accuracy"), energy_metrics.get("valid_windows")
    if accuracy is None or not pairs:
        return None
    centre = (accuracy + z * z / (2 * pairs)) / (1 + z * z / pairs)
    half = z * math.sqrt(accuracy * (1 - accuracy) / pairs + z * z / (4 * pairs * pairs)) / (1 + z * z / pairs)
    if centre - half > 0.5:
        return None
    return (f"validation pair accuracy {accuracy:.3f} on {pairs} pairs, 95 % CI [{centre - half:.3f}, "
            f"{centre + half:.3f}] reaches chance (0.5)")


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
    """'95 %': the intervals' level ('?' in metrics without one)."""
    level = evaluation.get("bootstrap", {}).get("level")
    return "?" if level is None else f"{100 * level:g} %"


def ci_text(ci: Sequence[float] | None, level: str) -> str:
    return "no interval" if ci is None else f"paired {level} CI [{ci[0]:.3f}, {ci[1]:.3f}]"


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


def compare_below(evaluation: dict[str, Any], a: str, b: str) -> tuple[str, str, str]:
    """(verdict, evidence, why) of "a below b" from evaluate's paired interval of ppl(a) / ppl(b)."""
    pair = evaluation.get("paired", {}).get(f"{a}/{b}")
    if pair is None or pair.get("ci") is None:
        return INCONCLUSIVE, "no paired interval", f"no paired interval of {name(a)} against {name(b)} recorded"
    ci, verdict = pair["ci"], pair["below"]
    evidence = f"ratio {pair['ratio']:.4f}, {ci_text(ci, ci_level(evaluation))}"
    why = {HOLDS: "", FAILS: f"{name(a)} is above {name(b)}: the interval lies above 1",
           INCONCLUSIVE: "the paired interval contains 1"}[verdict]
    return verdict, evidence, why


def _lm_below_base(evaluation: dict[str, Any], lm: str) -> Claim:
    claim = f"{name(lm)} below BASE LM"
    ppl = evaluation.get("perplexity", {})
    missing = [name(v) for v in ("base", lm) if v not in ppl]
    if missing:
        return Claim(claim, NOT_COMPUTED, "—", f"{', '.join(missing)} not evaluated")
    verdict, interval, why = compare_below(evaluation, lm, "base")
    return Claim(claim, verdict, f"{name(lm)} {ppl[lm]['ppl']:.2f} vs BASE LM {ppl['base']['ppl']:.2f}; {interval}",
                 why)


def _unit_below_base(evaluation: dict[str, Any]) -> Claim:
    claim = "JOINT UNIT below BASE LM (whole range)"
    joint, base = evaluation.get("joint", {}), evaluation.get("perplexity", {}).get("base", {}).get("ppl")
    if base is None:
        return Claim(claim, NOT_COMPUTED, "—", "BASE LM not evaluated")
    if gate := _unusable(joint, ["unit"]):
        return Claim(claim, gate[0], "—", gate[1])
    verdict, interval, why = compare_below(evaluation, "unit", "base")
    return Claim(claim, verdict, f"UNIT {_range(joint['unit'])} vs BASE LM {base:.2f}; U_n end: {interval}", why)


def _bit_below_unit(evaluation: dict[str, Any]) -> Claim:
    claim = "JOINT BIT-BASE below JOINT UNIT"
    joint = evaluation.get("joint", {})
    if gate := _unusable(joint, ["bit", "unit"]):
        return Claim(claim, gate[0], "—", gate[1])
    verdict, interval, why = compare_below(evaluation, "bit", "unit")
    return Claim(claim, verdict, f"BIT-BASE {_range(joint['bit'])} vs UNIT {_range(joint['unit'])}; "
                 f"BIT-BASE's U_n end against UNIT's T_n end: {interval}", why)


def _lowest(evaluation: dict[str, Any], variant: str, beside: Sequence[str] = ()) -> Claim:
    """`variant`'s joint range lowest of all models but those in `beside` (BIT-BASE* beside BIT-LARGE*):
    holds when it is below every rival, fails when a rival is below it, else inconclusive."""
    joint, lms = evaluation.get("joint", {}), evaluation.get("perplexity", {})
    beside = [v for v in beside if v in joint]
    claim = f"{name(variant)} lowest of all models" + "".join(f" except {name(v)}" for v in beside)
    if gate := _unusable(joint, [variant, *(v for v in joint if v != variant and v not in beside)]):
        return Claim(claim, gate[0], "—", gate[1])
    rivals = [*lms, *(v for v in joint if v != variant and v not in beside)]
    results = {r: compare_below(evaluation, variant, r) for r in rivals}
    evidence = f"{name(variant)} ≤ {joint[variant]['ppl_high']:.2f}; against " + "; ".join(
        f"{name(r)}: {interval}" for r, (_, interval, _) in results.items())
    above = [name(r) for r, (v, _, _) in results.items() if v == FAILS]
    unclear = [name(r) for r, (v, _, _) in results.items() if v == INCONCLUSIVE]
    if above:
        return Claim(claim, FAILS, evidence, f"{', '.join(above)} below it (paired interval above 1)")
    if unclear:
        return Claim(claim, INCONCLUSIVE, evidence, f"the paired interval contains 1 against {', '.join(unclear)}")
    return Claim(claim, HOLDS, evidence)


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


def _interval_verdict(ci: Sequence[float] | None, holds_below: bool) -> str:
    """holds when the interval lies on the claim's side of 0, fails on the other, else inconclusive."""
    if ci is None:
        return INCONCLUSIVE
    low, high = ci
    if (high < 0) if holds_below else (low > 0):
        return HOLDS
    if (low > 0) if holds_below else (high < 0):
        return FAILS
    return INCONCLUSIVE


def _unique_ngrams(generation: dict[str, Any]) -> Claim:
    claim = "joint samples: more unique n-grams than BASE LM samples (Figure 2 right)"
    sequence = generation.get("unique_ngram_pct", {}).get("sequence", {})
    if not sequence:
        return Claim(claim, NOT_COMPUTED, "—", "no unique n-gram statistics")
    paired = generation.get("paired", {}).get("unique_ngrams", {})
    ns = sorted(sequence, key=int)
    verdicts = {n: _interval_verdict(paired.get(n, {}).get("ci"), holds_below=False) for n in ns}
    evidence = "joint vs BASE LM %: " + ", ".join(
        f"{n}-grams {sequence[n]['joint']:.1f} vs {sequence[n]['base']:.1f}"
        + (f" (difference {paired[n]['mean']:+.2f}, CI [{paired[n]['ci'][0]:+.2f}, {paired[n]['ci'][1]:+.2f}])"
           if paired.get(n, {}).get("ci") else "") for n in ns)
    if not paired:
        return Claim(claim, INCONCLUSIVE, evidence, "no paired interval over prefixes recorded")
    fewer = [n for n in ns if verdicts[n] == FAILS]
    unclear = [n for n in ns if verdicts[n] == INCONCLUSIVE]
    if fewer:
        return Claim(claim, FAILS, evidence, f"fewer unique n-grams than BASE LM for n = {', '.join(fewer)}")
    if unclear:
        return Claim(claim, INCONCLUSIVE, evidence, f"the paired interval contains 0 for n = {', '.join(unclear)}")
    return Claim(claim, HOLDS, evidence)


def _closer_to_real(generation: dict[str, Any]) -> Claim:
    claim = "joint samples closer to real text (Figure 3)"
    density = generation.get("loglik_density", {})
    joint_gap = density.get("joint", {}).get("mean_gap", {}).get("joint")
    base_gap = density.get("base_lm", {}).get("mean_gap", {}).get("base")
    if joint_gap is None or base_gap is None:
        return Claim(claim, NOT_COMPUTED, "—", "no log-likelihood densities")
    evidence = (f"mean log-lik gap to real text: joint samples {joint_gap:.2f} (joint model) vs BASE LM samples "
                f"{base_gap:.2f} (BASE LM); {PAPER_MEAN_GAPS}")
    paired = generation.get("paired", {}).get("closer_to_real")
    if paired is None or paired.get("ci") is None:
        return Claim(claim, INCONCLUSIVE, evidence, "no paired interval over prefixes recorded")
    evidence += (f"; paired difference of gaps {paired['mean']:+.2f}, "
                 f"CI [{paired['ci'][0]:+.2f}, {paired['ci'][1]:+.2f}]")
    if not paired.get("same_sign", True):
        return Claim(claim, INCONCLUSIVE, evidence, "the two mean gaps have opposite signs")
    verdict = _interval_verdict(paired["ci"], holds_below=True)
    why = {HOLDS: "", FAILS: "the joint samples' gap is larger than the BASE LM samples' (interval above 0)",
           INCONCLUSIVE: "the paired interval contains 0"}[verdict]
    return Claim(claim, verdict, evidence, why)


def check_claims(evaluation: dict[str, Any], generation: dict[str, Any],
                 not_applicable: Mapping[str, str] | None = None,
                 did_not_learn: Mapping[str, str] | None = None) -> list[Claim]:
    """Every claim of the paper on one dataset, in the paper's order (Table 1, Figures 1-3).
    `not_applicable` ({variant: reason}) turns a claim that lacks such a variant into "not applicable";
    `did_not_learn` ({energy: reason}) turns a claim that compares such an energy into "did not learn"."""
    na, chance = dict(not_applicable or {}), dict(did_not_learn or {})
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
        elif at_chance := [v for v in needs if v in chance]:
            c = Claim(c.claim, DID_NOT_LEARN, c.evidence, "; ".join(f"{name(v)}: {chance[v]}" for v in at_chance))
        if "bit_large" in needs and c.verdict == NOT_COMPUTED:
            continue  # a run without a BIT-LARGE* row (older metrics) makes no claim about it
        claims.append(c)
    exact = [c if not (at_chance := [v for v in chance if c.claim.startswith(f"{name(v)}:")])
             else Claim(c.claim, DID_NOT_LEARN, c.evidence, chance[at_chance[0]]) for c in _exact_inside(evaluation)]
    return [*claims, *exact, _unique_ngrams(generation), _closer_to_real(generation)]
