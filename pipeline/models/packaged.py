"""Local packaged model files built into the model cache: a `.gguf` file, or one file cut into
raw `.part<NN>` chunks (see `pipeline.models.sources` for the cache and the `pypi:` sources).

Local spec syntax (a path, relative to the working directory: the repository root under DVC)::

    <path>.gguf[#sha256=<sha256 of the file>]
    <path>.part<digits>[#sha256=<sha256 of the whole joined file>]

* `<path>.gguf`: a GGUF file on disk, converted as above. Any causal LM architecture the GGUF
  loader of the installed transformers reads will do; another one fails naming the file and
  its architecture.
* `<path>.part<digits>` names the FIRST of a file's raw chunks (what `split -d -b 1G model.zip
  model.zip.part` writes): `<path>.part00`, `<path>.part01`, ... (the digits given set the first
  number and the width) are joined in order, up to the highest number present. A gap in the
  numbering, or a chunk numbered before the one named, is an error naming the chunk. A lost
  LAST chunk leaves no gap, so only the pin (or the payload failing to read) catches it: pin.
  What the joined file holds is told by its content: a GGUF file (converted), or a zip or tar
  (any compression) of an HF folder, the shallowest folder in it holding `config.json` (or,
  with none, its one `.gguf` file, converted). Anything else is an error showing its first bytes.
* `#sha256=` is checked at build time against the file (chunks joined); a mismatch names the
  expected and the actual hash.
* The cache key: with `#sha256=`, that hash (it names the content: a moved copy reuses the
  build, and a cached resolve never reads a many-GB file again); without it, each file's
  absolute path, size and mtime, which cost one stat, where hashing at every stage start would
  cost seconds per GB. A rewritten file gets a new mtime and so a rebuild; only a same-size
  copy keeping an older mtime (`cp -p`, `rsync -t`) could meet a stale build: pin to rule it out.
* A path that names neither a `.gguf` nor a `.part<digits>` file (an HF id, a folder) is not
  a local packaged source; a `.gguf` or `.part` path that does not exist is an error, not an
  HF id.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

from pipeline.core.errors import RebmError
from pipeline.core.io import file_digest
from pipeline.models.gguf import convert_gguf_to_hf
from pipeline.models.model_cache import BUILD_VERSION, PREFIX, SHA256_HEX, cache_entry_name, cached_build, safe_relative

# `<stem>.part<digits>`: one raw chunk of a file split with e.g. `split -d -b 1G model.zip model.zip.part`.
_CHUNK = re.compile(r"^(?P<stem>.+)\.part(?P<number>\d+)$")
# What the cache folder's readable name drops from a file name.
_PACKAGING_SUFFIX = re.compile(r"(\.(gguf|zip|tar|tgz|gz|bz2|xz))+$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """A parsed local spec: a `.gguf` file, or the chunks that joined in order make one file."""

    spec: str  # as written, for messages
    files: tuple[Path, ...]  # absolute; one .gguf, or the chunks in order
    sha256: str | None  # pinned hash of the whole (joined) file
    stamps: tuple[tuple[int, int], ...]  # (size, mtime_ns) of each file when parsed

    @property
    def chunked(self) -> bool:
        return _CHUNK.match(self.files[0].name) is not None

    @property
    def stem(self) -> str:
        """The file's name without `.partNN` and packaging suffixes: `tiny` for `tiny.tar.gz.part00`."""
        return _PACKAGING_SUFFIX.sub("", _CHUNK.sub(r"\g<stem>", self.files[0].name)) or "model"

    def cache_name(self) -> str:
        # Keyed on the pinned hash, else on path, size and mtime: a stat, not a read of many GB
        # at every stage start (the module docstring, "The cache key", says more).
        if self.sha256:
            return cache_entry_name(self.stem, f"local#sha256={self.sha256}")
        stamps = "|".join(f"{path}:{size}:{mtime}" for path, (size, mtime) in zip(self.files, self.stamps, strict=True))
        return cache_entry_name(self.stem, f"local:{stamps}")


def is_local_source(spec: str) -> bool:
    """A path (before any `#sha256=`) naming a `.gguf` file or a `.part<digits>` chunk, not a folder."""
    if spec.startswith((PREFIX, "package:")):  # pipeline.models.sources resolves those
        return False
    path = spec.strip().partition("#")[0]
    name = os.path.basename(path)
    return (name.lower().endswith(".gguf") or _CHUNK.match(name) is not None) and not Path(path).expanduser().is_dir()


def parse_local_source(spec: str) -> LocalSource:
    """The parsed form of a local `.gguf` or `.part<N>` spec (see the module docstring); RebmError if unusable."""
    if not is_local_source(spec):
        raise RebmError(f"{spec}: not a local .gguf or .part<N> model source")
    raw, _, fragment = spec.strip().partition("#")
    pinned = None
    if fragment:
        key, _, value = fragment.partition("=")
        pinned = value.strip().lower()
        if key != "sha256" or not SHA256_HEX.match(pinned):
            raise RebmError(f"{spec}: the fragment must be #sha256=<64 hex digits> (of the whole file, chunks joined)")
    path = Path(raw).expanduser().absolute()
    match = _CHUNK.match(path.name)
    if match:
        files = _chunk_files(spec, path, match)
    elif path.is_file():
        files = [path]
    else:
        raise RebmError(f"{spec}: no such GGUF file ({path})")
    stamps = tuple((st.st_size, st.st_mtime_ns) for st in (f.stat() for f in files))
    return LocalSource(spec=spec, files=tuple(files), sha256=pinned, stamps=stamps)


def _chunk_files(spec: str, first: Path, match: re.Match[str]) -> list[Path]:
    """The chunks from `first` on, numbered without a gap; RebmError naming what is missing."""
    stem, digits = match["stem"], match["number"]
    start, width = int(digits), len(digits)
    present: dict[int, Path] = {}
    for path in first.parent.glob(f"{glob.escape(stem)}.part*"):
        found = _CHUNK.match(path.name)
        # Only numbers written with the first chunk's width belong to the run (part1 is not part01).
        if found and found["stem"] == stem and len(found["number"]) == width and path.is_file():
            present[int(found["number"])] = path
    if start not in present:
        seen = ", ".join(p.name for _, p in sorted(present.items())) or "none"
        raise RebmError(f"{spec}: the first chunk {first} does not exist (chunks of {stem} there: {seen})")
    before = [n for n in present if n < start]
    if before:  # the run would silently lose its head: name the real first chunk instead
        raise RebmError(f"{spec}: {present[min(before)].name} comes before {first.name}; name the first chunk")
    last = max(present)
    missing = [f"{stem}.part{n:0{width}d}" for n in range(start, last + 1) if n not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise RebmError(f"{spec}: chunk {missing[0]} is missing: the chunks in "
                        f"{first.parent} run from {first.name} to {present[last].name} with a gap (missing: {shown})")
    return [present[n] for n in range(start, last + 1)]


def resolve_local(spec: str) -> Path:
    """The cached HF folder for a local `.gguf` or `.part<N>` spec, building it on first use."""
    source = parse_local_source(spec)
    return cached_build(source.cache_name(), lambda scratch, out: _build_local(source, scratch, out))


def _build_local(source: LocalSource, scratch: Path, out: Path) -> None:
    if source.chunked:
        payload, what = scratch / "joined", f"the file joined from {len(source.files)} chunks"
        digest = _join_files(source.files, payload)
    else:
        payload, what = source.files[0], source.files[0].name
        digest = file_digest(payload)
    if source.sha256 and digest != source.sha256:
        raise RebmError(f"{source.spec}: sha256 mismatch for {what}: expected {source.sha256}, got {digest}")
    kind = _payload_kind(payload)
    if kind == "gguf":
        gguf = payload
        if source.chunked:  # the GGUF loader reads a file in a folder; give it a telling name
            gguf = scratch / "gguf" / f"{source.stem}.gguf"
            gguf.parent.mkdir()
            os.replace(payload, gguf)
        _convert(source.spec, gguf, out)
    elif kind is None or not source.chunked:  # a .gguf path must hold a GGUF, whatever else it holds
        with open(payload, "rb") as handle:
            head = handle.read(8)
        expected = "a zip, a tar or a GGUF file" if source.chunked else "a GGUF file"
        raise RebmError(f"{source.spec}: {what} is not understood: {payload.stat().st_size} bytes starting "
                        f"{head.hex()} ({head!r}), not {expected}")
    else:
        _unpack_hf_folder(source.spec, kind, payload, scratch / "unpacked", out)
    if not (out / "config.json").exists():
        raise RebmError(f"{source.spec}: {what} holds no HF model (config.json missing)")
    provenance = {
        "spec": source.spec,
        "files": [str(f) for f in source.files],
        "sha256": digest,
        "cache_key": "sha256" if source.sha256 else "path+size+mtime",
        "payload": kind,
        "build_version": BUILD_VERSION,
    }
    (out / "rebm_source.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def _join_files(files: tuple[Path, ...], dest: Path) -> str:
    """Concatenate `files` into `dest`; the sha256 of the result, computed in the same pass."""
    digest = hashlib.sha256()
    with open(dest, "wb") as joined:
        for path in files:
            with open(path, "rb") as part:
                for block in iter(lambda: part.read(1 << 20), b""):
                    digest.update(block)
                    joined.write(block)
    return digest.hexdigest()


def _payload_kind(path: Path) -> str | None:
    """What a file is by its content: "gguf" (its magic), "zip", "tar" (any compression), else None."""
    with open(path, "rb") as handle:
        if handle.read(4) == b"GGUF":
            return "gguf"
    if zipfile.is_zipfile(path):
        return "zip"
    return "tar" if tarfile.is_tarfile(path) else None


def _unpack_hf_folder(spec: str, kind: str, archive: Path, unpacked: Path, out: Path) -> None:
    """Unpack `archive` and move its HF folder into `out`: the shallowest folder holding config.json,
    which must be the only one that deep, else its one `.gguf` file, converted."""
    where = f"{spec}: the {kind} joined from its chunks"
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    safe_relative(info.filename, where)
                zf.extractall(unpacked)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(unpacked, filter="data")  # refuses absolute paths, '..' and links out of it
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise RebmError(f"{where} cannot be unpacked ({type(exc).__name__}: {exc})") from None
    archive.unlink()  # the disk it held is needed for the model now
    # Shallowest first: a sentence-transformers folder also holds e.g. 1_Pooling/config.json.
    configs = sorted(unpacked.rglob("config.json"), key=lambda p: len(p.relative_to(unpacked).parts))
    if configs:
        depth = len(configs[0].relative_to(unpacked).parts)
        top = sorted(str(c.parent.relative_to(unpacked)) for c in configs
                     if len(c.relative_to(unpacked).parts) == depth)
        if len(top) > 1:
            raise RebmError(f"{where} holds several HF folders ({', '.join(top)}); it must hold one")
        for entry in configs[0].parent.iterdir():
            os.replace(entry, out / entry.name)
        return
    ggufs = sorted(unpacked.rglob("*.gguf"))
    if len(ggufs) != 1:
        names = sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file())
        listing = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise RebmError(f"{where} is not understood: it holds no folder with config.json and "
                        f"{len(ggufs)} .gguf files, not one (it holds: {listing or 'nothing'})")
    _convert(spec, ggufs[0], out)


def _convert(spec: str, gguf: Path, out: Path) -> None:
    try:
        convert_gguf_to_hf(gguf, out)
    except RebmError as exc:
        raise RebmError(f"{spec}: {exc}") from None


