"""Appendix A.1: Eq. 5 over the base LM's top K (estimator vs exact enumeration), the repetition
contexts, the claim's verdicts, stage stepwise (identities, resume) and `generate --method stepwise`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.generation.stepwise import (
    pick_pairs,
    repeated_positions,
    repetition_claims,
    step_distribution,
    would_repeat,
)
from pipeline.generation.stepwise_work import StepwiseWorker
from pipeline.sampling.negatives import SamplerWorker
from pipeline.sampling.sampler import Sampler

STEPWISE = {"energy": "bit", "windows": 8, "lm_top_k": 10, "ngram": 1, "pairs": 3, "candidates": 8, "samples": 8,
            "renormalise_top": 5, "show": 3, "examples": 2, "convergence": {"epsilon": 0.2, "min_samples": 4},
            "bootstrap": {"resamples": 200, "level": 0.9}, "precision": "fp32", "batch_size": 16, "num_workers": 0}


# --------------------------------------------------------------------------- contexts
def test_repetitions_are_ngrams_that_ended_earlier() -> None:
    tokens = np.array([5, 6, 7, 5, 6, 9, 6])
    assert repeated_positions(tokens, 1).tolist() == [False, False, False, True, True, False, True]
    assert repeated_positions(tokens, 2).tolist() == [False, False, False, False, True, False, False]
    assert would_repeat(tokens[:4], np.array([6, 7]), 2).tolist() == [True, False]  # (5, 6) seen; (5, 7) not
    assert would_repeat(tokens[:4], np.array([6, 8]), 1).tolist() == [True, False]


def test_pairs_take_the_first_repetition_and_the_nearest_control() -> None:
    windows = np.array([
        [1, 2, 3, 4, 5, 6, 7, 8],  # no repetition in the continuation: skipped
        [1, 2, 3, 4, 9, 2, 7, 7],  # continuation from t = 4: 2 at t = 5 repeats, controls at 4 and 6 -> 4
        [1, 1, 1, 1, 1, 1, 1, 1],  # all repeat: no control, skipped
        [3, 4, 5, 6, 7, 8, 6, 3],  # 6 at t = 6 repeats; controls 4, 5 -> 5
    ])
    pairs = pick_pairs(windows, 4, 1, limit=5)
    assert [(p.row, p.repetition, p.control) for p in pairs] == [(1, 5, 4), (3, 6, 5)]
    assert len(pick_pairs(windows, 4, 1, limit=1)) == 1
    # Round-robin over documents: b's first usable window comes before a's second.
    more = np.concatenate([windows, windows[1:2]])
    rows = [p.row for p in pick_pairs(more, 4, 1, limit=5, documents=np.array(["a", "a", "a", "a", "b"]))]
    assert rows == [1, 4, 3]


# --------------------------------------------------------------------------- Eq. 5 vs enumeration
V, CONTEXT, HORIZON = 6, 4, 2  # candidates x_t then 2 more tokens: 6 x 36 completions in all


class TokenEnergy:
    """E(x) = weights · (token counts of the last HORIZON + 1 tokens): a known, non-trivial energy."""

    def __init__(self) -> None:
        self.weights = np.array([0.0, 1.5, -1.0, 0.5, 2.0, -0.5])

    def score(self, windows: np.ndarray) -> np.ndarray:
        tail = np.asarray(windows)[:, -(HORIZON + 1):]
        return self.weights[tail].sum(1)


def tiny_worker() -> tuple[StepwiseWorker, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    sampler_worker = SamplerWorker.__new__(SamplerWorker)
    sampler_worker.device, sampler_worker.sampler, sampler_worker.shards_done = torch.device("cpu"), Sampler(lm), 0
    worker = StepwiseWorker.__new__(StepwiseWorker)
    worker.lm, worker.energy, worker.batch_samples = sampler_worker, TokenEnergy(), 512
    return worker, lm


def exact_conditional(lm: torch.nn.Module, context: list[int], energy: TokenEnergy) -> np.ndarray:
    """P(x_t = c | x_<t) ∝ P_LM(c) Σ_{x'} P_LM(x' | c) exp(−E), every completion enumerated."""
    completions = np.array(list(itertools.product(range(V), repeat=HORIZON)))
    full = np.array([context + [c] + list(x) for c in range(V) for x in completions])
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor(full)).logits.double(), -1)
    steps = logp[:, CONTEXT - 1 : -1].gather(-1, torch.tensor(full[:, CONTEXT:, None])).squeeze(-1).sum(1).numpy()
    log_joint = steps - energy.score(full)
    per_candidate = np.logaddexp.reduce(log_joint.reshape(V, -1), axis=1)
    return np.exp(per_candidate - np.logaddexp.reduce(per_candidate))


def test_the_per_step_estimate_converges_to_the_exact_conditional() -> None:
    worker, lm = tiny_worker()
    context = [1, 4, 2, 5]
    truth = exact_conditional(lm, context, worker.energy)
    errors = {}
    for n in (8, 4096):
        r = worker.candidate_weights(np.array(context), -1, V, n, CONTEXT + 1 + HORIZON, seed=3)
        est = step_distribution(r["base_logprob"], r["log_weights"])
        assert (est.low <= est.point + 1e-12).all() and (est.point <= est.high + 1e-12).all()
        assert np.exp(est.point).sum() == pytest.approx(1.0)
        errors[n] = np.abs(np.exp(est.point) - truth[r["candidates"]]).max()
        if n == 4096:
            # Eq. 4's range is asymptotic; at this n it brackets every candidate's truth (to 0.01)
            margin = 0.01
            assert (np.exp(est.low) - margin <= truth[r["candidates"]]).all()
            assert (truth[r["candidates"]] <= np.exp(est.high) + margin).all()
    assert errors[4096] < 0.01 < errors[8]
    # The energy reshapes the base LM's distribution: the estimate is not the base's.
    assert np.abs(np.exp(est.base) - truth[r["candidates"]]).max() > 0.05


def test_the_last_position_is_enumerated_exactly() -> None:
    worker, lm = tiny_worker()
    context = [1, 4, 2, 5, 0, 3]  # the candidate is the window's last token (T = 7): nothing to sample
    r = worker.candidate_weights(np.array(context), -1, V, 64, len(context) + 1, seed=0)
    assert r["log_weights"].shape == (V, 1)
    est = step_distribution(r["base_logprob"], r["log_weights"])
    np.testing.assert_array_equal(est.low, est.high)
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([context])).logits[0, -1].double(), -1).numpy()
    full = np.array([context + [c] for c in r["candidates"]])
    expected = logp[r["candidates"]] - worker.energy.score(full)
    np.testing.assert_allclose(est.point, expected - np.logaddexp.reduce(expected), atol=1e-12)


def test_the_observed_token_is_always_a_candidate() -> None:
    worker, lm = tiny_worker()
    context = [1, 4, 2, 5]
    with torch.no_grad():
        least_likely = int(lm(input_ids=torch.tensor([context])).logits[0, -1].argmin())
    natural = worker.candidate_weights(np.array(context), -1, 2, 4, 7, seed=0)["candidates"].tolist()
    assert least_likely not in natural  # so the swap below is what puts it there
    r = worker.candidate_weights(np.array(context), least_likely, 2, 4, 7, seed=0)
    assert r["candidates"].tolist() == [natural[0], least_likely]


# --------------------------------------------------------------------------- the claim
def claim_inputs(rep: np.ndarray, ctrl: np.ndarray, width: float = 0.01) -> dict[str, np.ndarray]:
    return {"rep": rep, "rep_low": rep - width, "rep_high": rep + width,
            "ctrl": ctrl, "ctrl_low": ctrl - width, "ctrl_high": ctrl + width}


def test_claim_verdicts_follow_the_paired_interval() -> None:
    rng = np.random.default_rng(0)
    documents = np.array([f"d{i}" for i in range(12)])
    ctrl = rng.normal(-0.1, 0.05, 12)
    holds = repetition_claims(claim_inputs(ctrl - 0.8 + rng.normal(0, 0.05, 12), ctrl), documents, 0.95, 500, 0)
    assert holds["verdict"] == "holds" and holds["repetition"]["verdict"] == "holds"
    fails = repetition_claims(claim_inputs(ctrl + 0.8, ctrl), documents, 0.95, 500, 0)
    assert fails["verdict"] == "fails"
    # A difference smaller than the estimates' own Eq. 4 ranges cannot make the claim hold.
    wide = repetition_claims(claim_inputs(ctrl - 0.05, ctrl, width=0.5), documents, 0.95, 500, 0)
    assert wide["verdict"] == "inconclusive"
    assert holds["pairs"] == 12 and holds["documents"] == 12


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_toy_run

    return build_toy_run(tmp_path_factory.mktemp("stepwise"))


def params_with(root: Path, name: str, **overrides) -> Path:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["stepwise"] = {**STEPWISE, **overrides}
    path = root / name
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_writes_table3_and_the_claim(project: Path) -> None:
    from stages import stepwise as stage

    metrics = stage.run("toy", params_with(project, "p-bit.yaml"), root=project, progress=False)
    table = pq.read_table(project / "data/toy/stepwise/candidates.parquet").to_pandas()
    assert metrics["pairs"] >= 2 and len(table) == metrics["pairs"] * 2 * STEPWISE["candidates"]
    for _, ctx in table.groupby(["pair", "kind"]):
        assert np.exp(ctx["base_logprob"]).sum() == pytest.approx(1.0)
        assert np.exp(ctx["joint_logprob"]).sum() == pytest.approx(1.0)
        assert (ctx["joint_logprob_low"] <= ctx["joint_logprob"] + 1e-9).all()
        assert (ctx["joint_logprob"] <= ctx["joint_logprob_high"] + 1e-9).all()
        assert ctx["observed"].iloc[0] in ctx["token"].tolist()
        observed = ctx[ctx["token"] == ctx["observed"]].iloc[0]
        assert observed["repeats"] == (ctx["kind"].iloc[0] == "repetition")  # ngram 1: the token itself
    text = (project / "results/toy/stepwise/table3.md").read_text()
    assert text.startswith("### Table 3") and text.count("**Context") == STEPWISE["examples"]
    assert metrics["claim"]["verdict"] in ("holds", "fails", "inconclusive")
    assert metrics["contexts"] == 2 * metrics["pairs"]
    assert not (project / "results/toy/.stepwise.tmp-checkpoint").exists()


def test_a_zero_energy_gives_back_the_base_lm(project: Path) -> None:
    """E ≡ 0: every Z_c is 1 exactly, so the joint over the top K is the renormalised base LM."""
    from stages import stepwise as stage

    metrics = stage.run("toy", params_with(project, "p-unit.yaml", energy="unit"), root=project, progress=False)
    table = pq.read_table(project / "data/toy/stepwise/candidates.parquet").to_pandas()
    np.testing.assert_allclose(table["joint_logprob"], table["base_logprob"], atol=1e-12)
    np.testing.assert_allclose(table["joint_logprob_low"], table["joint_logprob_high"], atol=1e-12)
    assert metrics["claim"]["verdict"] == "inconclusive"
    assert metrics["claim"]["repetition"]["mean_log_ratio"]["mean"] == pytest.approx(0.0, abs=1e-9)


def test_a_killed_run_resumes_with_identical_output(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.io import ArrayCheckpoint
    from stages import stepwise as stage

    params = params_with(project, "p-resume.yaml")
    stage.run("toy", params, root=project, progress=False)
    reference = pq.read_table(project / "data/toy/stepwise/candidates.parquet")

    saved = ArrayCheckpoint.save
    calls = {"n": 0}

    def dies_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return saved(self, *args, **kwargs)

    monkeypatch.setattr(ArrayCheckpoint, "save", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage.run("toy", params, root=project, progress=False)
    monkeypatch.setattr(ArrayCheckpoint, "save", saved)
    metrics = stage.run("toy", params, root=project, progress=False)
    assert metrics["pool"]["contexts_reused"] == 2
    assert metrics["pool"]["contexts_computed"] == metrics["contexts"] - 2
    assert pq.read_table(project / "data/toy/stepwise/candidates.parquet").equals(reference)


def test_generate_method_stepwise_decodes_a_prompt(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.cli import app

    monkeypatch.chdir(project)
    params_with(project, "p-cli.yaml", candidates=6, samples=4, renormalise_top=4)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "toy", "--params", "p-cli.yaml", "--method", "stepwise",
                                 "--prompt", "word1 and more words 3 word7"])
    assert result.exit_code == 0, result.output
    assert "top-6 auto-regressive sampling, 4 completions per candidate" in result.output
    again = runner.invoke(app, ["generate", "toy", "--params", "p-cli.yaml", "--method", "stepwise",
                                "--prompt", "word1 and more words 3 word7"])
    assert again.output.split("-" * 60)[1] == result.output.split("-" * 60)[1]  # seeded (progress bars aside)
    missing = runner.invoke(app, ["generate", "toy", "--params", "p-cli.yaml", "--method", "stepwise"])
    assert missing.exit_code == 2 and "decodes a prompt: give --prompt or --prompt-file" in missing.output
    wrong = runner.invoke(app, ["generate", "toy", "--params", "p-cli.yaml", "--method", "beam"])
    assert wrong.exit_code == 2 and "choose algorithm1 or stepwise" in wrong.output


def test_bad_stepwise_params_name_the_key(project: Path) -> None:
    from pipeline.core.errors import RebmError
    from stages import stepwise as stage

    with pytest.raises(RebmError, match=r"stepwise.*show \(6\) exceeds renormalise_top \(5\)"):
        stage.run("toy", params_with(project, "p-bad.yaml", show=6), root=project, progress=False)
