"""Stage report on a finished toy run: every table and figure present and non-empty, Table 2 from votes."""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import report as lib
from pipeline.errors import RebmError
from pipeline.humaneval import GOLD, export_sheet
from stages import evaluate, generate
from stages import report as stage
from stages.cli import app

REV = "0123456789abcdef0123456789abcdef01234567"
DATASETS = ("toy", "toy2")
PNG = b"\x89PNG\r\n\x1a\n"
DATA_URI = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy run after evaluate and generate, plus a second dataset `toy2` (a copy of its outputs)."""
    from conftest import build_toy_run

    root = build_toy_run(tmp_path_factory.mktemp("report"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"] = {"toy": {"source": "brown", "categories": ["news"]}}
    (root / "params-toy.yaml").write_text(yaml.safe_dump(params))
    evaluate.run("toy", root / "params-toy.yaml", root=root, progress=False)
    generate.run("toy", root / "params-toy.yaml", root=root, progress=False)
    shutil.copytree(root / "results/toy", root / "results/toy2")
    shutil.copytree(root / "data/toy/generations", root / "data/toy2/generations")
    params["datasets"]["toy2"] = {"source": "brown", "categories": ["fiction"]}
    (root / "params-report.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture
def fake_git(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The report asks git for the revision and the dirty flag; answer without running git."""
    calls: list[tuple[str, ...]] = []

    def git(root: Path, *args: str) -> str | None:
        calls.append(args)
        return {"rev-parse": REV, "status": " M params.yaml"}[args[0]]

    monkeypatch.setattr(lib, "_git", git)
    return calls


def run_report(root: Path) -> tuple[dict, str, str]:
    summary = stage.run(root / "params-report.yaml", root=root)
    reports = root / "reports"
    return summary, (reports / "report.md").read_text(encoding="utf-8"), (reports / "report.html").read_text(encoding="utf-8")


def section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section, up to the next one."""
    start = markdown.index(f"## {heading}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end > 0 else None]


def test_every_table_and_figure_is_present_and_non_empty(project: Path, fake_git) -> None:
    summary, md, page = run_report(project)
    assert summary["datasets"] == list(DATASETS) and summary["table2"] is False and summary["git_revision"] == REV

    # Table 1: both datasets side by side, LMs exact, joint models as ranges.
    table1 = section(md, "Table 1")
    assert "| model | parameters | toy: test ppl | toy: vs BASE LM | toy2: test ppl | toy2: vs BASE LM |" in table1
    metrics = json.loads((project / "results/toy/evaluation/metrics.json").read_text())
    for name, key in (("BASE LM", "base"), ("BALM", "balm")):
        ppl = f"{metrics['perplexity'][key]['ppl']:.2f}"
        assert re.search(rf"^\| {name} \| [\d.]+M \| {ppl} \| [^|]+ \| {ppl} \|", table1, re.M), name
    for name, key in (("JOINT UNIT", "unit"), ("JOINT BIT-BASE", "bit")):
        joint = metrics["joint"][key]
        cell = f"{joint['ppl_low']:.2f}–{joint['ppl_high']:.2f}"
        row = rf"^\| {name} \| [\d.]+M\+[\d.]+M \| {cell} \| [^|]+ … [^|]+ \| {cell} \|"
        assert re.search(row, table1, re.M), name
    assert "| toy | JOINT BIT-BASE | 2 |" in table1 and "| toy | JOINT UNIT | 2 |" in table1  # last-position check
    assert re.search(r"^\| toy \| JOINT UNIT \| 2 \|[^\n]* inside \|$", table1, re.M)  # E ≡ 0: exact = estimate

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
    stats = section(md, "Sample statistics")
    assert stats.count("| toy | ") == 3 and stats.count("| toy2 | ") == 3
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
    assert "**total**" in times and "4 of 24 stages recorded" in times
    provenance = section(md, "Provenance")
    assert f"git revision: `{REV}`; working tree dirty: yes" in provenance
    assert f"dvc {importlib.metadata.version('dvc')}" in provenance
    assert f"torch {importlib.metadata.version('torch')}" in provenance
    assert (project / "params-report.yaml").read_text().strip() in provenance  # the params, in full
    assert ("rev-parse", "HEAD") in fake_git

    # The HTML is the same report, self-contained.
    for heading in ("Table 1", "Figure 1", "Figure 2", "Figure 3", "Sample statistics", "Table 2",
                    "Example generations", "Stage wall times", "Provenance"):
        assert re.search(rf"<h2>{heading}", page), heading
    assert page.count("<table>") == 3 + 3 * len(DATASETS) + 1  # Table 1, last position, stats; examples; times
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
    assert "| **total** | **0:00:22 (22.5 s)** | 3 of 12 stages recorded |" in text


def test_provenance_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))  # no git executable to find
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    p = lib.collect_provenance(params, tmp_path)
    assert p.git_revision == "unknown" and p.git_dirty is None
    assert "git revision: `unknown`; working tree dirty: unknown" in "\n".join(lib.provenance_lines(p))


def test_generated_text_stays_text_in_both_formats() -> None:
    nasty = "<script>alert(1)</script> | *bold* [a](http://e.com) &amp; #1\nnext\x07 line"
    line = lib.md_escape(nasty)
    assert "\n" not in line and "\x07" not in line
    page = lib.render_html(f"| a |\n|---|\n| {line} |\n", {})
    assert "<script" not in page and "<a href" not in page and "<strong>" not in page and "<em>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; | *bold* [a](http://e.com) &amp;amp; #1 ⏎ next\ufffd line" in page
    with pytest.raises(ValueError, match="not one of the figures"):
        lib.render_html("![x](figures/missing.png)", {})
