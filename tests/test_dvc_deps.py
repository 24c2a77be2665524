"""dvc.yaml lists, for every stage, each pipeline module its code can run.

DVC reruns a stage only when a listed dep changes, so a module missing from the list means a
change to it (a loss, an estimator, a sampler) leaves stale outputs that `dvc status` calls
up to date. The stage's module is followed through its imports, function-level ones included. A phase
folder (`pipeline/estimation`) covers its modules and its templates; `.dvcignore` keeps
`__pycache__` out of the folder's hash.
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
NOT_DEPS = {"pipeline/__init__.py", "pipeline/core/__init__.py", "pipeline/core/errors.py", "pipeline/core/paths.py",
            "pipeline/core/io.py", "pipeline/core/config.py", "pipeline/core/config_eval.py",
            "pipeline/core/config_train.py", "pipeline/core/section.py"}


def imported_modules(path: Path) -> set[str]:
    """pipeline/*.py files that `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            names.add(node.module)
            # `from pipeline.phase import module` imports pipeline/phase/module.py
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
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


def covered(module: str, deps: set[str]) -> bool:
    """A module is a dep if it is listed itself or its phase folder is (`pipeline/estimation`)."""
    return module in deps or any(str(parent) in deps for parent in Path(module).parents)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dep(name: str) -> None:
    body = STAGES[name].get("do", STAGES[name])
    deps = set(body["deps"])
    stage_files = [d for d in deps if d.startswith("stages/")]
    assert len(stage_files) == 1, f"{name}: expected one stages/*.py dep, found {stage_files}"
    missing = sorted(m for m in code_of(stage_files[0]) if not covered(m, deps))
    assert not missing, f"dvc.yaml: stage {name} runs {missing} but does not list them in deps"


def test_the_import_walk_finds_function_level_imports() -> None:
    # evaluate's work imports pipeline.models.lm inside a method; the walk must see it, or the test above proves nothing
    assert "pipeline/models/lm.py" in imported_modules(REPO / "pipeline/estimation/evaluation_work.py")
    assert "pipeline/models/energy.py" in code_of("stages/evaluate.py")  # through pipeline/estimation/scoring.py


def test_folder_deps_ignore_bytecode() -> None:
    # a folder dep hashes every file in it: without this, importing the code would change the hash
    ignored = (REPO / ".dvcignore").read_text(encoding="utf-8").split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_the_walk_follows_from_phase_import_module() -> None:
    # `from pipeline.reporting import report` must reach pipeline/reporting/report.py
    assert "pipeline/reporting/report.py" in code_of("stages/report.py")


def per_dataset_deps(deps: list[str], dataset: str) -> list[str]:
    return [d for d in deps if Path(d).parts[1:2] == (dataset,)]


def test_report_deps_are_what_the_report_reads_for_every_dataset() -> None:
    # DVC cannot loop over ${datasets} inside one stage's deps, so `report` lists each dataset's
    # inputs by hand; pipeline/reporting/inputs.py declares them once and this holds the two equal,
    # for every key of datasets: in params.yaml (a new dataset fails here until it is listed)
    from pipeline.reporting.inputs import report_input_files

    deps = STAGES["report"]["deps"]
    datasets = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["datasets"]
    for dataset in datasets:
        wanted = [str(path) for path in report_input_files(dataset)]
        listed = per_dataset_deps(deps, dataset)
        assert not set(wanted) - set(listed), f"dvc.yaml: report does not list {sorted(set(wanted) - set(listed))}"
        assert not set(listed) - set(wanted), f"dvc.yaml: report lists {sorted(set(listed) - set(wanted))}, unread"
        assert len(listed) == len(set(listed)), f"dvc.yaml: report lists a {dataset} dep twice"
    stray = [d for d in deps if Path(d).parts[0] in ("data", "models") and Path(d).parts[1] not in datasets]
    assert not stray, f"dvc.yaml: report lists {stray}, of no dataset in params.yaml"
