"""Run-to-run spread of Table 1: the pipeline rerun under k seeds as DVC experiments.

Table 1's intervals cover the sampling of test documents with the models and LM samples held
fixed. Two honest runs also differ in what training draws (initialisation, batch order, the
negatives) and in the LM samples behind log Z; `seed` in params.yaml drives all of them (the
corpus split and tokenizer do not depend on it). `rebm seeds run` reproduces the preset's
targets once per seed with `dvc exp run --temp -S seed=<s>`: each run happens in a temporary
copy of the workspace, shares this repository's DVC cache and is kept as an experiment named
`seed-<s>` of the current commit (one that already exists is not run again, so an interrupted
sweep resumes). `rebm seeds collect` reads every run's Table 1 rows (the workspace's for the
seed of params.yaml) and writes results/seed_spread.json, which the report shows beside each row.

Outputs are bit-identical for one seed on one CPU kind, not across kinds: bf16 and fp32
training (`precision: auto`) and another reduction order give other numbers, as another seed
does. The spread measured here is on the machine that ran it.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.config import format_validation_error
from pipeline.core.errors import RebmError
from pipeline.core.io import write_json
from pipeline.reporting.spread import SPREAD_FILE, row_order, table1_rows


class SeedsPreset(BaseModel):
    """params/seeds.yaml: which seeds, and which stages each seed's run reproduces."""

    model_config = ConfigDict(extra="forbid")
    seeds: list[int] = Field(min_length=3)
    targets: list[str] = Field(default_factory=lambda: ["evaluate"], min_length=1)
    datasets: list[str] | None = None  # null: every dataset of params.yaml


def load_preset(path: Path) -> SeedsPreset:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return SeedsPreset.model_validate(raw)
    except FileNotFoundError:
        raise RebmError(f"{path}: no such seeds preset") from None
    except ValidationError as exc:
        raise RebmError(format_validation_error(path, "", exc)) from None


def experiment_name(seed: int) -> str:
    return f"seed-{seed}"


def _git(args: Sequence[str], root: Path) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def existing_experiments(root: Path) -> dict[str, str]:
    """{experiment name: its commit} for the experiments of the current commit."""
    head = _git(["rev-parse", "HEAD"], root).strip()
    refs = _git(["for-each-ref", "--format=%(refname) %(objectname)", f"refs/exps/{head[:2]}/{head[2:]}/"], root)
    return {ref.rsplit("/", 1)[-1]: sha for ref, sha in (line.split() for line in refs.splitlines())}


def workspace_seed(root: Path) -> int:
    return int(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))["seed"])


def run_seeds(preset: SeedsPreset, root: Path = Path("."),
              runner: Callable[[list[str], Path], None] | None = None) -> list[int]:
    """Run every seed of the preset but the workspace's own and those already kept; the seeds run."""
    def run(cmd: list[str], cwd: Path) -> None:
        subprocess.run(cmd, cwd=cwd, check=True)

    runner = runner or run
    if _git(["status", "--porcelain", "--untracked-files=no"], root).strip():
        raise RebmError("the workspace has uncommitted changes: commit them first (each seed's run starts "
                        "from the current commit, and its experiment is kept under it)")
    done = existing_experiments(root)
    ran = []
    for seed in preset.seeds:
        if seed == workspace_seed(root) or experiment_name(seed) in done:
            continue
        runner(["dvc", "exp", "run", "--temp", "-n", experiment_name(seed), "-S", f"seed={seed}",
                *preset.targets], root)
        ran.append(seed)
    return ran


NEXT_RUN_LEVEL = 0.95


def next_run_interval(values: np.ndarray, level: float = NEXT_RUN_LEVEL) -> tuple[float, float]:
    """Prediction interval for one more run's value from k runs: mean ± t_{k−1} · sd · √(1 + 1/k).

    The min–max of three seeds covers a fourth run only half the time (P = (k − 1)/(k + 1)); this
    interval covers it at `level` when runs scatter normally (tests/test_seeds.py simulates it).
    It is what a row's "reported uncertainty" means for a run on another machine."""
    from scipy.stats import t as student_t

    k = len(values)
    half = float(student_t.ppf((1 + level) / 2, k - 1) * values.std(ddof=1) * math.sqrt(1 + 1 / k))
    return float(values.mean()) - half, float(values.mean()) + half


def row_spread(values: dict[int, float]) -> dict:
    """Spread of one row over seeds: each seed's value, min, max, range, sample sd, range / mean,
    and the 95 % interval for the next run."""
    v = np.array(list(values.values()), dtype=np.float64)
    low, high = next_run_interval(v)
    return {
        "values": {str(s): round(x, 3) for s, x in values.items()},
        "min": round(float(v.min()), 3),
        "max": round(float(v.max()), 3),
        "range": round(float(np.ptp(v)), 3),
        "sd": round(float(v.std(ddof=1)), 3),
        "range_pct_of_mean": round(float(100 * np.ptp(v) / v.mean()), 3),
        "mean": round(float(v.mean()), 3),
        "next_run": [round(low, 3), round(high, 3)],
    }


def compare_run(spread: dict, evaluations: dict[str, dict]) -> list[dict]:
    """Another run's Table 1 (e.g. a fresh clone on another CPU kind) against the spread: for each
    row both have, the other value, the next-run interval and whether it covers the value
    ("covered"); a row it does not cover is "inconclusive" across runs: the spread understates
    what changes between them (another kind adds bf16 vs fp32 to what a seed changes)."""
    out = []
    for dataset, rows in spread["rows"].items():
        other = table1_rows(evaluations.get(dataset, {}))
        for row, s in sorted(rows.items(), key=lambda item: row_order(item[0])):
            if row not in other:
                continue
            low, high = s["next_run"]
            out.append({"dataset": dataset, "row": row, "value": round(other[row], 3), "next_run": [low, high],
                        "seeds_min_max": [s["min"], s["max"]],
                        "verdict": "covered" if low <= other[row] <= high else "inconclusive"})
    return out


def format_comparison(rows: list[dict]) -> str:
    lines = [f"{'dataset':8s} {'row':18s} {'value':>9s}  {'next run, 95 %':>19s}  {'seeds min–max':>19s}  verdict"]
    lines += [f"{r['dataset']:8s} {r['row']:18s} {r['value']:9.2f}  {r['next_run'][0]:8.2f} – {r['next_run'][1]:8.2f}"
              f"  {r['seeds_min_max'][0]:8.2f} – {r['seeds_min_max'][1]:8.2f}  {r['verdict']}" for r in rows]
    covered = sum(r["verdict"] == "covered" for r in rows)
    return "\n".join([*lines, f"{covered} of {len(rows)} rows covered by the next-run interval"])


def seed_spread(runs: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{dataset: {row: spread}} from {seed: {dataset: metrics.json}}; a row missing from any run is left out."""
    datasets = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    out = {}
    for dataset in datasets:
        rows = {seed: table1_rows(r[dataset]) for seed, r in runs.items()}
        common = set.intersection(*(set(r) for r in rows.values()))
        out[dataset] = {row: row_spread({seed: rows[seed][row] for seed in runs})
                        for row in sorted(common)}
    return out


def metrics_path(dataset: str) -> str:
    return f"results/{dataset}/evaluation/metrics.json"


def read_evaluations(root: Path, datasets: list[str]) -> dict[str, dict]:
    """{dataset: metrics.json} of a checkout's evaluate stage; a missing file is an error naming it."""
    out = {}
    for dataset in datasets:
        path = Path(root) / metrics_path(dataset)
        if not path.exists():
            raise RebmError(f"{path}: no such file (has that run reached `evaluate` for {dataset!r}?)")
        out[dataset] = json.loads(path.read_text(encoding="utf-8"))
    return out


def collect(preset: SeedsPreset, root: Path = Path("."), machine: dict | None = None) -> dict:
    """Every seed's Table 1 (its experiment's metrics, or the workspace's) → results/seed_spread.json."""
    datasets = preset.datasets or list(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))["datasets"])
    kept, own = existing_experiments(root), workspace_seed(root)
    runs, missing = {}, []
    for seed in preset.seeds:
        if seed != own and experiment_name(seed) not in kept:
            missing.append(seed)
            continue
        runs[seed] = {}
        for dataset in datasets:
            path = metrics_path(dataset)
            if seed == own:
                text = (root / path).read_text(encoding="utf-8") if (root / path).exists() else None
            else:
                shown = subprocess.run(["git", "show", f"{kept[experiment_name(seed)]}:{path}"], cwd=root,
                                       capture_output=True, text=True)
                text = shown.stdout if shown.returncode == 0 else None
            if text is None:
                raise RebmError(f"seed {seed}: no {path} (did its run reach `evaluate`?)")
            runs[seed][dataset] = json.loads(text)
    if missing:
        raise RebmError(f"no run for seeds {missing}: run `rebm seeds run` first")
    result = {
        "seeds": preset.seeds,
        "workspace_seed": own,
        "commit": _git(["rev-parse", "HEAD"], root).strip(),
        "machine": machine or {},
        "covers": "training (initialisation, batch order, negatives) and the LM samples behind log Z, on one "
                  "CPU kind; the test windows and documents are the same in every run",
        "rows": seed_spread(runs),
    }
    write_json(root / SPREAD_FILE, result)
    return result


def format_spread(result: dict) -> str:
    lines = [f"run-to-run spread over seeds {result['seeds']} (commit {result['commit'][:8]}):"]
    for dataset, rows in result["rows"].items():
        lines.append(f"  {dataset}")
        lines += [f"    {row:18s} {s['min']:9.2f} … {s['max']:9.2f}  range {s['range']:7.2f} "
                  f"({s['range_pct_of_mean']:.2f} % of the mean), sd {s['sd']:.2f}, next run "
                  f"{s['next_run'][0]:.2f} … {s['next_run'][1]:.2f}" for row, s in rows.items()]
    return "\n".join(lines)
