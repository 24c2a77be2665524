"""The run's provenance in the report: the params file and its hash, the git revision and whether
the working tree is dirty for code or params (not for the pipeline outputs dvc.yaml declares),
the library versions, the platform and the date."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Provenance:
    params_path: str
    params_text: str
    params_sha256: str
    git_revision: str  # "unknown" without git or outside a repository
    git_dirty: bool | None  # code or params changed since the revision; None when unknown
    dirty_files: list[str]  # the changed tracked files that make it dirty
    output_changes: int  # changed tracked files left out: pipeline outputs (dvc.yaml) and dvc.lock
    versions: dict[str, str]  # python, torch, dvc, ...
    platform: str
    date: str


def _git(root: Path, *args: str) -> str | None:
    """stdout of a read-only git command in `root`, or None (no git, not a repository, error)."""
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pipeline_outputs(root: Path = Path(".")) -> list[re.Pattern[str]]:
    """What `dvc repro` itself rewrites: every path a stage of root/dvc.yaml declares under outs,
    metrics or plots (a foreach stage's `${...}` standing for any one path component, a
    directory for everything under it), and dvc.lock. Without a readable dvc.yaml, dvc.lock only."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        stages = {}
    declared = ["dvc.lock"]
    for stage in stages.values():
        body = stage.get("do", stage)  # a foreach stage declares its outputs under `do`
        for key in ("outs", "metrics", "plots"):
            declared += [entry if isinstance(entry, str) else next(iter(entry)) for entry in body.get(key) or []]
    return [_path_pattern(path) for path in declared]


def _path_pattern(declared: str) -> re.Pattern[str]:
    """results/${key}/metrics.json -> a pattern for results/<any one component>/metrics.json and
    every path under it."""
    literal_parts = re.split(r"\$\{[^}]*\}", declared)
    return re.compile("[^/]+".join(map(re.escape, literal_parts)) + "(/.*)?")


def changed_files(root: Path = Path(".")) -> list[str] | None:
    """Tracked files whose content differs from HEAD (staged or not), relative to root; None
    without git or outside a repository."""
    out = _git(root, "diff", "--name-only", "-z", "--no-renames", "--relative", "HEAD")
    return None if out is None else [f for f in out.split("\0") if f]


def collect_provenance(params: Path, root: Path = Path(".")) -> Provenance:
    params = Path(params)
    text = params.read_text(encoding="utf-8")
    revision = _git(root, "rev-parse", "HEAD")
    changed = changed_files(root) if revision else None
    # A fresh `dvc repro` rewrites its git-tracked outputs before this stage runs: only changes
    # to code and params say the run is not the committed revision's.
    outputs = pipeline_outputs(root)
    dirty = [f for f in changed or [] if not any(o.fullmatch(f) for o in outputs)]
    return Provenance(
        params_path=str(params),
        params_text=text,
        params_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        git_revision=revision or "unknown",
        git_dirty=None if changed is None else bool(dirty),
        dirty_files=dirty,
        output_changes=len(changed or []) - len(dirty),
        versions={
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "dvc", "ray", "matplotlib")},
        },
        platform=platform.platform(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
