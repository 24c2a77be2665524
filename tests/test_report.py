"""Stage report on a finished toy run: every table and figure present and non-empty, Table 2 from votes,
unconverged ranges claim nothing, provenance counts code and params only."""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BOOTSTRAP, CONVERGENCE_RULE, NOT_CONVERGED_REASON, joint_checks, run_command
from typer.testing import CliRunner

from pipeline.core.errors import RebmError
from pipeline.core.io import write_json, write_tsv
from pipeline.generation.humaneval import GOLD, export_sheet
from pipeline.reporting import provenance
from pipeline.reporting import report as lib
from stages import evaluate, generate
from stages import report as stage
from stages.cli import app

REV = "0123456789abcdef0123456789abcdef01234567"
DATASETS = ("toy", "toy2")
STEPWISE_EXAMPLES = 2  # tests/test_stepwise.py STEPWISE["examples"]: Table 3 contexts of toy
PNG = b"\x89PNG\r\n\x1a\n"
DATA_URI = '<img src="data:image/png;base64,'


TOY2_N_EVAL = {"unit": 8, "bit": 4}  # toy2: UNIT converged at n = 8, BIT-BASE not converged at n = 4


def write_toy2_evaluation(root: Path) -> None:
    """toy2's evaluate outputs in the current schema, whatever evaluate wrote for toy: toy's
    numbers, UNIT's log Z converged at n = 8 and BIT-BASE's not at n = 4 (its Figure 2 cells
    empty beyond), no exact last position."""
    evaluation = root / "results/toy2/evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    base = metrics["perplexity"]["base"]["ppl"]
    metrics.update(n_eval=TOY2_N_EVAL, convergence_epsilon=0.01, convergence_rule=CONVERGENCE_RULE,
                   bootstrap=BOOTSTRAP)
    metrics["perplexity"]["balm"]["ratio_to_base_ci"] = [0.99, 1.08]
    for e, j in metrics["joint"].items():
        j.update(joint_checks(j["ppl_low"], j["ppl_high"], base, TOY2_N_EVAL[e], converged=e == "unit"))
    for p in metrics["positions"].values():
        p["last_position"] = {k: v for k, v in p["last_position"].items() if not k.startswith("exact_")}
    write_json(evaluation / "metrics.json", metrics)
    rows = lib.read_tsv(evaluation / "ppl_vs_samples.tsv")
    for r in rows:
        for e in TOY2_N_EVAL:
            r[f"{e}_mean_log_z_lower"], r[f"{e}_mean_log_z_upper"] = -0.01, 0.01
            if r["samples"] > TOY2_N_EVAL[e]:  # an empty cell is written "" or nan: one of each
                r[f"{e}_ppl_low"], r[f"{e}_ppl_high"] = float("nan"), ""
                r[f"{e}_mean_log_z_lower"], r[f"{e}_mean_log_z_upper"] = float("nan"), ""
    write_tsv(evaluation / "ppl_vs_samples.tsv", rows)


def write_toy2_generation_baseline(root: Path) -> None:
    """An earlier run's generation metrics for toy2 (toy's, every number shifted) to compare with."""
    generation = root / "results/toy2/generation"
    before = json.loads((generation / "metrics.json").read_text())
    for by_source in before["unique_ngram_pct"]["sequence"].values():
        by_source.update(base=by_source["base"] - 1, joint=by_source["joint"] - 2)
    before["loglik_density"]["joint"]["mean_gap"]["joint"] += 5
    write_json(generation / "baseline_metrics.json",
               {"label": "before the fix", "commit": "da701ce", "metrics": before})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy run after evaluate and generate, plus a second dataset `toy2`: a copy of its
    outputs, its evaluation in the current schema (write_toy2_evaluation) and a generation
    baseline to compare with."""
    from conftest import build_toy_run

    root = build_toy_run(tmp_path_factory.mktemp("report"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"] = {"toy": {"source": "brown", "categories": ["news"]}}
    (root / "params-toy.yaml").write_text(yaml.safe_dump(params))
    evaluate.run("toy", root / "params-toy.yaml", root=root, progress=False)
    generate.run("toy", root / "params-toy.yaml", root=root, progress=False)
    shutil.copytree(root / "results/toy", root / "results/toy2")
    shutil.copytree(root / "data/toy/generations", root / "data/toy2/generations")
    write_toy2_evaluation(root)
    write_toy2_generation_baseline(root)
    from test_stepwise import STEPWISE

    from stages import stepwise

    params["stepwise"] = STEPWISE  # toy gets Table 3; toy2 has none, so its placeholder shows
    (root / "params-toy.yaml").write_text(yaml.safe_dump(params))
    stepwise.run("toy", root / "params-toy.yaml", root=root, progress=False)
    params["datasets"]["toy2"] = {"source": "brown", "categories": ["fiction"]}
    (root / "params-report.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture
def fake_git(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The report asks git for the revision and the dirty flag; answer without running git."""
    calls: list[tuple[str, ...]] = []

    def git(root: Path, *args: str) -> str | None:
        calls.append(args)
        return {"rev-parse": REV, "diff": "params.yaml\0"}[args[0]]

    monkeypatch.setattr(provenance, "_git", git)
    return calls


def run_report(root: Path) -> tuple[dict, str, str]:
    summary = stage.run(root / "params-report.yaml", root=root)
    reports = root / "reports"
    return (summary, (reports / "report.md").read_text(encoding="utf-8"),
            (reports / "report.html").read_text(encoding="utf-8"))


def section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section, up to the next one."""
    start = markdown.index(f"## {heading}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end > 0 else None]


def test_every_table_and_figure_is_present_and_non_empty(project: Path, fake_git) -> None:
    summary, md, page = run_report(project)
    assert summary["datasets"] == list(DATASETS) and summary["table2"] is False and summary["git_revision"] == REV
    assert summary["claims"]["toy2"]["JOINT BIT-BASE below JOINT UNIT"] == "not converged"

    # Table 1: both datasets side by side, LMs exact, joint models as ranges with their log Z verdict;
    # toy's as evaluate wrote them, toy2's in the current schema (UNIT converged, BIT-BASE not).
    table1 = section(md, "Table 1")
    assert ("| model | parameters | toy: test ppl | toy: log Z | toy: vs BASE LM | toy2: test ppl | toy2: log Z "
            "| toy2: vs BASE LM |") in table1
    metrics = json.loads((project / "results/toy/evaluation/metrics.json").read_text())
    for name, key in (("BASE LM", "base"), ("BALM", "balm")):
        ppl = f"{metrics['perplexity'][key]['ppl']:.2f}"
        assert re.search(rf"^\| {name} \| [\d.]+M \| {ppl} \| exact \| [^|]+ \| {ppl} \| exact \|", table1, re.M), name
    for name, key in (("JOINT UNIT", "unit"), ("JOINT BIT-BASE", "bit")):
        joint = metrics["joint"][key]
        cell = f"{joint['ppl_low']:.2f}–{joint['ppl_high']:.2f}"
        gain = f"{joint['vs_base_pct_low']:+.2f}% … {joint['vs_base_pct_high']:+.2f}%"
        toy2 = re.escape(f"converged at n = 8 | {gain}" if key == "unit"
                         else "not converged at n = 4 | — (not converged)")
        row = rf"^\| {name} \| [\d.]+M\+[\d.]+M \| {cell} \| [^|]+ \| [^|]+ \| {cell} \| {toy2} \|$"
        assert re.search(row, table1, re.M), name
    assert ("- **toy2**: 6 test windows, 24 continuation tokens; joint ranges with log Z from n = 8 (JOINT UNIT), "
            "4 (JOINT BIT-BASE) BASE LM samples per prefix (lower end T_n, upper end U_n, Eq. 4). log Z convergence "
            f"rule (ε = 0.01 nats): {CONVERGENCE_RULE}") in table1
    reference = re.findall(r"^\| toy2 \| (BALM|JOINT UNIT|JOINT BIT-BASE) \| ([^|]+) \| ([^|]+) \|$", table1, re.M)
    assert [r[0] for r in reference] == ["BALM", "JOINT UNIT", "JOINT BIT-BASE"]
    assert reference[0][1].endswith("95 % CI [0.990, 1.080]") and reference[0][2] == "— (normalised)"
    assert reference[2][1].endswith("(log Z not converged)") and "% vs BASE LM" in reference[2][2]
    assert "1000 resamples (seed 0), 95 % intervals" in table1
    assert "| toy | JOINT BIT-BASE | 2 |" in table1 and "| toy | JOINT UNIT | 2 |" in table1  # last-position check
    assert re.search(r"^\| toy \| JOINT UNIT \| 2 \|[^\n]* inside \|$", table1, re.M)  # E ≡ 0: exact = estimate
    assert "| toy2 | JOINT" not in section(md, "Table 1").split("### Last position")[1]  # toy2: none computed

    # The claims: every dataset's verdicts; an unconverged range is compared with nothing.
    claims = section(md, "The paper's claims, checked")
    assert md.index("## Table 1") < md.index("## The paper's claims, checked") < md.index("## Figure 1")
    assert ("| JOINT BIT-BASE below JOINT UNIT | toy2 | not converged | — | JOINT BIT-BASE: log Z not converged at "
            f"n = 4 ({NOT_CONVERGED_REASON}) |") in claims
    # E ≡ 0: UNIT = BASE LM on every window, a paired interval of exactly [1, 1]: neither below nor above.
    assert "| JOINT UNIT below BASE LM (whole range) | toy2 | inconclusive | " in claims
    assert "| BALM below BASE LM | toy2 | " in claims and "| BALM below BASE LM | toy | " in claims
    assert claims.count("exact last-position ppl inside its estimated range") == 4  # 2 energies, 2 datasets
    assert "| JOINT UNIT: exact last-position ppl inside its estimated range (Figure 1) | toy | holds |" in claims

    # Figure 1's caption names the star only where the exact last position was computed; Figure 2's
    # caption gives each range's log Z verdict.
    figure1 = section(md, "Figure 1")
    toy_caption, toy2_caption = (line for line in figure1.splitlines() if line.startswith("*toy"))
    assert "The star is the exact gain at the last position" in toy_caption
    assert "star" not in toy2_caption and "exact" not in toy2_caption
    assert "JOINT UNIT: 4 windows, 6 samples per position" in toy2_caption
    assert "JOINT BIT-BASE: 4 windows, 6 samples per position" in toy2_caption
    assert (f"JOINT UNIT: log Z converged at n = 8; JOINT BIT-BASE: log Z not converged at n = 4 "
            f"({NOT_CONVERGED_REASON}).") in section(md, "Figure 2")

    # Figures 1-3: linked from the Markdown, written as PNG, inlined in the HTML.
    figures = {}
    for dataset in DATASETS:
        for name in lib.figure_names(dataset).values():
            assert f"](figures/{name})" in md
            data = (project / "reports/figures" / name).read_bytes()
            assert data.startswith(PNG) and len(data) > 5000
            figures[name] = data
    assert sorted(Path(f).name for f in summary["figures"]) == sorted(figures)
    assert page.count(DATA_URI) == len(figures) == 4 * len(DATASETS)
    inlined = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(b) for b in inlined) == sorted(figures.values())

    # §4.3 statistics, examples (Tables 5–6), Table 2 placeholder, stage times, provenance.
    stats, before_after = section(md, "Sample statistics").split("### Before → after")
    assert stats.count("| toy | ") == 3 and stats.count("| toy2 | ") == 3
    generation = json.loads((project / "results/toy2/generation/metrics.json").read_text())
    unique1 = generation["unique_ngram_pct"]["sequence"]["1"]
    assert (f"| toy2 | unique 1-grams % (per sequence) | {unique1['base'] - 1:.1f} → {unique1['base']:.1f} | "
            f"{unique1['joint'] - 2:.1f} → {unique1['joint']:.1f} |") in before_after
    gap = generation["loglik_density"]["joint"]["mean_gap"]["joint"]
    assert re.search(rf"^\| toy2 \| Figure 3 mean gap to real text \| [^|]+ \| {gap + 5:.2f} → {gap:.2f} \|$",
                     before_after, re.M)
    assert "| toy2 | repeated 4-grams (with prefix) |" in before_after
    assert "- **toy2**: before = before the fix (commit da701ce); after = this run." in before_after
    assert "| toy |" not in before_after  # no baseline file, no comparison
    examples = section(md, "Example generations")
    assert examples.count("**Prefix** (test window") == 3 * len(DATASETS)
    for model in ("BASE LM", "BIT-BASE-WORST", "JOINT BIT-BASE", "GOLD"):
        assert len(re.findall(rf"^\| {model} \| [^|]", examples, re.M)) == 3 * len(DATASETS), model
    table2 = section(md, "Table 2")
    assert "rebm humaneval export" in table2 and "reports/humaneval/votes/" in table2
    times = section(md, "Stage wall times")
    evaluate_seconds = metrics["wall_seconds"]["stage"]
    assert re.search(rf"^\| evaluate@toy \| \d+:\d\d:\d\d \({evaluate_seconds:.1f} s\) \|", times, re.M)
    assert "| generate@toy2 | 0:00:" in times
    assert "| ingest@toy | missing | `data/toy/ingest_stats.json` |" in times
    assert "| train_ebm_bit_star@toy2 | missing |" in times
    assert "**total**" in times and "5 of 28 stages recorded" in times
    table3 = section(md, "Table 3")
    assert table3.count("**Context") == STEPWISE_EXAMPLES and "### Table 3 — P(x_t | x_<t)" in table3
    for row in ("repetition", "control", "repetition − control"):
        assert re.search(rf"^\| {row} \| [+-]\d\.\d{{3}} \[", table3, re.M), row
    claim = json.loads((project / "results/toy/stepwise/metrics.json").read_text())["claim"]
    assert f"within the same LM sample: **{claim['verdict']}**" in table3
    assert "*toy2: no results/toy2/stepwise yet — run `rebm stepwise toy2`.*" in table3
    provenance = section(md, "Provenance")
    assert f"git revision: `{REV}`; working tree dirty: yes (uncommitted changes to code or params: params.yaml)" \
        in provenance
    assert f"dvc {importlib.metadata.version('dvc')}" in provenance
    assert f"torch {importlib.metadata.version('torch')}" in provenance
    assert (project / "params-report.yaml").read_text().strip() in provenance  # the params, in full
    assert ("rev-parse", "HEAD") in fake_git

    # The HTML is the same report, self-contained.
    for heading in ("Table 1", "The paper.s claims", "Figure 1", "Figure 2", "Figure 3", "Sample statistics",
                    "Table 3", "Table 2", "Example generations", "Stage wall times", "Provenance"):
        assert re.search(rf"<h2>{heading}", page), heading
    # Table 1, reference points, last position, claims, stats, before → after; examples; times
    assert page.count("<table>") == 6 + 3 * len(DATASETS) + 1 + STEPWISE_EXAMPLES + 1  # Table 3s, the claim
    for cell in ("<td>JOINT BIT-BASE</td>", "<td>evaluate@toy</td>", "<td>GOLD</td>", "rebm humaneval export", REV):
        assert cell in page
    for external in ("<script", "<link", 'src="http', "@import", "url("):
        assert external not in page


def honest_votes(pairs_csv: Path, rater: str) -> list[tuple[str, str, str]]:
    """Pass every attention check and always prefer the joint model."""
    votes = []
    with open(pairs_csv, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            want = GOLD if r["is_attention_check"] == "1" else "joint"
            votes.append((rater, r["pair_id"], "A" if r["system_a"] == want else "B"))
    return votes


def test_votes_make_table2_appear(project: Path, fake_git) -> None:
    he = project / "reports/humaneval"
    # Synthetic texts (two distinct words each, so every gold continuation can make an attention check).
    rows = [{"window_id": w, "prefix_text": f"prefix {w}", "gold_text": f"gold text {w}", "base_text": f"base text {w}",
             "joint_text": f"joint text {w}"} for w in range(6)]
    try:
        export_sheet({"toy": rows}, he, seed=3, windows_per_dataset=4)
        _, md, page = run_report(project)
        assert "The rating sheet is exported" in section(md, "Table 2")  # no votes yet
        (he / "votes").mkdir()
        for rater in ("alice", "bob"):
            with open(he / "votes" / f"{rater}.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(("rater_id", "pair_id", "choice"))
                writer.writerows(honest_votes(he / "pairs.csv", rater))
        summary, md, page = run_report(project)
    finally:
        shutil.rmtree(he, ignore_errors=True)
    assert summary["table2"] is True
    table2 = section(md, "Table 2")
    assert "Raters: 2 kept of 2" in table2 and "rebm humaneval export" not in table2
    assert "| toy | joint | base | 100.00% |" in table2 and "| toy | joint | gold | 100.00% |" in table2
    assert "reports/humaneval/votes/alice.csv" in table2
    assert "<td>100.00%</td>" in page and "Model 1 preferred" in page


@pytest.mark.parametrize(("moved", "stage_name"), [("results/toy/evaluation", "evaluate@toy"),
                                                    ("results/toy2/generation", "generate@toy2"),
                                                    ("data/toy/generations", "generate@toy")])
def test_missing_inputs_name_the_stage_to_run(project: Path, moved: str, stage_name: str, monkeypatch) -> None:
    aside = project / f"{moved}.aside"
    (project / moved).rename(aside)
    try:
        with pytest.raises(RebmError, match=rf"{re.escape(moved)}/[\w.]+: not found; run stage {stage_name} first"):
            stage.run(project / "params-report.yaml", root=project)
        monkeypatch.chdir(project)
        result = CliRunner().invoke(app, ["report", "--params", "params-report.yaml"])
        assert result.exit_code == 2 and stage_name in result.output
    finally:
        aside.rename(project / moved)


def test_stage_times_read_every_format(tmp_path: Path) -> None:
    def put(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    put("data/x/ingest_stats.json", json.dumps({"dataset": "x"}))  # records no time
    put("data/x/negatives_stats.json", json.dumps({"stage_wall_seconds": 12.5, "wall_seconds": 10.0}))
    put("models/x/lm/base_metrics.json", json.dumps({"wall_seconds": 3.0}))
    put("results/x/evaluation/metrics.json", json.dumps({"wall_seconds": {"lm_logprobs": 1.0, "stage": 7.0}}))
    put("models/x/mlm_metrics.json", "{")
    times = {t.stage: t for t in lib.collect_stage_times(["x"], tmp_path)}
    assert list(times) == [s for s, _ in lib.stage_files("x", tmp_path)]
    assert (times["ingest@x"].status, times["ingest@x"].seconds) == ("not recorded", None)
    assert times["negatives@x"].seconds == 12.5 and times["train_lm_base@x"].seconds == 3.0
    assert times["evaluate@x"].seconds == 7.0 and times["pretrain_mlm@x"].status == "unreadable"
    assert times["generate@x"].status == "missing" and times["generate@x"].path == "results/x/generation/metrics.json"
    text = "\n".join(lib.stage_time_lines(list(times.values())))
    assert "| **total** | **0:00:22 (22.5 s)** | 3 of 14 stages recorded |" in text


def test_provenance_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))  # no git executable to find
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    p = lib.collect_provenance(params, tmp_path)
    assert p.git_revision == "unknown" and p.git_dirty is None
    assert "git revision: `unknown`; working tree dirty: unknown" in "\n".join(lib.provenance_lines(p))


MINIMAL_DVC_YAML = """
stages:
  evaluate:
    foreach: ${datasets}
    do:
      cmd: rebm evaluate ${key}
      deps: [pipeline/estimation/evaluation.py]
      outs:
        - results/${key}/evaluation/table1.md:
            cache: false
      metrics:
        - results/${key}/evaluation/metrics.json:
            cache: false
  report:
    cmd: rebm report
    outs: [reports/figures]
"""


def test_provenance_is_dirty_for_code_and_params_not_for_pipeline_outputs(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    files = {"dvc.yaml": MINIMAL_DVC_YAML, "dvc.lock": "schema: '2.0'\n", "params.yaml": "seed: 1\n",
             "pipeline/estimation/evaluation.py": "X = 1\n", "results/toy/evaluation/metrics.json": "{}\n",
             "results/toy/evaluation/table1.md": "| a |\n", "reports/figures/fig.png": "png"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "a finished run"]):
        run_command(["git", *cmd], tmp_path, env)
    assert lib.collect_provenance(tmp_path / "params.yaml", tmp_path).git_dirty is False

    # What `dvc repro` rewrites: a foreach stage's metrics, a directory out, dvc.lock; one output deleted.
    (tmp_path / "results/toy/evaluation/metrics.json").write_text('{"ppl": 2}\n')
    (tmp_path / "reports/figures/fig.png").write_text("new png")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    run_command(["git", "rm", "-q", "results/toy/evaluation/table1.md"], tmp_path, env)
    p = lib.collect_provenance(tmp_path / "params.yaml", tmp_path)
    assert (p.git_dirty, p.dirty_files, p.output_changes) == (False, [], 4)
    assert "working tree dirty: no (4 changed pipeline output(s)" in "\n".join(lib.provenance_lines(p))

    (tmp_path / "pipeline/estimation/evaluation.py").write_text("X = 2\n")
    p = lib.collect_provenance(tmp_path / "params.yaml", tmp_path)
    assert (p.git_dirty, p.dirty_files, p.output_changes) == (True, ["pipeline/estimation/evaluation.py"], 4)
    assert ("working tree dirty: yes (uncommitted changes to code or params: pipeline/estimation/evaluation.py; "
            "4 changed" in "\n".join(lib.provenance_lines(p)))


def test_generated_text_stays_text_in_both_formats() -> None:
    nasty = "<script>alert(1)</script> | *bold* [a](http://e.com) &amp; #1\nnext\x07 line"
    line = lib.md_escape(nasty)
    assert "\n" not in line and "\x07" not in line
    page = lib.render_html(f"| a |\n|---|\n| {line} |\n", {})
    assert "<script" not in page and "<a href" not in page and "<strong>" not in page and "<em>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; | *bold* [a](http://e.com) &amp;amp; #1 ⏎ next\ufffd line" in page
    with pytest.raises(ValueError, match="not one of the figures"):
        lib.render_html("![x](figures/missing.png)", {})


def test_a_not_applicable_variant_is_marked_in_table1_and_the_claims(project: Path, fake_git) -> None:
    record = project / "models/toy2/energy/bit_large_metrics.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"dataset": "toy2", "variant": "bit_large", "applicable": False,
                                  "reason": "train_ebm.bit_large is null in params.yaml", "wall_seconds": 0.1}))
    try:
        summary, md, _ = run_report(project)
    finally:
        record.unlink()
    table1 = section(md, "Table 1")
    assert "| JOINT BIT-LARGE* | — | — | — | — | not applicable | — | — |" in table1
    assert "- Not applicable: JOINT BIT-LARGE\\*: train\\_ebm.bit\\_large is null in params.yaml." in table1
    assert summary["claims"]["toy2"]["JOINT BIT-LARGE* lowest of all models"] == "not applicable"
    assert "JOINT BIT-LARGE* lowest of all models" not in summary["claims"]["toy"]


def test_a_baseline_generated_differently_is_not_compared(project: Path, fake_git) -> None:
    # baseline_metrics.json from another energy or sample budget (the Brown default's, on a branch
    # running params/smollm2.yaml) is no "before": the report says why instead of comparing.
    path = project / "results/toy2/generation/baseline_metrics.json"
    original = path.read_text()
    baseline = json.loads(original)
    baseline["metrics"]["energy"], baseline["metrics"]["windows"] = "bit_large", 999
    path.write_text(json.dumps(baseline))
    try:
        _, md, _ = run_report(project)
    finally:
        path.write_text(original)
    before_after = section(md, "Sample statistics").split("### Before → after")[1]
    assert "| toy2 |" not in before_after and "before the fix" in before_after
    assert "not compared: generated differently (energy bit\\_large vs bit; windows 999 vs 6)" in before_after


def test_the_report_reads_only_its_declared_inputs(project: Path, fake_git, tmp_path: Path) -> None:
    # report_input_files is what dvc.yaml's report stage lists (tests/test_dvc_deps.py): a copy of
    # the run holding only those files must give the same report, or a file it reads is no dep
    from pipeline.reporting.inputs import report_input_files

    full, copy = tmp_path / "full", tmp_path / "copy"
    shutil.copytree(project, full)
    for ds in DATASETS:  # the toy run records no stage times: give every stage one
        for i, (_, path) in enumerate(lib.stage_files(ds, full)):
            if not path.exists():
                write_json(path, {"wall_seconds": 10.0 + i})
    kept = [p for ds in DATASETS for p in report_input_files(ds, full) if p.exists()]
    for path in [*kept, full / "params-report.yaml"]:
        target = copy / path.relative_to(full)
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
    assert any(p.name == "generations" for p in kept) and any(p.name == "table3.md" for p in kept)
    _, markdown, _ = run_report(full)
    _, from_copy, _ = run_report(copy)
    # all but the render time and the provenance (which names the run's folder) must agree
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")
    results = [stamp.sub("T", text[: text.index("## Provenance")]) for text in (markdown, from_copy)]
    assert results[1] == results[0]
    times = section(results[0], "Stage wall times")
    assert "## Table 3" in results[0] and "| ingest@toy2 | 0:00:10 (10.0 s) |" in times and "| missing |" not in times


def test_the_stage_summary_states_the_claims_the_report_states(project: Path, fake_git, tmp_path: Path) -> None:
    # an energy at chance carries no claim in report.md ("did not learn"); the stage's returned
    # summary must say the same, not judge that energy's numbers again
    copy = tmp_path / "run"
    shutil.copytree(project, copy)
    write_json(copy / "models/toy/energy/unit_metrics.json", {"valid_pair_accuracy": 0.5, "valid_windows": 40})
    summary, markdown, _ = run_report(copy)
    verdicts = summary["claims"]["toy"]
    assert "did not learn" in verdicts.values()
    claims_section = section(markdown, "The paper's claims, checked")
    for claim, verdict in verdicts.items():
        assert f"| {lib.md_escape(claim)} | toy | {verdict} |" in claims_section, claim
