"""The report of a finished run (stage `report`): reports/report.md and a self-contained report.html.

What it shows, for every dataset under `datasets:` in params.yaml:

* Table 1: test perplexity of every LM (exact) and joint model (the [T_n, U_n] range of Eq. 4,
  with whether its log Z estimate converged), the datasets side by side; the reference points
  beside it (bootstrap intervals of the ratio to BASE LM, the self-normalised perplexity) and
  the last-position check of Figure 1 (estimate vs exact);
* the paper's claims, each checked on these numbers (pipeline.reporting.claims);
* Figure 1 (per-position gain over BASE LM, Eq. 5), Figure 2 left (the range against the
  number of samples) and right (unique n-grams), Figure 3 (log-likelihood densities under the
  base LM and under the joint model), drawn with matplotlib (Agg) as PNG;
* the §4.3 sample statistics (and, when results/<ds>/generation/baseline_metrics.json exists,
  how they moved from that earlier run), example generations in the layout of Tables 5–6,
  Table 2 when a votes file exists (else how to make one), every stage's wall time and the
  provenance (the working tree is dirty only for code and params, not for pipeline outputs).

Three steps, each pure apart from reading files: `collect` gathers the stages' outputs into a
`ReportInputs`, `make_figures` draws the PNGs, `render_markdown` / `render_html` write the
page (the HTML is the Markdown converted by markdown-it-py, with the PNGs inlined as base64
data URIs and inline CSS: one file, no external resource).

The document text lives in Jinja2 templates next to this module, in templates/: report.md.j2
is the Markdown skeleton (headings, fixed paragraphs, figure captions, the order of sections),
filled from the _*.md.j2 partials (one per larger section, _macros.md.j2 the table and figure
blocks), and report.html.j2 is the HTML page with its CSS. This module computes what they show
(numbers, table rows as ready Markdown cells, figures) and passes it as plain values; the
templates escape free text with the `md` filter (md_escape), report.html.j2 is autoescaped, and
a variable a template names but is not given is an error (StrictUndefined).
"""

from __future__ import annotations

import base64
import csv
import datetime
import functools
import hashlib
import html
import importlib.metadata
import io
import json
import math
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from markupsafe import Markup

from pipeline.core.config import read_params
from pipeline.core.errors import RebmError
from pipeline.core.paths import DatasetPaths, ReportPaths
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, display_name
from pipeline.estimation.evaluation import evenly_spaced, format_parameters
from pipeline.estimation.evaluation_summary import drawn_label
from pipeline.reporting.claims import (
    NOT_CONVERGED,
    VERDICTS,
    chance_level_reason,
    check_claims,
    ci_level,
    ci_text,
    exact_vs_range,
    not_converged_why,
    verdict_label,
)
from pipeline.reporting.spread import load_spread, spread_section

SOURCE_COLOURS = {"real": "tab:red", "base": "black", "joint": "tab:green"}  # as in the paper's Figure 3
SOURCE_NAMES = {"real": "real text", "base": "BASE LM samples", "joint": "joint-model samples"}
EXAMPLES_PER_DATASET = 3
PREFIX_CHARS = 400  # the end of each example's prefix shown (Tables 5–6 show ~120 tokens)
FIGURES_DIR = "figures"  # image links in report.md are relative to reports/
TITLE = "Residual energy-based models for text generation: reproduction report"
EXAMPLE_COLUMNS = [
    "window_id", "prefix_text", "ess",
    *(f"{s}_{c}" for s in ("gold", "base", "joint", "worst") for c in ("text", "energy", "lm_logprob")),
]


# --------------------------------------------------------------------------- inputs
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


@dataclass(frozen=True)
class ReportInputs:
    datasets: list[DatasetResults]
    stage_times: list[StageTime]
    human_eval: HumanEval
    provenance: Provenance
    seed_spread: dict | None = None  # results/seed_spread.json (`rebm seeds collect`), if measured


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes


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
    ev = {name: _require(paths.evaluation / name, evaluate)
          for name in ("metrics.json", "ppl_vs_samples.tsv", "position_ppl.tsv")}
    gen = {name: _require(paths.generation_results / name, generate)
           for name in ("metrics.json", "unique_ngrams.tsv", "density_base_lm.tsv", "density_joint.tsv")}
    table = read_generations(_require(paths.generations_file, generate), EXAMPLE_COLUMNS)
    rows = table.to_pylist()
    baseline = paths.generation_results / "baseline_metrics.json"
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
        not_applicable=not_applicable_variants(paths),
        did_not_learn=energies_at_chance(paths),
        stepwise=_read_json(paths.stepwise_results / "metrics.json")
        if (paths.stepwise_results / "metrics.json").exists() else None,
        table3=(paths.stepwise_results / "table3.md").read_text(encoding="utf-8").rstrip("\n")
        if (paths.stepwise_results / "table3.md").exists() else None,
    )


def not_applicable_variants(paths: DatasetPaths) -> dict[str, str]:
    """{variant: reason} for the Table 1 variants whose stage recorded "not applicable" (null in params)."""
    found = {}
    for variant, path in [*((v, paths.lm_metrics(v)) for v in LM_VARIANTS),
                          *((v, paths.energy_metrics(v)) for v in ENERGY_VARIANTS)]:
        if path.exists():
            payload = _read_json(path)
            if payload.get("applicable") is False:
                found[variant] = str(payload.get("reason", "not applicable"))
    return found


def energies_at_chance(paths: DatasetPaths) -> dict[str, str]:
    """{energy: why} for the trained energies whose validation pair accuracy is not clear of chance."""
    found = {}
    for variant in ENERGY_VARIANTS:
        path = paths.energy_metrics(variant)
        if path.exists() and (why := chance_level_reason(_read_json(path))) is not None:
            found[variant] = why
    return found


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


# --------------------------------------------------------------------------- figures
def figure_names(dataset: str) -> dict[str, str]:
    return {k: f"{k}_{dataset}.png" for k in ("fig1", "fig2_left", "fig2_right", "fig3")}


def _new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _energies_in(rows: list[dict[str, Any]], suffix: str) -> list[str]:
    found = {k.removesuffix(suffix) for row in rows[:1] for k in row if k.endswith(suffix)}
    return [e for e in ENERGY_VARIANTS if e in found] + sorted(found - set(ENERGY_VARIANTS))


def _ordered(variants) -> list[str]:
    variants = list(variants)
    known = (*LM_VARIANTS, *ENERGY_VARIANTS)
    return [v for v in known if v in variants] + sorted(set(variants) - set(known))


def _energy_colour(variant: str) -> str:
    colours = {"unit": "tab:blue", "bit": "tab:orange", "bit_star": "tab:purple", "bit_large": "tab:red"}
    return colours.get(variant, "tab:gray")


def figure1(d: DatasetResults) -> bytes:
    """Per-position perplexity gain over BASE LM (Eq. 5), shaded between the bounds; the exact
    last position (and the estimate on the same windows) marked when evaluate computed it."""
    import numpy as np

    fig, (ax,) = _new_figure()
    x = np.array([r["position"] for r in d.positions], float)
    base = np.array([r["base_ppl"] for r in d.positions], float)
    for e in _energies_in(d.positions, "_gain_low"):
        low = np.array([r[f"{e}_gain_low"] for r in d.positions], float)
        high = np.array([r[f"{e}_gain_high"] for r in d.positions], float)
        colour = _energy_colour(e)
        ax.fill_between(x, low, high, color=colour, alpha=0.25, linewidth=0)
        ax.plot(x, high, color=colour, linewidth=1, label=f"{display_name(e)} (gain range)")
        ax.plot(x, low, color=colour, linewidth=1)
        if d.positions and f"{e}_converged" in d.positions[0]:
            # Positions whose LM-sample expectations failed the log Z rule: the range there is not evidence.
            open_ = np.array([not r[f"{e}_converged"] for r in d.positions])
            if open_.any():
                ax.plot(x[open_], ((low + high) / 2)[open_], marker="x", color="grey", linestyle="none",
                        label=f"{display_name(e)}: not converged at this position")
        last = d.evaluation.get("positions", {}).get(e, {}).get("last_position", {})
        if "exact_ppl" in last:
            ref = last["base_ppl_on_exact_windows"]
            at = x[-1] + 0.35
            est = (ref - last["estimated_ppl_high_on_exact_windows"], ref - last["estimated_ppl_low_on_exact_windows"])
            ax.errorbar([at], [sum(est) / 2], yerr=[[sum(est) / 2 - est[0]], [est[1] - sum(est) / 2]],
                        fmt="none", ecolor=colour, capsize=4, linewidth=2)
            ax.plot([at], [ref - last["exact_ppl"]], marker="*", markersize=12, color=colour, linestyle="none",
                    markeredgecolor="black",
                    label=f"{display_name(e)} exact, last position ({last.get('exact_windows', '?')} windows)")
    ax.axhline(0, color="black", linewidth=0.8)
    finite = base[np.isfinite(base)]
    # symlog: with few samples per position the bounds are heavy-tailed (U_n especially); the
    # linear part spans about a tenth of the BASE LM's perplexity, rounded to a power of ten.
    scale = 0.1 * float(np.median(finite)) if finite.size else 1.0
    ax.set_yscale("symlog", linthresh=10.0 ** round(math.log10(scale)) if scale > 0 else 1.0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position t of the window (continuation tokens only)")
    ax.set_ylabel("BASE LM ppl − joint ppl at t (symlog)")
    ax.set_title(f"Figure 1 — {d.name}: perplexity gain over BASE LM per position", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def figure2_left(d: DatasetResults) -> bytes:
    """The joint-model perplexity range against the number of LM samples per prefix (log x), out
    to the largest n evaluated; an energy evaluated with fewer samples stops at its own n."""
    fig, (ax,) = _new_figure()
    samples = [r["samples"] for r in d.ppl_vs_samples]
    for e in _energies_in(d.ppl_vs_samples, "_ppl_low"):
        # Rows beyond this energy's n_eval hold empty cells ("" or nan): skip them.
        rows = [r for r in d.ppl_vs_samples if _finite(r[f"{e}_ppl_low"]) and _finite(r[f"{e}_ppl_high"])]
        n = [r["samples"] for r in rows]
        low = [r[f"{e}_ppl_low"] for r in rows]
        high = [r[f"{e}_ppl_high"] for r in rows]
        colour = _energy_colour(e)
        ax.fill_between(n, low, high, color=colour, alpha=0.25, linewidth=0)
        ax.plot(n, high, color=colour, marker="v", markersize=4, linewidth=1, label=f"{display_name(e)} upper (U_n)")
        ax.plot(n, low, color=colour, marker="^", markersize=4, linewidth=1, label=f"{display_name(e)} lower (T_n)")
    base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
    if base is not None:
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"BASE LM ({base:.2f})")
    ax.set_xscale("log", base=2)
    if samples:
        ax.set_xticks(samples, [str(s) for s in samples])
        ax.minorticks_off()
    ax.set_xlabel("LM samples per prefix (n)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Figure 2 (left) — {d.name}: joint perplexity range vs samples", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def figure2_right(d: DatasetResults) -> bytes:
    """Percentage of unique n-grams in real text, BASE LM samples and joint samples."""
    fig, (ax,) = _new_figure()
    ns = [r["n"] for r in d.unique_ngrams]
    sources = [s for s in ("real", "base", "joint") if d.unique_ngrams and s in d.unique_ngrams[0]]
    width = 0.8 / max(1, len(sources))
    for i, s in enumerate(sources):
        xs = [n + (i - (len(sources) - 1) / 2) * width for n in ns]
        ax.bar(xs, [r[s] for r in d.unique_ngrams], width=width, color=SOURCE_COLOURS[s], label=SOURCE_NAMES[s],
               alpha=0.85)
    values = [r[s] for r in d.unique_ngrams for s in sources]
    if values:
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values)) + 2)
    ax.set_xticks(ns, [f"{n}-grams" for n in ns])
    ax.set_ylabel("unique n-grams (%)")
    ax.set_title(f"Figure 2 (right) — {d.name}: unique n-grams per continuation", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(sources))
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def figure3(d: DatasetResults) -> bytes:
    """Densities of sequence log-likelihoods of real/base/joint continuations under the base LM
    (left) and under the joint model (right), means dashed, gaps to real text in the legend."""
    fig, axes = _new_figure(width=10, height=4, ncols=2)
    titles = {"base_lm": "scored by BASE LM", "joint": "scored by the joint model (up to log Z)"}
    for ax, scorer in zip(axes, ("base_lm", "joint"), strict=True):
        rows = d.density[scorer]
        stats = d.generation.get("loglik_density", {}).get(scorer, {})
        x = [r["loglik"] for r in rows]
        for s in ("real", "base", "joint"):
            if not rows or s not in rows[0]:
                continue
            mean = stats.get("sources", {}).get(s, {}).get("mean")
            gap = stats.get("mean_gap", {}).get(s)
            label = SOURCE_NAMES[s] + (f", gap to real {gap:.2f}" if gap is not None else "")
            ax.plot(x, [r[s] for r in rows], color=SOURCE_COLOURS[s], linewidth=1.5, drawstyle="steps-mid", label=label)
            if mean is not None:
                ax.axvline(mean, color=SOURCE_COLOURS[s], linestyle="--", linewidth=1)
        gaps = stats.get("mean_gap", {})
        suffix = ""
        if {"base", "joint"} <= set(gaps):
            suffix = f"\nmean gap real−base {gaps['base']:.2f}, real−joint {gaps['joint']:.2f}"
        ax.set_title(f"{titles[scorer]}{suffix}", fontsize=9)
        ax.set_xlabel("sequence log-likelihood of the continuation")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Figure 3 — {d.name}: log-likelihood densities", fontsize=10)
    return _png(fig)


def make_figures(inputs: ReportInputs) -> dict[str, bytes]:
    """Every figure of every dataset as PNG bytes, keyed by file name (see figure_names).
    Figure 1 is left out for a dataset evaluated without per-position estimates."""
    figures = {}
    for d in inputs.datasets:
        names = figure_names(d.name)
        if d.positions:
            figures[names["fig1"]] = figure1(d)
        figures[names["fig2_left"]] = figure2_left(d)
        figures[names["fig2_right"]] = figure2_right(d)
        figures[names["fig3"]] = figure3(d)
    return figures


# --------------------------------------------------------------------------- markdown
TEMPLATES = Path(__file__).parent / "templates"
DIRTY_FILES_SHOWN = 5
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def md_escape(text: str) -> str:
    """Text as literal Markdown on one line (generated text can hold *, _, <, |, &, line breaks or
    control characters: breaks become ⏎, control characters U+FFFD, Markdown syntax is escaped)."""
    one_line = re.sub(r" {2,}", " ", " ⏎ ".join(line.strip() for line in str(text).splitlines()).replace("\t", " "))
    return _MD_SPECIAL.sub(r"\\\1", _CONTROL.sub("\ufffd", one_line))


@functools.cache
def _templates() -> jinja2.Environment:
    """templates/: *.md.j2 as plain text (the `md` filter escapes), *.html.j2 autoescaped; a
    variable a template names but is not given is an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["md"] = md_escape
    env.globals.update(figures_dir=FIGURES_DIR, not_converged=NOT_CONVERGED, dirty_files_shown=DIRTY_FILES_SHOWN)
    return env


def render_template(name: str, **context: Any) -> str:
    return _templates().get_template(name).render(**context)


def _lines(block: str) -> list[str]:
    """A rendered block (ending with its blank line) as lines, the last one "" as before."""
    return block.split("\n")[:-1]


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _n_eval(evaluation: dict, energy: str) -> Any:
    """LM samples per prefix behind an energy's log Z (older metrics: one n for every energy)."""
    joint = evaluation.get("joint", {}).get(energy, {})
    n = joint.get("n_eval", evaluation.get("n_eval", "?"))
    n = n.get(energy, "?") if isinstance(n, dict) else n
    return drawn_label(joint) if "n_eval" in joint else n


def _joint_gain(j: dict) -> str:
    """The 'vs BASE LM' cell of a joint range: a gain only from a converged log Z estimate."""
    if "convergence" not in j:
        return "— (convergence not checked)"
    if not j["convergence"]["converged"]:
        return "— (not converged)"
    return f"{j['vs_base_pct_low']:+.2f}% … {j['vs_base_pct_high']:+.2f}%"


def _diagnostics_note(j: dict) -> str:
    """'; k̂ 0.31, ESS ≥ 812 of 4096': the PSIS evidence beside a log Z verdict ('' in older metrics)."""
    diag = j.get("convergence", {}).get("diagnostics")
    if diag is None:
        return ""
    ess = diag["ess_min"]
    digits = 1 if ess < 10 else 0  # 2.5 of 4096 must not read as 2
    return f"; k̂ {diag['pooled_khat']:.2f}, ESS ≥ {ess:.{digits}f} of {diag['samples']}"


def _headline(datasets: Sequence[DatasetResults]) -> list[str]:
    """One line per dataset on the best-placed joint model (BIT-LARGE*, else BIT-BASE*): its range
    against BASE LM with the paired interval and verdict. A range whose log Z did not converge says
    so first: its numbers state no gain."""
    lines = []
    for d in datasets:
        joint = d.evaluation.get("joint", {})
        base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
        variant = next((v for v in ("bit_large", "bit_star") if v in joint), None)
        if variant is None or base is None:
            continue
        j = joint[variant]
        converged = j.get("convergence", {}).get("converged") is not False
        pair = d.evaluation.get("paired", {}).get(f"{variant}/base", {})
        ci = pair.get("ci")
        # No verdict from an unconverged range: its interval is shown, not read.
        verdict = f", {pair.get('below', 'inconclusive')}" if converged else ""
        interval = "no paired interval" if ci is None else f"paired {ci_level(d.evaluation)} CI of the ratio to " \
            f"BASE LM [{ci[0]:.3f}, {ci[1]:.3f}]{verdict}"
        text = (f"{display_name(variant)} {_fmt(j['ppl_low'])}–{_fmt(j['ppl_high'])} vs BASE LM {_fmt(base)} "
                f"({interval})")
        if not converged:
            lines.append(f"**{md_escape(d.name)}: log Z NOT CONVERGED, so this range states no gain** — "
                         f"{md_escape(text)}; {md_escape(not_converged_why(j))}")
        else:
            lines.append(f"**{md_escape(d.name)}**: {md_escape(text)}; {md_escape(verdict_label(j))}"
                         f"{md_escape(_diagnostics_note(j))}")
    return lines


def _table1(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Table 1 with the datasets side by side: exact LM perplexity, joint [low–high] ranges with
    their convergence verdict; a note per dataset (windows, n, the convergence rule)."""
    def shown(variants: Sequence[str], key: str) -> list[str]:  # evaluated or not applicable, in registry order
        present = {v for d in datasets for v in d.evaluation.get(key, {})}
        present |= {v for d in datasets for v in d.not_applicable if v in variants}
        return [v for v in variants if v in present] + sorted(present - set(variants))

    lms, joints = shown(LM_VARIANTS, "perplexity"), shown(ENERGY_VARIANTS, "joint")
    rows = []

    def absent(d: DatasetResults, v: str) -> list[str]:  # a dataset's cells for a row it has no number for
        return ["not applicable" if v in d.not_applicable else "—", "—", "—"]

    def params_cell(values: list[str]) -> str:
        distinct = list(dict.fromkeys(v for v in values if v))
        return " / ".join(distinct) or "—"

    for v in lms:
        cells, params = [], []
        for d in datasets:
            lm = d.evaluation.get("perplexity", {}).get(v)
            base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
            if lm is None:
                cells += absent(d, v)
                continue
            params.append(format_parameters(lm["parameters"]) if "parameters" in lm else "")
            vs = "—" if v == "base" or not base else f"{100 * (lm['ppl'] / base - 1):+.2f}%"
            cells += [_fmt(lm["ppl"]), "exact", vs]
        rows.append([display_name(v), params_cell(params), *cells])
    for v in joints:
        cells, params = [], []
        for d in datasets:
            j = d.evaluation.get("joint", {}).get(v)
            if j is None:
                cells += absent(d, v)
                continue
            if "energy_parameters" in j and "parameters" in j:
                params.append(f"{format_parameters(j['parameters'] - j['energy_parameters'])}"
                              f"+{format_parameters(j['energy_parameters'])}")
            cells += [f"{_fmt(j['ppl_low'])}–{_fmt(j['ppl_high'])}", verdict_label(j) + _diagnostics_note(j),
                      "— (did not learn)" if v in d.did_not_learn else _joint_gain(j)]
        rows.append([display_name(v), params_cell(params), *cells])
    notes = [{"name": d.name, "windows": _windows_used(ev), "tokens": ev.get("continuation_tokens", "?"),
              "n_eval": ", ".join(f"{_n_eval(ev, e)} ({display_name(e)})" for e in _ordered(ev.get("joint", {})))
              or "?",
              "epsilon": ev.get("convergence_epsilon", "?"),
              "rule": ev["convergence_rule"].rstrip(".") if "convergence_rule" in ev else None}
             for d in datasets for ev in [d.evaluation]]
    inapplicable = sorted({(display_name(v), why) for d in datasets for v, why in d.not_applicable.items()
                           if v in (*lms, *joints)})
    at_chance = [f"{display_name(v)} ({d.name}): {why}" for d in datasets for v, why in d.did_not_learn.items()
                 if v in joints]
    return {"names": [d.name for d in datasets], "rows": rows, "notes": notes,
            "not_applicable": [f"{name}: {why}" for name, why in inapplicable], "did_not_learn": at_chance}


def _ratio(value: float, base: float | None, ci: Sequence[float] | None, level: str) -> str:
    return "—" if not base else f"{value / base:.3f}, {ci_text(ci, level)}"


def _reference(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Beside Table 1: each model's perplexity ratio to BASE LM with its bootstrap interval, and
    what a joint model's perplexity would be were its energy self-normalised (log Z = 0)."""
    rows = []
    for d in datasets:
        ppl, level = d.evaluation.get("perplexity", {}), ci_level(d.evaluation)
        base = ppl.get("base", {}).get("ppl")
        for v in _ordered(set(ppl) - {"base"}):
            rows.append([md_escape(d.name), display_name(v),
                         _ratio(ppl[v]["ppl"], base, ppl[v].get("ratio_to_base_ci"), level), "— (normalised)"])
        joint = d.evaluation.get("joint", {})
        for v in _ordered(joint):
            j = joint[v]
            ratio = (f"T_n end {_ratio(j['ppl_low'], base, j.get('ratio_to_base_ci_low'), level)}; "
                     f"U_n end {_ratio(j['ppl_high'], base, j.get('ratio_to_base_ci_high'), level)}")
            if j.get("convergence", {}).get("converged") is False:
                ratio += " (log Z not converged)"
            self_normalised = "—"
            if "self_normalised_ppl" in j:
                self_normalised = (f"{_fmt(j['self_normalised_ppl'])} "
                                   f"({j['vs_base_pct_self_normalised']:+.2f}% vs BASE LM)")
            rows.append([md_escape(d.name), display_name(v), ratio, self_normalised])
    notes = [{"name": d.name, "resamples": b["resamples"], "seed": b["seed"], "level": ci_level(d.evaluation),
              "method": b.get("method", "percentile bootstrap over test windows"),
              "documents": b.get("documents", "?"), "covers": b.get("covers")}
             for d in datasets if (b := d.evaluation.get("bootstrap")) is not None]
    return {"rows": rows, "notes": notes}


def _windows_used(evaluation: dict) -> str:
    """'99' when every test window was scored, else '100 of 333 (evenly spaced)'."""
    used, available = evaluation.get("test_windows", "?"), evaluation.get("test_windows_available")
    if available is None or available == used:
        return str(used)
    return f"{used} of {available} (evenly spaced)"


def _last_position(datasets: Sequence[DatasetResults]) -> list[list[str]]:
    """Figure 1's sanity check (rows): at the last position the sum over the vocabulary is exact."""
    rows = []
    for d in datasets:
        positions = d.evaluation.get("positions", {})
        for e in _ordered(positions):
            last = positions[e].get("last_position", {})
            where = exact_vs_range(last)
            if where is None:
                continue
            low, high = last["estimated_ppl_low_on_exact_windows"], last["estimated_ppl_high_on_exact_windows"]
            rows.append([md_escape(d.name), display_name(e), str(last.get("exact_windows", "?")),
                         _fmt(last["base_ppl_on_exact_windows"]), f"{_fmt(low)}–{_fmt(high)}",
                         _fmt(last["exact_ppl"]), where])
    return rows


def _sample_stats(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """The §4.3 numbers behind Figures 2 (right) and 3."""
    rows = []
    for d in datasets:
        rep = _repetition(d.generation)
        dens = d.generation.get("loglik_density", {})
        for s in ("real", "base", "joint"):
            unique = [f"{r[s]:.1f}" if s in r else "—" for r in d.unique_ngrams]
            means = [dens.get(k, {}).get("sources", {}).get(s, {}).get("mean") for k in ("base_lm", "joint")]
            rows.append([md_escape(d.name), SOURCE_NAMES[s], *unique,
                         f"{100 * rep[s]:.2f}%" if s in rep else "—", _fmt(means[0]), _fmt(means[1])])
    notes = [{"name": d.name, "windows": g.get("windows", "?"), "energy": display_name(g.get("energy", "?")),
              "n_gen": g.get("n_gen", "?"), "top_k": g.get("top_k", "?"),
              "ess_mean": _fmt(g.get("ess", {}).get("mean")), "ess_min": _fmt(g.get("ess", {}).get("min"))}
             for d in datasets for g in [d.generation]]
    return {"ns": [r["n"] for r in (datasets[0].unique_ngrams if datasets else [])], "rows": rows, "notes": notes}


def _claims(datasets: Sequence[DatasetResults]) -> dict[str, Any]:
    """Every claim of the paper (pipeline.reporting.claims) with each dataset's verdict, claim by
    claim, and each dataset's (verdict, count) tally."""
    by_claim: dict[str, list[list[str]]] = {}
    counts = []
    for d in datasets:
        claims = check_claims(d.evaluation, d.generation, d.not_applicable, d.did_not_learn)
        for c in claims:
            by_claim.setdefault(c.claim, []).append(
                [md_escape(c.claim), md_escape(d.name), c.verdict, md_escape(c.evidence), md_escape(c.why) or "—"])
        counts.append({"name": d.name,
                       "tally": [(v, n) for v in VERDICTS if (n := sum(c.verdict == v for c in claims))]})
    return {"rows": [row for rows in by_claim.values() for row in rows], "counts": counts}


def _repetition(generation: dict) -> dict[str, float]:
    """Repeated 4-gram rate per source (the key names the n-gram and scope, e.g. _4gram_with_prefix)."""
    key = next((k for k in generation if k.startswith("repetition_rate_")), None)
    return generation.get(key, {}) if key else {}


def _sample_measures(generation: dict) -> dict[str, dict[str, str]]:
    """The §4.3 numbers compared across runs: measure -> source (base, joint) -> formatted value."""
    sequence = generation.get("unique_ngram_pct", {}).get("sequence", {})
    measures = {f"unique {n}-grams % (per sequence)": {s: f"{sequence[n][s]:.1f}" for s in ("base", "joint")
                                                      if s in sequence[n]}
                for n in sorted(sequence, key=int)}
    measures["repeated 4-grams (with prefix)"] = {s: f"{100 * v:.2f}%" for s, v in _repetition(generation).items()}
    density = generation.get("loglik_density", {})
    # Figure 3's comparison: each kind of sample scored by the model that generated it.
    gaps = {"base": density.get("base_lm", {}).get("mean_gap", {}).get("base"),
            "joint": density.get("joint", {}).get("mean_gap", {}).get("joint")}
    measures["Figure 3 mean gap to real text"] = {s: _fmt(v) for s, v in gaps.items() if v is not None}
    return measures


BASELINE_MUST_MATCH = ("energy", "n_gen", "top_k", "windows")  # generate settings a baseline must share


def _before_after(datasets: Sequence[DatasetResults]) -> dict[str, Any] | None:
    """The sample statistics of an earlier run (baseline_metrics.json) against this run's; None
    without one."""
    rows, notes, skipped = [], [], []
    for d in (d for d in datasets if d.generation_baseline is not None):
        # Only a baseline generated the same way is a "before": another energy or sample budget
        # (e.g. params/smollm2.yaml against the Brown default's measurement) is not compared.
        differ = [f"{key} {d.generation_baseline['metrics'].get(key)} vs {d.generation.get(key)}"
                  for key in BASELINE_MUST_MATCH
                  if d.generation_baseline["metrics"].get(key) != d.generation.get(key)]
        if differ:
            skipped.append({"name": d.name, "label": d.generation_baseline["label"], "differ": "; ".join(differ)})
            continue
        before, after = _sample_measures(d.generation_baseline["metrics"]), _sample_measures(d.generation)
        for measure in dict.fromkeys([*after, *before]):
            was, now = before.get(measure, {}), after.get(measure, {})
            rows.append([md_escape(d.name), measure,
                         *(f"{was.get(s, '—')} → {now.get(s, '—')}" for s in ("base", "joint"))])
        notes.append({"name": d.name, "label": d.generation_baseline["label"],
                      "commit": d.generation_baseline.get("commit")})
    return {"rows": rows, "notes": notes, "skipped": skipped} if rows or skipped else None


def _examples(d: DatasetResults) -> dict[str, Any]:
    """Example generations laid out as the paper's Tables 5–6 (prefix; BASE LM, worst, joint, gold):
    each sample's cells (text, energy, log P_LM)."""
    joint = display_name(d.generation.get("energy", "joint"))
    windows = []
    for row in d.examples:
        prefix = row["prefix_text"].strip()
        windows.append({
            "window_id": row["window_id"],
            "prefix": ("…" + prefix[-PREFIX_CHARS:]) if len(prefix) > PREFIX_CHARS else prefix,
            **{key: [md_escape(row[f"{key}_text"].strip()), f"{row[f'{key}_energy']:.3f}",
                     f"{row[f'{key}_lm_logprob']:.2f}"] for key in ("base", "worst", "joint", "gold")},
        })
    return {"name": d.name, "joint": joint, "short": joint.removeprefix("JOINT "), "windows": windows,
            "ess": [f"{r['ess']:.1f}" for r in d.examples]}


def _stepwise(d: DatasetResults) -> dict[str, Any]:
    """Table 3 and the repetition claim's rows (pipeline/generation/stepwise.py, `repetition_claims`)."""
    m = d.stepwise
    if m is None or d.table3 is None:
        return {"name": d.name, "table3": None}
    claim = m["claim"]

    def cell(entry: dict | None) -> str:
        return "—" if entry is None else f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"

    def share(entry: dict | None) -> str:
        if entry is None:
            return "—"
        return f"{entry['mean']:.2f} [{max(0.0, entry['low']):.2f}, {min(1.0, entry['high']):.2f}]"

    rows = [[label, cell(claim[key]["mean_log_ratio"]), share(claim[key]["share_lower"]), claim[key]["verdict"]]
            for label, key in (("repetition", "repetition"), ("control", "control"),
                               ("repetition − control", "repetition_minus_control"))]
    return {"name": d.name, "table3": d.table3, "pairs": claim["pairs"], "documents": claim["documents"],
            "candidates": m["candidates"], "samples": m["samples"], "level": f"{claim['level']:.0%}",
            "converged": f"{m['contexts_converged']} of {m['contexts']}", "rows": rows, "verdict": claim["verdict"]}


def _stage_times(times: Sequence[StageTime]) -> dict[str, Any]:
    rows, total, recorded = [], 0.0, 0
    for t in times:
        if t.seconds is not None:
            total += t.seconds
            recorded += 1
            cell = f"{_duration(t.seconds)} ({t.seconds:.1f} s)"
        else:
            cell = t.status
        rows.append([t.stage, cell, f"`{t.path}`"])
    return {"rows": rows, "total": f"{_duration(total)} ({total:.1f} s)", "recorded": recorded, "count": len(times)}


def stage_time_lines(times: Sequence[StageTime]) -> list[str]:
    return _lines(render_template("_stage_times.md.j2", stage_times=_stage_times(times)))


def _provenance(p: Provenance) -> dict[str, Any]:
    """The provenance and its params file in a code fence longer than any backtick run in it."""
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", p.params_text)), default=0) + 1)
    return {"provenance": p, "fence": fence, "params_text": p.params_text.rstrip("\n")}


def provenance_lines(p: Provenance) -> list[str]:
    return _lines(render_template("_provenance.md.j2", **_provenance(p)))


def _convergence_note(joint: dict) -> str:
    converged = joint.get("convergence", {}).get("converged")
    return not_converged_why(joint) if converged is False else f"log Z {verdict_label(joint)}"


def _figure1(d: DatasetResults, figures: dict[str, bytes]) -> dict[str, Any]:
    """What Figure 1's caption tells for this dataset; the star and its bar only where the exact
    last position was computed."""
    name = figure_names(d.name)["fig1"]
    pos = d.evaluation.get("positions", {})
    energies = [{"model": display_name(e), "windows": pos[e].get("windows", "?"), "samples": pos[e].get("samples", "?"),
                 "converged": pos[e].get("positions_converged"), "positions": pos[e].get("positions", "?")}
                for e in _ordered(pos)]
    exact = [(display_name(e), pos[e]["last_position"].get("exact_windows", "?")) for e in _ordered(pos)
             if "exact_ppl" in pos[e].get("last_position", {})]
    return {"name": d.name, "file": name if name in figures else None, "energies": energies, "exact": exact}


def _figures(d: DatasetResults) -> dict[str, Any]:
    """Figures 2 and 3 of one dataset: file names, the ranges' log Z verdicts, Figure 3's gaps."""
    names = figure_names(d.name)
    joint = d.evaluation.get("joint", {})
    gaps = {k: d.generation.get("loglik_density", {}).get(k, {}).get("mean_gap", {}) for k in ("base_lm", "joint")}
    return {"name": d.name, "left": names["fig2_left"], "right": names["fig2_right"], "file": names["fig3"],
            "verdicts": [(display_name(e), _convergence_note(joint[e])) for e in _ordered(joint)],
            "base_gap": _fmt(gaps["base_lm"].get("base")), "joint_gap": _fmt(gaps["joint"].get("joint"))}


def render_markdown(inputs: ReportInputs, figures: dict[str, bytes]) -> str:
    """The report as Markdown (templates/report.md.j2); figures are linked as figures/<name>
    (relative to reports/)."""
    ds = inputs.datasets
    human = inputs.human_eval
    text = render_template(
        "report.md.j2", title=TITLE, datasets=ds,
        headline=_headline(ds), table1=_table1(ds), reference=_reference(ds),
        spread=spread_section(inputs.seed_spread, {d.name: d.evaluation for d in ds}),
        last_position=_last_position(ds), claims=_claims(ds),
        figure1=[_figure1(d, figures) for d in ds], figure2=(later := [_figures(d) for d in ds]), figure3=later,
        sample_stats=_sample_stats(ds), before_after=_before_after(ds),
        human=human, human_table=None if human.markdown is None else human.markdown.rstrip("\n"),
        examples=[_examples(d) for d in ds], stepwise=[_stepwise(d) for d in ds],
        stage_times=_stage_times(inputs.stage_times),
        **_provenance(inputs.provenance),
    )
    return text.rstrip("\n") + "\n"


# --------------------------------------------------------------------------- html
def render_html(markdown: str, figures: dict[str, bytes], title: str = TITLE) -> str:
    """One self-contained page (templates/report.html.j2, inline CSS): the Markdown through
    markdown-it-py (CommonMark + tables, raw HTML off), every figures/<name> image replaced by
    its PNG as a base64 data URI."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    prefix = f"{FIGURES_DIR}/"
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            name = src.removeprefix(prefix)
            if not src.startswith(prefix) or name not in figures:
                raise ValueError(f"report image {src!r} is not one of the figures made")
            child.attrSet("src", "data:image/png;base64," + base64.b64encode(figures[name]).decode("ascii"))
    body = md.renderer.render(tokens, md.options, {})
    # body is markdown-it's HTML; the title is escaped by html.escape (quotes as &quot; / &#x27;).
    return render_template("report.html.j2", title=Markup(html.escape(title)), body=Markup(body))


def build(inputs: ReportInputs) -> Report:
    figures = make_figures(inputs)
    markdown = render_markdown(inputs, figures)
    return Report(markdown=markdown, html=render_html(markdown, figures), figures=figures)
