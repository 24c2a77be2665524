"""Human evaluation: the A/B sheet export, attention checks, and Table 2 scoring (paper A.4)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.core.errors import RebmError
from pipeline.generation.humaneval import (
    ATTENTION_COMPARISON,
    DECOY,
    GOLD,
    ITEMS_PER_PAGE,
    PAIRS_COLUMNS,
    binomial_p_value,
    export_sheet,
    score_votes,
)
from pipeline.generation.resample import generations_table, select_generations, write_generations
from stages.cli import app

WORDS = [f"word{i}" for i in range(200)]
MARKER = {"gold": "alpha", "base": "beta", "joint": "gamma", "worst": "delta"}  # no system name in any text


def exact_tail(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


# --------------------------------------------------------------------------- p-values
def test_binomial_p_values_against_known_values() -> None:
    assert binomial_p_value(9, 10) == 11 / 1024  # C(10,9) + C(10,10) = 11
    assert binomial_p_value(10, 10) == 1 / 1024
    assert binomial_p_value(5, 10) == 638 / 1024  # 1 − P(X <= 4) = 1 − 386/1024
    assert binomial_p_value(0, 7) == 1.0
    assert binomial_p_value(0, 0) == 1.0
    assert binomial_p_value(60, 100) == pytest.approx(exact_tail(60, 100), rel=1e-15)
    assert binomial_p_value(60, 100) == pytest.approx(0.028443966820490392, rel=1e-12)
    # Table 2's magnitude: 176 of 333 sentences (52.85%) -> p ≈ 0.16, as the paper reports.
    assert binomial_p_value(176, 333) == pytest.approx(exact_tail(176, 333), rel=1e-12)
    assert round(binomial_p_value(176, 333), 2) == 0.16
    with pytest.raises(ValueError):
        binomial_p_value(11, 10)


def test_binomial_p_values_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((9, 10), (60, 100), (187, 333), (3, 40)):
        expected = stats.binomtest(k, n, 0.5, alternative="greater").pvalue
        assert binomial_p_value(k, n) == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- export
def rows_for(dataset: str, window_ids) -> list[dict]:
    """Generations rows whose texts encode (dataset, system, window) in distinct words."""
    rows = []
    for w in window_ids:
        rows.append(
            {
                "window_id": w,
                "prefix_text": f"{dataset} prefix number {w} about something",
                **{
                    f"{s}_text": " ".join([f"{MARKER[s]}{w}", *WORDS[(w * 7) % 150 : (w * 7) % 150 + 8]])
                    for s in ("gold", "base", "joint", "worst")
                },
            }
        )
    return rows


def read_pairs_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def sheet(tmp_path: Path) -> dict:
    gens = {"news": rows_for("news", range(12)), "fiction": rows_for("fiction", range(100, 112))}
    summary = export_sheet(gens, tmp_path / "he", seed=3, windows_per_dataset=9)
    return {"dir": tmp_path / "he", "summary": summary, "gens": gens,
            "rows": read_pairs_csv(tmp_path / "he" / "pairs.csv")}


def test_export_layout_and_attention_checks(sheet: dict) -> None:
    rows = sheet["rows"]
    assert list(rows[0]) == list(PAIRS_COLUMNS)
    # 2 datasets × 9 windows × 2 pairs = 36 comparisons, 3 per page + 1 check = 12 pages of 4.
    assert sheet["summary"]["items"] == 48 and sheet["summary"]["attention_checks"] == 12
    assert sheet["summary"]["attention_check_windows"] == {"news": "held out", "fiction": "held out"}
    assert sheet["summary"]["comparisons"] == {
        "news: joint vs base": 9, "news: joint vs gold": 9, "fiction: joint vs base": 9, "fiction: joint vs gold": 9
    }
    for page in range(12):
        block = rows[page * ITEMS_PER_PAGE : (page + 1) * ITEMS_PER_PAGE]
        assert sum(r["is_attention_check"] == "1" for r in block) == 1
    assert len({r["pair_id"] for r in rows}) == 48

    texts = {(d, r["window_id"]): r for d, rs in sheet["gens"].items() for r in rs}
    compared = {(r["dataset"], int(r["window_id"])) for r in rows if r["is_attention_check"] == "0"}
    sides = {"a": 0, "b": 0}
    for r in rows:
        source = texts[r["dataset"], int(r["window_id"])]
        assert r["prefix"] == source["prefix_text"]
        if r["is_attention_check"] == "1":
            assert r["comparison"] == ATTENTION_COMPARISON and {r["system_a"], r["system_b"]} == {GOLD, DECOY}
            gold_side, decoy_side = ("a", "b") if r["system_a"] == GOLD else ("b", "a")
            assert r[f"text_{gold_side}"] == source["gold_text"]
            decoy = r[f"text_{decoy_side}"]
            assert decoy != source["gold_text"] and sorted(decoy.split()) == sorted(source["gold_text"].split())
            # checks use held-out windows: a rater never sees the gold text of a compared prefix
            assert (r["dataset"], int(r["window_id"])) not in compared
        else:
            m1, m2 = r["comparison"].split(" vs ")
            assert {r["system_a"], r["system_b"]} == {m1, m2}
            sides["a" if r["system_a"] == m1 else "b"] += 1
            assert r["text_a"] == source[f"{r['system_a']}_text"] and r["text_b"] == source[f"{r['system_b']}_text"]
    assert sides["a"] > 5 and sides["b"] > 5  # sides are randomised


def test_sheet_is_self_contained_and_blind(sheet: dict) -> None:
    page = (sheet["dir"] / "sheet.html").read_text(encoding="utf-8")
    for external in ("http://", "https://", "src=", "<link", "@import"):
        assert external not in page
    for r in sheet["rows"]:
        assert f'name="{r["pair_id"]}" value="A"' in page and f'name="{r["pair_id"]}" value="B"' in page
    for system in (*MARKER, DECOY):  # no system name leaks to raters
        assert system not in page
    assert "rater_id,pair_id,choice" in page  # the inline download script writes the votes header


def test_export_is_deterministic(sheet: dict, tmp_path: Path) -> None:
    again = tmp_path / "again"
    export_sheet(sheet["gens"], again, seed=3, windows_per_dataset=9)
    for name in ("pairs.csv", "sheet.html"):
        assert (again / name).read_bytes() == (sheet["dir"] / name).read_bytes()
    other = tmp_path / "other"
    export_sheet(sheet["gens"], other, seed=4, windows_per_dataset=9)
    assert (other / "pairs.csv").read_bytes() != (sheet["dir"] / "pairs.csv").read_bytes()


def test_export_errors(tmp_path: Path) -> None:
    rows = rows_for("news", range(4))
    for r in rows:
        del r["joint_text"]
    with pytest.raises(RebmError, match="dataset 'news': missing column 'joint_text'"):
        export_sheet({"news": rows}, tmp_path)
    with pytest.raises(RebmError, match="model pair"):
        export_sheet({"news": rows_for("news", range(4))}, tmp_path, pairs=[("joint", "joint")])
    one_word = [dict(r, gold_text="same same same") for r in rows_for("news", range(4))]
    with pytest.raises(RebmError, match="attention check"):
        export_sheet({"news": one_word}, tmp_path)


# --------------------------------------------------------------------------- scoring
def write_votes(path: Path, votes: list[tuple[str, str, str]], header=("rater_id", "pair_id", "choice")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(votes)
    return path


def prefers_joint(window_id: int) -> bool:
    """What the synthetic raters encode for joint vs base: joint wins unless window_id % 3 == 0."""
    return window_id % 3 != 0


def honest_choice(r: dict) -> str:
    """Pass every check; joint vs base per prefers_joint; joint vs gold: always gold."""
    if r["is_attention_check"] == "1":
        want = GOLD
    elif r["comparison"] == "joint vs base":
        want = "joint" if prefers_joint(int(r["window_id"])) else "base"
    else:
        want = "gold"
    return "A" if r["system_a"] == want else "B"


def test_export_score_round_trip(sheet: dict, tmp_path: Path) -> None:
    rows = sheet["rows"]
    flip = {"A": "B", "B": "A"}
    votes = []
    for r in rows:
        honest = honest_choice(r)
        votes.append(("alice", r["pair_id"], honest))
        votes.append(("bob", r["pair_id"], honest.lower()))  # choice is case-insensitive
        # mallory answers everything the other way round, failing every check: if she were
        # kept, every comparison would be a 2–1 win instead of 2–0, and checks would not matter.
        votes.append(("mallory", r["pair_id"], flip[honest]))
        if r["is_attention_check"] == "0":
            votes.append(("lazy", r["pair_id"], flip[honest]))  # skips every check: unverified
    # one more rater fails a single check but is otherwise honest: still dropped
    first_check = next(i for i, r in enumerate(rows) if r["is_attention_check"] == "1")
    for i, r in enumerate(rows):
        c = honest_choice(r)
        votes.append(("careless", r["pair_id"], flip[c] if i == first_check else c))
    votes_a = write_votes(tmp_path / "votes-a.csv", votes[: len(votes) // 2])
    votes_b = write_votes(tmp_path / "votes-b.csv", votes[len(votes) // 2 :])
    score = score_votes(sheet["dir"] / "pairs.csv", [votes_a, votes_b])

    assert score.raters == ["alice", "bob", "mallory", "lazy", "careless"]
    assert score.failed_check == ["mallory", "careless"]
    assert score.no_check == ["lazy"]
    assert score.kept == ["alice", "bob"]
    assert score.votes_used == 2 * 36

    table = {(r["dataset"], r["model_1"], r["model_2"]): r for r in score.table.to_pylist()}
    assert set(table) == {(d, "joint", m) for d in ("news", "fiction") for m in ("base", "gold")}
    for dataset in ("news", "fiction"):
        compared = sorted({int(r["window_id"]) for r in rows
                           if r["dataset"] == dataset and r["comparison"] == "joint vs base"})
        wins = sum(prefers_joint(w) for w in compared)
        vs_base = table[dataset, "joint", "base"]
        assert vs_base["items"] == 9 and vs_base["items_tied"] == 0
        assert vs_base["items_preferred"] == wins
        assert vs_base["rate"] == pytest.approx(wins / 9)
        assert vs_base["p_value"] == pytest.approx(exact_tail(wins, 9))
        assert vs_base["votes"] == 18 and vs_base["votes_preferred"] == 2 * wins
        assert vs_base["vote_p_value"] == pytest.approx(exact_tail(2 * wins, 18))
        vs_gold = table[dataset, "joint", "gold"]
        assert vs_gold["rate"] == 0.0 and vs_gold["p_value"] == 1.0
    text = score.markdown()
    assert "| news | joint | base |" in text and "2 kept of 5" in text


def test_ties_count_against_model_1(sheet: dict, tmp_path: Path) -> None:
    rows = sheet["rows"]
    votes = []
    for r in rows:
        c = honest_choice(r)
        votes.append(("alice", r["pair_id"], c))
        if r["is_attention_check"] == "1":
            votes.append(("bob", r["pair_id"], c))
        elif r["comparison"] == "joint vs base":
            votes.append(("bob", r["pair_id"], "A" if r["system_a"] == "base" else "B"))  # always base
    score = score_votes(sheet["dir"] / "pairs.csv", write_votes(tmp_path / "v.csv", votes))
    row = next(r for r in score.table.to_pylist() if r["dataset"] == "news" and r["model_2"] == "base")
    compared = {int(r["window_id"]) for r in rows if r["dataset"] == "news" and r["comparison"] == "joint vs base"}
    ties = sum(prefers_joint(w) for w in compared)  # alice joint, bob base -> 1–1
    assert row["items_tied"] == ties and row["items_preferred"] == 0 and row["rate"] == 0.0


def test_bad_votes_files(sheet: dict, tmp_path: Path) -> None:
    pairs = sheet["dir"] / "pairs.csv"
    pid = sheet["rows"][0]["pair_id"]
    missing = write_votes(tmp_path / "missing.csv", [("alice", pid)], header=("rater_id", "pair_id"))
    with pytest.raises(RebmError, match=r"missing\.csv: missing column 'choice'"):
        score_votes(pairs, missing)
    with pytest.raises(RebmError, match=r"line 2: column 'choice' must be A or B, got 'C'"):
        score_votes(pairs, write_votes(tmp_path / "c.csv", [("alice", pid, "C")]))
    with pytest.raises(RebmError, match=r"column 'pair_id' has 'q99999'"):
        score_votes(pairs, write_votes(tmp_path / "p.csv", [("alice", "q99999", "A")]))
    with pytest.raises(RebmError, match="already voted"):
        score_votes(pairs, write_votes(tmp_path / "d.csv", [("alice", pid, "A"), ("alice", pid, "B")]))
    with pytest.raises(RebmError, match="not found"):
        score_votes(pairs, tmp_path / "nope.csv")
    with pytest.raises(RebmError, match="missing column 'dataset'"):
        score_votes(missing, missing)


# --------------------------------------------------------------------------- CLI
def generations_parquet(path: Path, window_ids: np.ndarray, seed: int = 0, words: list[str] = WORDS) -> Path:
    """A generations file like the generate stage writes, its texts drawn from `words`."""
    W, n, L = len(window_ids), 3, 8
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(words), size=(W, n, L))
    gold = np.stack([rng.permutation(len(words))[:L] for _ in range(W)])
    energy = rng.normal(size=(W, n))
    sel = select_generations(energy, window_ids, seed=0)
    table = generations_table(
        window_ids, samples[:, 0, :4], gold, np.zeros(W), np.zeros(W), samples, energy, -np.ones((W, n)), sel,
        lambda ids: " ".join(words[i] for i in ids),
    )
    write_generations(path, table)
    return path


def test_cli_export_and_score(in_tmp: Path) -> None:
    runner = CliRunner()
    generations_parquet(in_tmp / "data/news/generations/generations.parquet", np.arange(6))
    custom = generations_parquet(in_tmp / "elsewhere.parquet", np.arange(50, 56))
    (in_tmp / "params.yaml").write_text("seed: 9\n", encoding="utf-8")
    result = runner.invoke(app, ["humaneval", "export", "news", f"fiction={custom}", "--windows", "4"])
    assert result.exit_code == 0, result.output
    assert '"seed": 9' in result.output
    rows = read_pairs_csv(in_tmp / "reports/humaneval/pairs.csv")
    assert {r["dataset"] for r in rows} == {"news", "fiction"}
    votes = write_votes(in_tmp / "votes.csv", [("alice", r["pair_id"], honest_choice(r)) for r in rows])
    result = runner.invoke(app, ["humaneval", "score", str(votes), "--json", "table2.json"])
    assert result.exit_code == 0, result.output
    assert "| news | joint | gold | 0.00% |" in result.output
    assert (in_tmp / "table2.json").exists()

    bad = write_votes(in_tmp / "bad.csv", [("alice", "q00001")], header=("rater_id", "pair_id"))
    result = runner.invoke(app, ["humaneval", "score", str(bad)])
    assert result.exit_code == 2 and "missing column 'choice'" in result.output
    result = runner.invoke(app, ["humaneval", "export", "news", "--pair", "joint:balm"])
    assert result.exit_code == 2 and "balm" in result.output
    result = runner.invoke(app, ["humaneval", "export", "missing"])
    assert result.exit_code == 2 and "generations.parquet: not found" in result.output
