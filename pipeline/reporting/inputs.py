"""The report's inputs (`collect`): every dataset's evaluate and generate outputs, every stage's
wall time, the human-evaluation votes, the provenance and the seed spread, as a `ReportInputs`.
Pure apart from reading files; a missing stage output is an error naming the stage to run."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import read_params
from pipeline.core.errors import RebmError
from pipeline.core.paths import DatasetPaths, ReportPaths
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS
from pipeline.estimation.evaluation import evenly_spaced
from pipeline.reporting.claims import chance_level_reason
from pipeline.reporting.provenance import Provenance, collect_provenance
from pipeline.reporting.spread import load_spread

EXAMPLES_PER_DATASET = 3
EXAMPLE_COLUMNS = [
    "window_id", "prefix_text", "ess",
    *(f"{s}_{c}" for s in ("gold", "base", "joint", "worst") for c in ("text", "energy", "lm_logprob")),
]


# The files of one dataset that `collect_dataset` reads, by the folder that holds them. Declared
# once: `report_input_files` (and so the `report` stage's deps in dvc.yaml, which
# tests/test_dvc_deps.py checks against it) and the reader both use these names.
EVALUATION_FILES = ("metrics.json", "ppl_vs_samples.tsv", "position_ppl.tsv")
GENERATION_FILES = ("metrics.json", "unique_ngrams.tsv", "density_base_lm.tsv", "density_joint.tsv")
GENERATION_BASELINE = "baseline_metrics.json"  # in git, optional: the measurement to compare with
STEPWISE_FILES = ("metrics.json", "table3.md")  # optional: a run without stepwise has none


@dataclass(frozen=True)
class DatasetResults:
    """One dataset's evaluate and generate outputs."""

    name: str
    evaluation: dict[str, Any]  # results/<ds>/evaluation/metrics.json
    ppl_vs_samples: list[dict[str, Any]]  # Figure 2 (left)
    positions: list[dict[str, Any]]  # Figure 1
    generation: dict[str, Any]  # results/<ds>/generation/metrics.json
    unique_ngrams: list[dict[str, Any]]  # Figure 2 (right)
    density: dict[str, list[dict[str, Any]]]  # Figure 3: scorer ("base_lm", "joint") -> rows
    examples: list[dict[str, Any]]  # generations.parquet rows shown as Tables 5–6
    generation_baseline: dict[str, Any] | None = None  # baseline_metrics.json: label, commit, metrics
    not_applicable: dict[str, str] = field(default_factory=dict)  # variant -> why its stage trained nothing
    did_not_learn: dict[str, str] = field(default_factory=dict)  # energy -> its pair accuracy, at chance
    stepwise: dict[str, Any] | None = None  # results/<ds>/stepwise/metrics.json (Appendix A.1), if run
    table3: str | None = None  # results/<ds>/stepwise/table3.md


@dataclass(frozen=True)
class StageTime:
    stage: str  # e.g. train_lm_base@news
    path: str  # the JSON the stage wrote
    seconds: float | None
    status: str  # "ok", "missing" (no file), "not recorded" (file without a wall time), "unreadable"


@dataclass(frozen=True)
class HumanEval:
    pairs: str  # reports/humaneval/pairs.csv
    pairs_exist: bool
    votes: list[str]  # reports/humaneval/votes/*.csv
    markdown: str | None  # Table 2 from pipeline.generation.humaneval.score_votes, None without votes


@dataclass(frozen=True)
class ReportInputs:
    datasets: list[DatasetResults]
    stage_times: list[StageTime]
    human_eval: HumanEval
    provenance: Provenance
    seed_spread: dict | None = None  # results/seed_spread.json (`rebm seeds collect`), if measured


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if re.fullmatch(r"-?\d+", text) else value


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """A TSV written by pipeline.core.io.write_tsv, numbers parsed (an empty file is no rows)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh, delimiter="\t")]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RebmError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise RebmError(f"{path}: expected a JSON object")
    return payload


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise RebmError(f"{path}: not found; run stage {stage} first (dvc repro {stage})")
    return path


def collect_dataset(dataset: str, root: Path = Path("."), examples: int = EXAMPLES_PER_DATASET) -> DatasetResults:
    """Read one dataset's evaluate and generate outputs; a missing one names the stage to run."""
    from pipeline.generation.resample import read_generations

    paths = DatasetPaths(dataset, root)
    evaluate, generate = f"evaluate@{dataset}", f"generate@{dataset}"
    ev = {name: _require(paths.evaluation / name, evaluate) for name in EVALUATION_FILES}
    gen = {name: _require(paths.generation_results / name, generate) for name in GENERATION_FILES}
    table = read_generations(_require(paths.generations_file, generate), EXAMPLE_COLUMNS)
    rows = table.to_pylist()
    baseline = paths.generation_results / GENERATION_BASELINE
    stepwise = {name: paths.stepwise_results / name for name in STEPWISE_FILES}
    return DatasetResults(
        name=dataset,
        evaluation=_read_json(ev["metrics.json"]),
        ppl_vs_samples=read_tsv(ev["ppl_vs_samples.tsv"]),
        positions=read_tsv(ev["position_ppl.tsv"]),
        generation=_read_json(gen["metrics.json"]),
        unique_ngrams=read_tsv(gen["unique_ngrams.tsv"]),
        density={s: read_tsv(gen[f"density_{s}.tsv"]) for s in ("base_lm", "joint")},
        examples=[rows[i] for i in evenly_spaced(examples, len(rows))],
        generation_baseline=read_generation_baseline(baseline) if baseline.exists() else None,
        **variant_records(paths),
        stepwise=_read_json(stepwise["metrics.json"]) if stepwise["metrics.json"].exists() else None,
        table3=stepwise["table3.md"].read_text(encoding="utf-8").rstrip("\n")
        if stepwise["table3.md"].exists() else None,
    )


def report_input_files(dataset: str, root: Path = Path(".")) -> list[Path]:
    """Every file or folder of one dataset that the report reads: `collect_dataset`'s inputs,
    then each stage's metrics JSON (`stage_files`: wall times, not-applicable records, pair
    accuracies), without repeats. The `report` stage lists exactly these in dvc.yaml."""
    paths = DatasetPaths(dataset, root)
    files = [*(paths.evaluation / name for name in EVALUATION_FILES),
             *(paths.generation_results / name for name in (*GENERATION_FILES, GENERATION_BASELINE)),
             paths.generations,
             *(paths.stepwise_results / name for name in STEPWISE_FILES),
             *(path for _, path in stage_files(dataset, root))]
    return list(dict.fromkeys(files))


def variant_records(paths: DatasetPaths) -> dict[str, dict[str, str]]:
    """From each Table 1 variant's metrics JSON, read once: `not_applicable` {variant: reason}
    for a stage that recorded "not applicable" (null in params), and `did_not_learn`
    {energy: why} for a trained energy whose validation pair accuracy is not clear of chance."""
    not_applicable, did_not_learn = {}, {}
    for variant, path in [*((v, paths.lm_metrics(v)) for v in LM_VARIANTS),
                          *((v, paths.energy_metrics(v)) for v in ENERGY_VARIANTS)]:
        if not path.exists():
            continue
        payload = _read_json(path)
        if payload.get("applicable") is False:
            not_applicable[variant] = str(payload.get("reason", "not applicable"))
        elif variant in ENERGY_VARIANTS and (why := chance_level_reason(payload)) is not None:
            did_not_learn[variant] = why
    return {"not_applicable": not_applicable, "did_not_learn": did_not_learn}


def read_generation_baseline(path: Path) -> dict[str, Any]:
    """An earlier run's generation metrics to compare with: {"label", "commit", "metrics"}."""
    baseline = _read_json(path)
    if not isinstance(baseline.get("label"), str) or not isinstance(baseline.get("metrics"), dict):
        raise RebmError(f"{path}: expected an object with a label (text) and the metrics (an object)")
    return baseline


def stage_files(dataset: str, root: Path = Path(".")) -> list[tuple[str, Path]]:
    """(stage, the JSON holding its wall time) for every stage of one dataset, in pipeline order."""
    p = DatasetPaths(dataset, root)
    return [
        (f"ingest@{dataset}", p.ingest_stats),
        (f"tokenize@{dataset}", p.tokenize_stats),
        *((f"train_lm_{v}@{dataset}", p.lm_metrics(v)) for v in LM_VARIANTS),
        (f"negatives@{dataset}", p.negatives_stats),
        (f"pretrain_mlm@{dataset}", p.mlm_metrics),
        *((f"train_ebm_{v}@{dataset}", p.energy_metrics(v)) for v in ENERGY_VARIANTS),
        (f"evaluate@{dataset}", p.evaluation / "metrics.json"),
        (f"generate@{dataset}", p.generation_results / "metrics.json"),
        (f"stepwise@{dataset}", p.stepwise_results / "metrics.json"),
    ]


def wall_seconds(payload: dict[str, Any]) -> float | None:
    """A stage's wall time from its JSON: `stage_wall_seconds` (negatives), a number
    `wall_seconds` (training stages), or the `stage` entry of a `wall_seconds` dict
    (evaluate, generate); None if it records none."""
    for key in ("stage_wall_seconds", "wall_seconds"):
        value = payload.get(key)
        if isinstance(value, dict):
            value = value.get("stage")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def collect_stage_times(datasets: Sequence[str], root: Path = Path(".")) -> list[StageTime]:
    """Every stage's wall time; a missing or silent file is reported as such, never an error."""
    times = []
    for dataset in datasets:
        for stage, path in stage_files(dataset, root):
            shown = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            if not path.exists():
                times.append(StageTime(stage, shown, None, "missing"))
                continue
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                times.append(StageTime(stage, shown, None, "unreadable"))
                continue
            seconds = wall_seconds(payload) if isinstance(payload, dict) else None
            times.append(StageTime(stage, shown, seconds, "ok" if seconds is not None else "not recorded"))
    return times


def collect_human_eval(root: Path = Path(".")) -> HumanEval:
    """Table 2 if reports/humaneval/pairs.csv and votes/*.csv exist (a bad votes file is an error)."""
    paths = ReportPaths(root)
    votes = sorted(paths.humaneval_votes.glob("*.csv")) if paths.humaneval_votes.is_dir() else []
    markdown = None
    if paths.humaneval_pairs.exists() and votes:
        from pipeline.generation.humaneval import score_votes

        markdown = score_votes(paths.humaneval_pairs, votes).markdown()
    return HumanEval(str(paths.humaneval_pairs.relative_to(root)), paths.humaneval_pairs.exists(),
                     [str(v.relative_to(root)) for v in votes], markdown)


def collect(params: Path, root: Path = Path(".")) -> ReportInputs:
    """Everything the report shows, for every dataset key under `datasets:` in `params`."""
    keys = list(read_params(params).get("datasets") or {})
    if not keys:
        raise RebmError(f"{params}: datasets: no dataset to report on")
    datasets = [collect_dataset(k, root) for k in keys]  # fails first, before any other work
    return ReportInputs(
        datasets=datasets,
        stage_times=collect_stage_times(keys, root),
        human_eval=collect_human_eval(root),
        provenance=collect_provenance(params, root),
        seed_spread=load_spread(root),
    )
