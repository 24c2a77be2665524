"""`ruff check .` is clean and selects at least pycodestyle, pyflakes, isort, bugbear and pyupgrade.

CI runs only `pytest` (.ci/run), so the lint runs here, from the repository root with the
configuration in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.test_dvc_deps import REPO

REQUIRED_RULES = {"E", "W", "F", "I", "B", "UP"}


def test_pyproject_selects_the_required_rules() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    selected = set(config["tool"]["ruff"]["lint"]["select"])
    assert REQUIRED_RULES <= selected, f"[tool.ruff.lint] select lacks {sorted(REQUIRED_RULES - selected)}"


def test_ruff_check_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff check . (exit {done.returncode}):\n{done.stdout}{done.stderr}"
