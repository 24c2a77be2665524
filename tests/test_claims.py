"""pipeline.reporting.claims: each claim of the paper gets the verdict its numbers support, and the report shows it."""

from __future__ import annotations

import copy

from conftest import NOT_CONVERGED_REASON, convergence, paired_entries

from pipeline.reporting import report
from pipeline.reporting.claims import Claim, check_claims
from pipeline.reporting.table1 import headline

NOT_CONVERGED_WHY = f"JOINT BIT-BASE: log Z not converged at n = 16 ({NOT_CONVERGED_REASON})"


def verdicts(claims: list[Claim]) -> dict[str, tuple[str, str]]:
    return {c.claim: (c.verdict, c.why) for c in claims}


NGRAMS = "joint samples: more unique n-grams than BASE LM samples (Figure 2 right)"


def test_each_claim_gets_the_verdict_its_numbers_support(evaluation_metrics, generation_metrics) -> None:
    claims = check_claims(evaluation_metrics, generation_metrics)
    assert verdicts(claims) == {
        # The paired interval of BALM / BASE LM, [1.005, 1.045], lies above 1.
        "BALM below BASE LM": ("fails", "BALM is above BASE LM: the interval lies above 1"),
        # 0.5 % lower, but the paired interval [0.975, 1.015] contains 1: no verdict either way.
        "RALM below BASE LM": ("inconclusive", "the paired interval contains 1"),
        "JOINT UNIT below BASE LM (whole range)": ("holds", ""),
        "JOINT BIT-BASE below JOINT UNIT": ("not converged", NOT_CONVERGED_WHY),
        "JOINT BIT-BASE* lowest of all models": ("not converged", NOT_CONVERGED_WHY),
        "JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1)":
            ("fails", "exact value 3.70% above the range"),
        "JOINT BIT-BASE*: exact last-position ppl inside its estimated range (Figure 1)": ("holds", ""),
        NGRAMS: ("fails", "fewer unique n-grams than BASE LM for n = 3, 4"),
        "joint samples closer to real text (Figure 3)": ("holds", ""),
    }
    evidence = {c.claim: c.evidence for c in claims}
    assert evidence["RALM below BASE LM"] == "RALM 19.90 vs BASE LM 20.00; ratio 0.9950, paired 95 % CI [0.975, 1.015]"
    assert evidence["JOINT UNIT below BASE LM (whole range)"].startswith("UNIT 19.00–19.40 vs BASE LM 20.00")
    assert evidence["JOINT BIT-BASE below JOINT UNIT"] == "—"  # no comparison from an unconverged range
    assert "3-grams 60.0 vs 74.0 (difference -14.00, CI [-20.00, -8.00])" in evidence[NGRAMS]
    assert "joint samples 6.20 (joint model) vs BASE LM samples 21.64" in evidence[
        "joint samples closer to real text (Figure 3)"]


def test_converged_ranges_are_compared_by_their_paired_interval(evaluation_metrics, generation_metrics) -> None:
    m = evaluation_metrics
    m["joint"]["bit"]["convergence"] = convergence(True, 16)
    claims = verdicts(check_claims(m, generation_metrics))
    # BIT's U_n end 18.6 over UNIT's T_n end 19.0: paired interval [0.959, 0.999], below 1. (The two rows'
    # marginal intervals against BASE LM overlap; overlap is not the test.)
    assert claims["JOINT BIT-BASE below JOINT UNIT"] == ("holds", "")
    assert claims["JOINT BIT-BASE* lowest of all models"] == ("holds", "")

    m["joint"]["bit"]["ppl_high"] = 18.9
    m["paired"] = paired_entries(m)
    assert verdicts(check_claims(m, generation_metrics))["JOINT BIT-BASE below JOINT UNIT"] == (
        "inconclusive", "the paired interval contains 1")
    m["joint"]["bit"]["ppl_high"] = 19.8
    m["paired"] = paired_entries(m)
    assert verdicts(check_claims(m, generation_metrics))["JOINT BIT-BASE below JOINT UNIT"] == (
        "fails", "JOINT BIT-BASE is above JOINT UNIT: the interval lies above 1")

    m["perplexity"]["ralm"]["ppl"] = 16.2  # BIT* 16.5 / 16.2: inside the noise
    m["paired"] = paired_entries(m)
    assert verdicts(check_claims(m, generation_metrics))["JOINT BIT-BASE* lowest of all models"] == (
        "inconclusive", "the paired interval contains 1 against RALM")
    m["joint"]["unit"]["ppl_low"] = 15.0  # UNIT's lower end clearly below BIT*'s upper end
    m["paired"] = paired_entries(m)
    assert verdicts(check_claims(m, generation_metrics))["JOINT BIT-BASE* lowest of all models"] == (
        "fails", "JOINT UNIT below it (paired interval above 1)")


def test_a_missing_interval_never_makes_a_claim_hold(evaluation_metrics, generation_metrics) -> None:
    older = copy.deepcopy(evaluation_metrics)
    del older["paired"]
    assert {c.claim: c.verdict for c in check_claims(older, generation_metrics)}[
        "JOINT UNIT below BASE LM (whole range)"] == "inconclusive"
    del generation_metrics["paired"]
    claims = verdicts(check_claims(evaluation_metrics, generation_metrics))
    assert claims[NGRAMS] == ("inconclusive", "no paired interval over prefixes recorded")
    assert claims["joint samples closer to real text (Figure 3)"] == (
        "inconclusive", "no paired interval over prefixes recorded")


def test_metrics_without_the_checks_make_no_claim(evaluation_metrics, generation_metrics) -> None:
    older = copy.deepcopy(evaluation_metrics)
    for j in older["joint"].values():
        del j["convergence"]
    del older["paired"]
    del older["perplexity"]["ralm"]
    for p in older["positions"].values():
        del p["last_position"]["exact_ppl"]
    claims = {c.claim: c for c in check_claims(older, {})}
    for name in ("JOINT UNIT below BASE LM (whole range)", "JOINT BIT-BASE below JOINT UNIT",
                 "JOINT BIT-BASE* lowest of all models"):
        assert claims[name].verdict == "not computed" and "no log Z convergence check" in claims[name].why, name
    assert claims["BALM below BASE LM"].evidence.endswith("no paired interval")
    assert claims["BALM below BASE LM"].verdict == "inconclusive"
    assert (claims["RALM below BASE LM"].verdict, claims["RALM below BASE LM"].why) == ("not computed",
                                                                                      "RALM not evaluated")
    assert [c.verdict for c in claims.values() if "last-position" in c.claim] == ["not computed"] * 2
    assert claims["joint samples closer to real text (Figure 3)"].verdict == "not computed"


def dataset(name: str, evaluation: dict, generation: dict) -> report.DatasetResults:
    return report.DatasetResults(name=name, evaluation=evaluation, ppl_vs_samples=[], positions=[],
                                 generation=generation, unique_ngrams=[], density={"base_lm": [], "joint": []},
                                 examples=[])


def test_the_report_shows_every_verdict(evaluation_metrics, generation_metrics) -> None:
    converged = copy.deepcopy(evaluation_metrics)
    converged["joint"]["bit"]["convergence"] = convergence(True, 16)
    inputs = report.ReportInputs(
        datasets=[dataset("news", evaluation_metrics, generation_metrics),
                  dataset("fiction", converged, generation_metrics)],
        stage_times=[],
        human_eval=report.HumanEval("reports/humaneval/pairs.csv", False, [], None),
        provenance=report.Provenance("params.yaml", "seed: 1\n", "0" * 64, "abc", False, [], 0, {}, "linux", "today"),
    )
    md = report.render_markdown(inputs, {})
    start = md.index("## The paper's claims, checked")
    assert md.index("## Table 1") < start < md.index("## Figure 1")
    section = md[start:md.index("\n## ", start + 1)]
    assert "| claim | dataset | verdict | numbers | why |" in section
    assert "| BALM below BASE LM | news | fails | BALM 20.50 vs BASE LM 20.00; " in section
    assert "| RALM below BASE LM | news | inconclusive | " in section
    assert section.count("| the paired interval contains 1 |") == 2  # RALM, both datasets
    assert f"| JOINT BIT-BASE below JOINT UNIT | news | not converged | — | {NOT_CONVERGED_WHY} |" in section
    assert ("| JOINT BIT-BASE below JOINT UNIT | fiction | holds | BIT-BASE 18.00–18.60 vs UNIT "
            r"19.00–19.40; BIT-BASE's U\_n end against UNIT's T\_n end: ratio 0.9789, paired 95 % CI "
            r"\[0.959, 0.999\] | — |") in section
    assert r"| JOINT BIT-BASE\* lowest of all models | fiction | holds | " in section
    # claim by claim: the two datasets' rows of one claim are adjacent
    assert section.index("| BALM below BASE LM | fiction |") - section.index("| BALM below BASE LM | news |") < 300
    assert "- **news**: holds: 3, fails: 3, inconclusive: 1, not converged: 2." in section
    assert "- **fiction**: holds: 5, fails: 3, inconclusive: 1." in section


def test_an_exact_last_position_miss_is_no_verdict_when_the_estimate_did_not_converge(
        evaluation_metrics, generation_metrics) -> None:
    claim = "JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1)"
    assert verdicts(check_claims(evaluation_metrics, generation_metrics))[claim][0] == "fails"
    evaluation_metrics["positions"]["unit"]["last_position"]["converged"] = False
    verdict, why = verdicts(check_claims(evaluation_metrics, generation_metrics))[claim]
    assert verdict == "not converged"
    assert why.startswith("the last position's LM-sample expectation did not converge") and "3.70% above" in why


def test_a_variant_null_in_params_is_not_applicable_and_bit_large_is_compared(evaluation_metrics,
                                                                              generation_metrics) -> None:
    from conftest import joint_entry

    from pipeline.reporting.claims import NOT_APPLICABLE

    smollm2 = copy.deepcopy(evaluation_metrics)
    del smollm2["perplexity"]["balm"]
    for variant in ("unit", "bit"):
        del smollm2["joint"][variant]
        smollm2["positions"].pop(variant, None)
    smollm2["joint"]["bit_large"] = joint_entry(14.0, 14.2, 20.0, 64, True)
    smollm2["paired"] = paired_entries(smollm2)
    na = {v: f"train_ebm.{v} is null in params.yaml" for v in ("unit", "bit")} | {"balm": "train_lm.balm is null"}
    claims = verdicts(check_claims(smollm2, generation_metrics, na))
    assert claims["BALM below BASE LM"] == (NOT_APPLICABLE, "BALM: train_lm.balm is null")
    assert claims["JOINT UNIT below BASE LM (whole range)"][0] == NOT_APPLICABLE
    assert claims["JOINT BIT-BASE below JOINT UNIT"] == (
        NOT_APPLICABLE, "JOINT BIT-BASE: train_ebm.bit is null in params.yaml; "
                        "JOINT UNIT: train_ebm.unit is null in params.yaml")
    # BIT-BASE* is compared with everything but BIT-LARGE*, and BIT-LARGE* with everything.
    assert claims["JOINT BIT-BASE* lowest of all models except JOINT BIT-LARGE*"] == ("holds", "")
    assert claims["JOINT BIT-LARGE* lowest of all models"] == ("holds", "")
    smollm2["joint"]["bit_large"] = joint_entry(16.2, 16.8, 20.0, 64, True)
    smollm2["paired"] = paired_entries(smollm2)
    claims = verdicts(check_claims(smollm2, generation_metrics, na))
    assert claims["JOINT BIT-LARGE* lowest of all models"] == (
        "fails", "JOINT BIT-BASE* below it (paired interval above 1)")
    # Without the not-applicable record a missing row stays "not computed", and no BIT-LARGE* row, no claim.
    plain = verdicts(check_claims(evaluation_metrics, generation_metrics))
    assert "JOINT BIT-LARGE* lowest of all models" not in plain and plain["BALM below BASE LM"][0] == "fails"


def test_an_energy_at_chance_did_not_learn_and_carries_no_claim(evaluation_metrics, generation_metrics) -> None:
    from pipeline.reporting.claims import DID_NOT_LEARN, chance_level_reason

    # The default's UNIT after 10 steps: 0.521 of 117 validation pairs, Wilson interval [0.432, 0.610] (by hand).
    why = chance_level_reason({"valid_pair_accuracy": 0.5213675213675214, "valid_windows": 117})
    assert why == "validation pair accuracy 0.521 on 117 pairs, 95 % CI [0.432, 0.610] reaches chance (0.5)"
    assert chance_level_reason({"valid_pair_accuracy": 0.86, "valid_windows": 117}) is None  # BIT*: learned
    assert chance_level_reason({"valid_pair_accuracy": 0.6, "valid_windows": 20}) is not None  # too few pairs
    assert chance_level_reason({}) is None

    claims = verdicts(check_claims(evaluation_metrics, generation_metrics, did_not_learn={"unit": why}))
    assert claims["JOINT UNIT below BASE LM (whole range)"] == (DID_NOT_LEARN, f"JOINT UNIT: {why}")
    assert claims["JOINT BIT-BASE below JOINT UNIT"][0] == DID_NOT_LEARN
    assert claims["JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1)"][0] == DID_NOT_LEARN
    assert claims["RALM below BASE LM"][0] == "inconclusive"  # claims without UNIT are untouched


def test_the_headline_says_first_when_its_log_z_did_not_converge(evaluation_metrics, generation_metrics) -> None:
    unconverged = copy.deepcopy(evaluation_metrics)
    unconverged["joint"]["bit_star"]["convergence"] = convergence(False, 64)
    lines = headline([dataset("news", evaluation_metrics, generation_metrics),
                      dataset("fiction", unconverged, generation_metrics)])
    assert lines[0].startswith(r"**news**: JOINT BIT-BASE\* 16.00–16.50 vs BASE LM 20.00 (paired 95 % CI of the ratio "
                               r"to BASE LM \[0.805, 0.845\], holds); converged at n = 64")
    assert lines[1].startswith("**fiction: log Z NOT CONVERGED, so this range states no gain** — ")
    assert "holds" not in lines[1] and NOT_CONVERGED_REASON in lines[1]
