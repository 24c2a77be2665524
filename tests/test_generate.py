"""Stage generate (Algorithm 1 on the test prefixes) and `rebm generate --prompt` on a toy run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import N_TEST, PREFIX, SEQ
from typer.testing import CliRunner

from pipeline.generation.resample import read_generations
from stages import generate as stage
from stages.cli import app


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_toy_run

    return build_toy_run(tmp_path_factory.mktemp("generate"))


def params_with(root: Path, **generate) -> Path:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"].update(generate)
    path = root / "params-run.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def metrics(project: Path) -> dict:
    return stage.run("toy", project / "params.yaml", root=project, progress=False)


def test_one_row_per_prefix_with_consistent_energies_and_logprobs(project: Path, metrics: dict) -> None:
    from transformers import AutoTokenizer

    from pipeline.estimation.perplexity import continuation_logprobs
    from pipeline.estimation.scoring import score_windows
    from pipeline.models.energy import EnergyScorer, load_energy
    from pipeline.models.lm import load_lm

    table = read_generations(project / "data/toy/generations/generations.parquet").to_pydict()
    assert len(table["window_id"]) == N_TEST and metrics["windows"] == N_TEST
    prefix = np.array(table["prefix_ids"])
    assert prefix.shape == (N_TEST, PREFIX)
    lm = load_lm(project / "models/toy/lm/base")
    model, body_tok = load_energy(project / "models/toy/energy/bit")
    scorer = EnergyScorer(model.eval(), body_tok, AutoTokenizer.from_pretrained(project / "data/toy/tokenizer"))
    for system in ("gold", "base", "joint", "worst"):
        windows = np.concatenate([prefix, np.array(table[f"{system}_ids"])], axis=1)
        assert windows.shape == (N_TEST, SEQ)
        np.testing.assert_allclose(score_windows(scorer, windows, 64), table[f"{system}_energy"], atol=1e-5)
        expected_lp = continuation_logprobs(lm, windows, PREFIX).sum(1)  # full softmax, also for top-k samples
        np.testing.assert_allclose(table[f"{system}_lm_logprob"], expected_lp, atol=1e-3)
    # The worst sample has the highest energy of all n; the joint one is never above it.
    assert (np.array(table["worst_energy"]) >= np.array(table["joint_energy"])).all()
    assert (np.array(table["worst_energy"]) >= np.array(table["base_energy"])).all()
    for name in ("unique_ngrams.tsv", "density_base_lm.tsv", "density_joint.tsv", "examples.md", "metrics.json"):
        assert (project / "results/toy/generation" / name).stat().st_size > 0
    assert set(metrics["loglik_density"]) == {"base_lm", "joint"}
    assert not (project / "results/toy/.generation.tmp-checkpoint").exists()


def test_rerun_is_identical(project: Path, metrics: dict) -> None:
    first = read_generations(project / "data/toy/generations/generations.parquet")
    stage.run("toy", project / "params.yaml", root=project, progress=False)
    assert read_generations(project / "data/toy/generations/generations.parquet").equals(first)


def test_zero_energy_resamples_uniformly(project: Path) -> None:
    """E ≡ 0: every weight is equal, so Algorithm 1 is plain top-k sampling (ESS = n)."""
    out = stage.run("toy", params_with(project, energy="unit"), root=project, progress=False)
    table = read_generations(project / "data/toy/generations/generations.parquet").to_pydict()
    np.testing.assert_allclose(table["ess"], 6.0)
    assert out["ess"]["min"] == pytest.approx(6.0)
    assert np.allclose(table["joint_energy"], 0.0)


def test_prompt_prints_base_and_joint_side_by_side(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    result = stage.run_prompt("toy", Path("params.yaml"), "word3 and more words 5 word9")
    assert result["samples"] == 6 and result["base_text"] and result["joint_text"]
    again = stage.run_prompt("toy", Path("params.yaml"), "word3 and more words 5 word9")
    assert again == result  # seeded by (seed, prompt)
    cli = CliRunner().invoke(app, ["generate", "toy", "--prompt", "word3 and more words 5 word9", "--samples", "4"])
    assert cli.exit_code == 0, cli.output
    assert "BASE LM" in cli.output and "JOINT (bit, resampled from 4" in cli.output
    both = CliRunner().invoke(app, ["generate", "toy", "--prompt", "x", "--prompt-file", "p.txt"])
    assert both.exit_code == 2 and "not both" in both.output
    missing = CliRunner().invoke(app, ["generate", "toy", "--prompt-file", "nope.txt"])
    assert missing.exit_code == 2 and "nope.txt" in missing.output


def test_missing_energy_names_the_stage(project: Path) -> None:
    from pipeline.core.errors import RebmError

    with pytest.raises(RebmError, match="train_ebm_bit_star@toy"):
        stage.run("toy", params_with(project, energy="bit_star"), root=project, progress=False)


def test_humaneval_export_reads_the_stage_output(project: Path, metrics: dict, monkeypatch) -> None:
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["humaneval", "export", "toy", "--out", "reports/humaneval"])
    assert result.exit_code == 0, result.output
    assert (project / "reports/humaneval/sheet.html").exists() and (project / "reports/humaneval/pairs.csv").exists()
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["generations"] == {"toy": str(Path("data/toy/generations/generations.parquet"))}


class Interrupted(Exception):
    pass


def test_generation_streams_by_shard_and_resumes_from_the_finished_ones(project: Path, metrics: dict,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.generation import algorithm

    stage.run("toy", project / "params.yaml", root=project, progress=False)  # an uninterrupted run to compare with
    first = read_generations(project / "data/toy/generations/generations.parquet")
    real, calls = algorithm.GenerateWorker.sample_select, []

    def interrupted_at_the_second_shard(self, window_ids, *args):
        calls.append(len(window_ids))
        if len(calls) == 2:
            raise Interrupted
        out = real(self, window_ids, *args)
        # a shard comes back with the three picks' tokens, never its n samples' tokens
        assert {k: v.shape for k, v in out.items()} == {
            "energies": (len(window_ids), 6), "logprob": (len(window_ids), 6),
            **{f"{s}_ids": (len(window_ids), SEQ - PREFIX) for s in ("base", "joint", "worst")}}
        return out

    monkeypatch.setattr(algorithm.GenerateWorker, "sample_select", interrupted_at_the_second_shard)
    with pytest.raises(Interrupted):
        stage.run("toy", project / "params.yaml", root=project, progress=False)
    assert calls == [4, 2]  # shard_windows 4 over the 6 test prefixes

    def counted(self, window_ids, *args):
        calls.append(len(window_ids))
        return real(self, window_ids, *args)

    monkeypatch.setattr(algorithm.GenerateWorker, "sample_select", counted)
    stage.run("toy", project / "params.yaml", root=project, progress=False)
    assert calls == [4, 2, 2]  # only the missing shard is drawn again
    assert read_generations(project / "data/toy/generations/generations.parquet").equals(first)
