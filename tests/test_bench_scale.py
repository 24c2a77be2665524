"""`rebm bench scale`: the synthetic corpus goes through the real stages, and the report's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.core.errors import RebmError
from pipeline.tools import bench_scale as scale
from stages.cli import app
from tests.conftest import REPO


def test_each_measured_stage_runs_on_the_synthetic_corpus(tmp_path: Path) -> None:
    """In-process (the benchmark runs each in a fresh process): tokenize cuts the corpus into
    windows, train_ebm streams every train window with its one synthetic sample, evaluate reads
    evaluate.windows of a test split as large as train."""
    tokenizer, _ = scale.bench_tokenizer(tmp_path / "no-repo", tmp_path)  # no default tokenizer: one made here
    project = tmp_path / "p"
    scale.write_corpus(project, tokenizer, train_tokens=40 * scale.DOC_TOKENS)
    params = scale.write_params(project, REPO / "params.yaml", tokenizer)
    windows = scale.run_tokenize(project)["windows"]
    # text decoded from random ids re-encodes into somewhat more tokens (other merges); stride = T = 160
    assert 1.0 <= windows["train"] / (40 * scale.DOC_TOKENS / 160) <= 1.5
    assert windows["test"] == pytest.approx(windows["train"], rel=0.05)
    scale.write_negatives(project, prefix_len=120)
    trained = scale.run_train_ebm(project)
    assert trained == {"train_windows": windows["train"], "steps": 3}
    evaluated = scale.run_evaluate(project)
    cap = yaml.safe_load(params.read_text())["evaluate"]["windows"]
    assert evaluated["test_windows"] == windows["test"] and evaluated["evaluated"] == cap
    assert evaluated["mean_logprob"] < 0


def test_report_is_flat_by_the_ratio_to_the_smallest_size(tmp_path: Path, monkeypatch) -> None:
    rss = {"tokenize": [500.0, 560.0], "train_ebm": [520.0, 700.0], "evaluate": [530.0, 530.0]}
    monkeypatch.setattr(scale, "write_corpus", lambda *a, **k: None)
    monkeypatch.setattr(scale, "write_negatives", lambda *a, **k: None)
    monkeypatch.setattr(scale, "bench_tokenizer", lambda *a: (tmp_path, "test"))
    calls = []

    def measure(stage: str, project: Path):
        calls.append((stage, project.name))
        return rss[stage][len([c for c in calls if c[0] == stage]) - 1], {"ok": True}, 1.0

    monkeypatch.setattr(scale, "measure", measure)
    result = CliRunner().invoke(app, ["bench", "scale", "--sizes", "0.5,2", "--workdir", str(tmp_path / "w"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sizes_gb"] == [0.5, 2.0] and report["peak_rss_mib"] == rss
    assert report["flat"] == {"tokenize": True, "train_ebm": False, "evaluate": True}  # 700 / 520 > 1.3
    assert calls[:3] == [("tokenize", "size-0.5gb"), ("train_ebm", "size-0.5gb"), ("evaluate", "size-0.5gb")]


@pytest.mark.parametrize("sizes", ["1", "2,1", "a,b", "0,1"])
def test_bad_sizes_are_refused(sizes: str) -> None:
    with pytest.raises(RebmError, match="--sizes"):
        scale.parse_sizes(sizes)
