"""dvc.yaml lists, for every stage, each pipeline module its code can run.

DVC reruns a stage only when a listed dep changes, so a module missing from the list means a
change to it (a loss, an estimator, a sampler) leaves stale outputs that `dvc status` calls
up to date. The stage's module is followed through its imports, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Modules that decide where and whether a stage writes, never what: error messages, output
# paths, atomic writes, params validation (every value they let through is in params.yaml,
# which DVC tracks key by key).
NOT_DEPS = {"pipeline/__init__.py", "pipeline/errors.py", "pipeline/paths.py", "pipeline/io.py", "pipeline/config.py"}


def imported_modules(path: Path) -> set[str]:
    """pipeline/*.py files that `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            if node.module == "pipeline":
                names.update(f"pipeline.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("pipeline."))
    return {name.replace(".", "/") + ".py" for name in names}


def code_of(stage_file: str) -> set[str]:
    """Every pipeline module reachable from `stage_file` by imports (outside NOT_DEPS)."""
    seen: set[str] = set()
    todo = [stage_file]
    while todo:
        for module in imported_modules(REPO / todo.pop()):
            if module not in seen and module not in NOT_DEPS and (REPO / module).exists():
                seen.add(module)
                todo.append(module)
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dep(name: str) -> None:
    body = STAGES[name].get("do", STAGES[name])
    deps = set(body["deps"])
    stage_files = [d for d in deps if d.startswith("stages/")]
    assert len(stage_files) == 1, f"{name}: expected one stages/*.py dep, found {stage_files}"
    missing = sorted(code_of(stage_files[0]) - deps)
    assert not missing, f"dvc.yaml: stage {name} runs {missing} but does not list them in deps"


def test_the_import_walk_finds_function_level_imports() -> None:
    # evaluate's work imports pipeline.lm inside a method; the walk must see it, or the test above proves nothing
    assert "pipeline/lm.py" in imported_modules(REPO / "pipeline/evaluation_work.py")
    assert "pipeline/energy.py" in code_of("stages/evaluate.py")  # through pipeline/scoring.py
