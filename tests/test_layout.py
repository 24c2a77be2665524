"""The library's folders are the pipeline's phases, and each phase stands only on those before it.

    core -> data -> models -> sampling -> estimation -> training -> generation -> reporting -> tools

A module may import its own phase or an earlier one, at module level or inside a function; no
import cycle remains between modules. Stage modules are recipes: params in, library, outputs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_dvc_deps import REPO

PHASES = ("core", "data", "models", "sampling", "estimation", "training", "generation", "reporting", "tools")
MODULES = sorted(p for p in (REPO / "pipeline").rglob("*.py"))


def phase_of(path: Path) -> str:
    parts = path.relative_to(REPO / "pipeline").parts
    return parts[0] if len(parts) > 1 else ""


def pipeline_imports(path: Path) -> set[Path]:
    """The pipeline/**/*.py files `path` imports anywhere in its body."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("pipeline.")]
        for name in names:
            file = REPO / (name.replace(".", "/") + ".py")
            if file.exists():
                found.add(file)
    return found


def test_every_module_sits_in_a_phase() -> None:
    loose = [p.name for p in MODULES if phase_of(p) == "" and p.name != "__init__.py"]
    assert not loose, f"pipeline/: modules outside a phase folder: {loose}"
    assert {phase_of(p) for p in MODULES} - {""} == set(PHASES)


@pytest.mark.parametrize("module", [m for m in MODULES if phase_of(m)], ids=lambda m: str(m.relative_to(REPO)))
def test_a_phase_imports_only_earlier_phases(module: Path) -> None:
    rank = PHASES.index(phase_of(module))
    later = sorted(str(t.relative_to(REPO)) for t in pipeline_imports(module) if PHASES.index(phase_of(t)) > rank)
    assert not later, f"{module.relative_to(REPO)} ({PHASES[rank]}) imports later phases: {later}"


def test_no_import_cycle_between_modules() -> None:
    graph = {m: pipeline_imports(m) - {m} for m in MODULES}
    state: dict[Path, int] = {}  # 1: on the current path, 2: done

    def visit(node: Path, path: list[Path]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(str(p.relative_to(REPO)) for p in cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_the_walk_resolves_phase_imports() -> None:
    # the walk must resolve `from pipeline.<phase> import <module>`, or the checks above see nothing
    assert REPO / "pipeline/reporting/report.py" in pipeline_imports(REPO / "stages/report.py")
    assert REPO / "pipeline/training/loop.py" in pipeline_imports(REPO / "pipeline/training/distributed.py")


STAGE_FILES = sorted(p for p in (REPO / "stages").glob("*.py") if p.name not in ("__init__.py", "cli.py"))


@pytest.mark.parametrize("stage", STAGE_FILES, ids=lambda p: p.name)
def test_stage_modules_are_recipes(stage: Path) -> None:
    lines = len(stage.read_text(encoding="utf-8").splitlines())
    assert lines <= 90, f"{stage.relative_to(REPO)}: {lines} lines; move the logic into pipeline/"
    other_stages = [n for n in ast.walk(ast.parse(stage.read_text(encoding="utf-8")))
                    if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("stages")]
    assert not other_stages, f"{stage.name} imports another stage"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80  # issue 29: rooms a reader can hold in mind


def test_no_module_or_function_outgrows_a_reading() -> None:
    too_long = []
    for path in [*MODULES, *sorted((REPO / "stages").glob("*.py"))]:
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO)
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES}; split it by job)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)
