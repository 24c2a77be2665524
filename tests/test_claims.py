"""pipeline.reporting.claims: each claim of the paper gets the verdict its numbers support, and the report shows it."""

from __future__ import annotations

import copy

from conftest import NOT_CONVERGED_REASON, convergence

from pipeline.reporting import report
from pipeline.reporting.claims import Claim, check_claims

NOT_CONVERGED_WHY = f"JOINT BIT-BASE: log Z not converged at n = 16 ({NOT_CONVERGED_REASON})"


def verdicts(claims: list[Claim]) -> dict[str, tuple[str, str]]:
    return {c.claim: (c.verdict, c.why) for c in claims}


def test_each_claim_gets_the_verdict_its_numbers_support(evaluation_metrics, generation_metrics) -> None:
    claims = check_claims(evaluation_metrics, generation_metrics)
    assert verdicts(claims) == {
        "BALM below BASE LM": ("does not hold", "BALM is 2.50% above BASE LM"),
        # 0.5 % lower, but the ratio's interval [0.98, 1.01] reaches 1: within the noise, no gain.
        "RALM below BASE LM": ("does not hold", "lower by 0.500%, inside the bootstrap intervals' overlap"),
        "JOINT UNIT below BASE LM (whole range)": ("holds", ""),
        "JOINT BIT-BASE below JOINT UNIT": ("not converged", NOT_CONVERGED_WHY),
        "JOINT BIT-BASE* lowest of all models": ("not converged", NOT_CONVERGED_WHY),
        "JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1)":
            ("does not hold", "exact value 3.70% above the range"),
        "JOINT BIT-BASE*: exact last-position ppl inside its estimated range (Figure 1)": ("holds", ""),
        "joint samples: unique n-grams ≥ BASE LM samples (Figure 2 right)":
            ("does not hold", "fewer unique n-grams than BASE LM for n = 3, 4"),
        "joint samples closer to real text (Figure 3)": ("holds", ""),
    }
    evidence = {c.claim: c.evidence for c in claims}
    assert evidence["RALM below BASE LM"] == "RALM 19.90 vs BASE LM 20.00; ratio 0.995, 95 % CI [0.980, 1.010]"
    assert evidence["JOINT UNIT below BASE LM (whole range)"].startswith("UNIT 19.00–19.40 vs BASE LM 20.00")
    assert evidence["JOINT BIT-BASE below JOINT UNIT"] == "—"  # no comparison from an unconverged range
    assert "3-grams 60.0 vs 74.0" in evidence["joint samples: unique n-grams ≥ BASE LM samples (Figure 2 right)"]
    assert "joint samples 6.20 (joint model) vs BASE LM samples 21.64" in evidence[
        "joint samples closer to real text (Figure 3)"]


def test_converged_ranges_are_compared(evaluation_metrics, generation_metrics) -> None:
    evaluation_metrics["joint"]["bit"]["convergence"] = convergence(True, 16)
    claims = verdicts(check_claims(evaluation_metrics, generation_metrics))
    # 18.6 < 19.0, but the ratio intervals (±0.02 in the fixture) overlap: [0.91, 0.95] vs [0.93, 0.97].
    assert claims["JOINT BIT-BASE below JOINT UNIT"] == (
        "does not hold", "lower by 2.105%, inside the bootstrap intervals' overlap")
    assert claims["JOINT BIT-BASE* lowest of all models"] == ("holds", "")  # 16.5 clear of every LM and lower end
    for variant in ("bit", "unit"):
        joint = evaluation_metrics["joint"][variant]
        for end in ("low", "high"):
            ratio = joint[f"ppl_{end}"] / 20.0
            joint[f"ratio_to_base_ci_{end}"] = [ratio - 0.005, ratio + 0.005]
    claims = verdicts(check_claims(evaluation_metrics, generation_metrics))
    assert claims["JOINT BIT-BASE below JOINT UNIT"] == ("holds", "")  # [0.925, 0.935] clear of [0.945, 0.955]

    evaluation_metrics["perplexity"]["ralm"]["ppl"] = 16.2
    evaluation_metrics["joint"]["unit"]["ppl_low"] = 16.4
    claims = verdicts(check_claims(evaluation_metrics, generation_metrics))
    assert claims["JOINT BIT-BASE* lowest of all models"] == (
        "does not hold", "JOINT BIT-BASE*'s upper end is not clearly below RALM, JOINT UNIT")
    assert claims["JOINT BIT-BASE below JOINT UNIT"] == (
        "does not hold", "BIT-BASE's upper end is not below UNIT's lower end")


def test_metrics_without_the_checks_make_no_claim(evaluation_metrics, generation_metrics) -> None:
    older = copy.deepcopy(evaluation_metrics)
    for j in older["joint"].values():
        del j["convergence"]
    del older["perplexity"]["balm"]["ratio_to_base_ci"]
    del older["perplexity"]["ralm"]
    for p in older["positions"].values():
        del p["last_position"]["exact_ppl"]
    claims = {c.claim: c for c in check_claims(older, {})}
    for name in ("JOINT UNIT below BASE LM (whole range)", "JOINT BIT-BASE below JOINT UNIT",
                 "JOINT BIT-BASE* lowest of all models"):
        assert claims[name].verdict == "not computed" and "no log Z convergence check" in claims[name].why, name
    assert claims["BALM below BASE LM"].evidence.endswith("CI not computed")
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
    assert "| BALM below BASE LM | news | does not hold | BALM 20.50 vs BASE LM 20.00; " in section
    assert "| RALM below BASE LM | news | does not hold | " in section
    assert section.count("| lower by 0.500%, inside the bootstrap intervals' overlap |") == 2  # RALM, both datasets
    assert f"| JOINT BIT-BASE below JOINT UNIT | news | not converged | — | {NOT_CONVERGED_WHY} |" in section
    assert ("| JOINT BIT-BASE below JOINT UNIT | fiction | does not hold | BIT-BASE 18.00–18.60 vs UNIT "
            "19.00–19.40 | lower by 2.105%, inside the bootstrap intervals' overlap |") in section
    assert r"| JOINT BIT-BASE\* lowest of all models | fiction | holds | " in section
    # claim by claim: the two datasets' rows of one claim are adjacent
    assert section.index("| BALM below BASE LM | fiction |") - section.index("| BALM below BASE LM | news |") < 300
    assert "- **news**: holds: 3, does not hold: 4, not converged: 2." in section
    assert "- **fiction**: holds: 4, does not hold: 5." in section


def test_an_exact_last_position_miss_is_no_verdict_when_the_estimate_did_not_converge(
        evaluation_metrics, generation_metrics) -> None:
    claim = "JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1)"
    assert verdicts(check_claims(evaluation_metrics, generation_metrics))[claim][0] == "does not hold"
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
    claims = verdicts(check_claims(smollm2, generation_metrics, na))
    assert claims["JOINT BIT-LARGE* lowest of all models"] == (
        "does not hold", "JOINT BIT-LARGE*'s upper end is not clearly below JOINT BIT-BASE*")
    # Without the not-applicable record a missing row stays "not computed", and no BIT-LARGE* row, no claim.
    plain = verdicts(check_claims(evaluation_metrics, generation_metrics))
    assert "JOINT BIT-LARGE* lowest of all models" not in plain and plain["BALM below BASE LM"][0] == "does not hold"
