from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import HFSource, IngestConfig, TokenizeConfig, load_dataset_source, load_section
from pipeline.core.errors import RebmError
from tests.conftest import REPO, write_params


def test_repository_params_validate() -> None:
    params = REPO / "params.yaml"
    tok = load_section(TokenizeConfig, "tokenize", params)
    assert (tok.prefix_len, tok.seq_len, tok.continuation_len) == (120, 160, 40)
    load_section(IngestConfig, "ingest", params)
    assert load_dataset_source("news", params).source == "brown"
    assert load_dataset_source("fiction", params).source == "brown"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("tokenize: {vocab_size: 1000, prefix_len: 160, seq_len: 160, stride: 80}", r"prefix_len \(160\) must be below seq_len"),
        ("tokenize: {vocab_size: 1000, prefix_len: 10, seq_len: 16, stride: 80}", r"stride \(80\) must not exceed"),
        ("tokenize: {vocab_size: lots, prefix_len: 10, seq_len: 16, stride: 8}", r"tokenize\.vocab_size: Input should be a valid integer"),
        ("tokenize: {vocab_sise: 1000, prefix_len: 10, seq_len: 16, stride: 8}", r"tokenize\.vocab_sise: Extra inputs are not permitted"),
        ("other: {}", r"missing section 'tokenize'"),
    ],
)
def test_bad_tokenize_params_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    params = write_params(tmp_path / "params.yaml", body)
    with pytest.raises(RebmError, match=message) as info:
        load_section(TokenizeConfig, "tokenize", params)
    assert str(params) in str(info.value)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", "datasets: {news: {source: brown, categories: [news]}}")
    with pytest.raises(RebmError, match=r"unknown dataset 'books' \(datasets defined: news\)"):
        load_dataset_source("books", params)


def test_dataset_source_errors_are_prefixed_with_the_dataset_key(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", "datasets: {web: {source: hf, path: cc_news, max_docs: -1}}")
    with pytest.raises(RebmError, match=r"datasets\.web\.hf\.max_docs: Input should be greater than 0"):
        load_dataset_source("web", params)
    params = write_params(tmp_path / "params.yaml", "datasets: {web: {source: ftp}}")
    with pytest.raises(RebmError, match=r"datasets\.web: Input tag 'ftp' found using 'source'"):
        load_dataset_source("web", params)


def test_missing_or_broken_params_file(tmp_path: Path) -> None:
    with pytest.raises(RebmError, match="params file not found"):
        load_section(IngestConfig, "ingest", tmp_path / "nope.yaml")
    broken = write_params(tmp_path / "params.yaml", "ingest: [unclosed")
    with pytest.raises(RebmError, match="not valid YAML"):
        load_section(IngestConfig, "ingest", broken)


def test_hf_source_defaults() -> None:
    spec = HFSource(source="hf", path="cc_news")
    assert (spec.split, spec.text_column, spec.streaming, spec.rows_per_doc) == ("train", "text", True, 1)
