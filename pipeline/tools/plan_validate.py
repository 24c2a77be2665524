"""`rebm plan`'s first step: validate every section of a params file, collecting ALL errors.

Each section is checked with the model `pipeline.core.config.Params` declares for it (the
top-level `seed`, `device` and `datasets` with Params' own field types), and the rules that
only show across sections with `config.cross_section_problems`; every problem is reported as
`<file>: <section.key>: <message>`, so one run names every bad key of a file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline.core import config as C

# The sections of C.Params: validated whole by one model, or (`energy`, `train_lm`) one model per key.
SECTION_MODELS: dict[str, type[BaseModel]] = {}
SUBSECTION_MODELS: dict[str, dict[str, type[BaseModel]]] = {}
for _name, _field in C.Params.model_fields.items():
    _model = C.unwrap_optional(_field.annotation)
    if isinstance(_model, type) and issubclass(_model, C.Section):
        if issubclass(_model, C.KeyedSections):
            SUBSECTION_MODELS[_name] = {k: f.annotation for k, f in _model.model_fields.items()}
        else:
            SECTION_MODELS[_name] = _field.annotation  # `X | None`: check() accepts null
REQUIRED = ("seed", "datasets", *SECTION_MODELS, *SUBSECTION_MODELS)


def _field_adapter(name: str) -> TypeAdapter:
    """A validator for the top-level field `name` of C.Params, with the constraints Params declares."""
    info = C.Params.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


_SEED, _DEVICE, _DATASETS = (_field_adapter(name) for name in ("seed", "device", "datasets"))


def _drop(node: Any, loc: tuple) -> bool:
    """Delete the key at `loc` (a pydantic error location) from nested dicts/lists; False if absent."""
    for key in loc[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


def _section_model(name: str) -> type[BaseModel] | None:
    """A section added later (e.g. `report`) is checked by `<Name>Config` in pipeline.core.config if it exists."""
    cls = getattr(C, "".join(part.title() for part in name.split("_")) + "Config", None)
    return cls if isinstance(cls, type) and issubclass(cls, C.Section) else None


@dataclass
class Validated:
    """Each section's validated model (None where it failed), the raw params, and every problem found."""

    path: Path
    raw: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.path}: {where}: {message}")

    def invalid(self, where: str, exc: ValidationError) -> None:
        for line in C.format_validation_error(self.path, where, exc).splitlines():
            if line not in self.errors:
                self.errors.append(line)

    def check(self, model: Any, where: str, node: Any) -> Any:
        """`node` validated by `model`, or None after recording its errors.

        pydantic runs a model's cross-field rules only once its fields are valid, so an unknown
        key would hide e.g. "prefix_len must be below seq_len": report the unknown keys, drop
        them, and validate again, so that every problem shows up in one run."""
        node = copy.deepcopy(node)
        if node is None and C.unwrap_optional(model) is not model:
            return None  # a section that may be null (a variant not applicable to the run) and is
        model = C.unwrap_optional(model)
        for _ in range(5):
            try:
                return model.model_validate(node)
            except ValidationError as exc:
                self.invalid(where, exc)
                extras = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
                if not extras or not all(_drop(node, loc) for loc in extras):
                    return None
        return None


def validate_params(path: Path) -> Validated:
    """Validate every section of `path`, collecting all errors instead of stopping at the first."""
    path = Path(path)
    v = Validated(path, C.read_params(path))  # missing file / bad YAML / not a mapping: one RebmError
    for name in REQUIRED:
        if name not in v.raw:
            v.error(name, "missing section")
    for name, adapter in (("seed", _SEED), ("device", _DEVICE)):
        if name in v.raw:
            try:
                adapter.validate_python(v.raw[name])
            except ValidationError as exc:
                v.invalid(name, exc)
    if "datasets" in v.raw:
        _check_datasets(v, v.raw["datasets"])
    _check_sections(v)
    for where, message in C.cross_section_problems(v.raw, list(v.datasets), v.sections):
        v.error(where, message)
    return v


def _check_datasets(v: Validated, datasets: Any) -> None:
    """Each `datasets` entry on its own, so that a bad one still leaves the others for the cross-section rules."""
    if not isinstance(datasets, dict) or not datasets:
        try:
            _DATASETS.validate_python(datasets)
        except ValidationError as exc:
            v.invalid("datasets", exc)
        return
    for key, spec in datasets.items():
        try:
            v.datasets[str(key)] = C.DATASET_SOURCE.validate_python(spec)
        except ValidationError as exc:
            tag = spec.get("source") if isinstance(spec, dict) else None
            for err in exc.errors():  # drop the union's tag ('hf') from the location
                loc = err["loc"][1:] if err["loc"][:1] == (tag,) else err["loc"]
                v.error(".".join(str(p) for p in ("datasets", key, *loc)), err["msg"])


def _check_sections(v: Validated) -> None:
    """The sections of C.Params, keyed ones key by key, then any other section a `<Name>Config` checks."""
    raw = v.raw
    for name, model in SECTION_MODELS.items():
        if name in raw:
            v.sections[name] = v.check(model, name, raw[name])
    for name, children in SUBSECTION_MODELS.items():
        if name not in raw:
            continue
        node = raw[name]
        if not isinstance(node, dict):
            v.error(name, f"expected a mapping with keys {', '.join(children)}")
            continue
        parts = {}
        for key, model in children.items():
            if key not in node:
                v.error(f"{name}.{key}", "missing section")
            else:
                parts[key] = v.check(model, f"{name}.{key}", node[key])
        for key in node:
            if key not in children:
                v.error(f"{name}.{key}", f"unknown key (expected: {', '.join(children)})")
        v.sections[name] = parts
    for name in raw:
        if name in REQUIRED or name == "device":
            continue
        model = _section_model(name)
        if model is None:
            v.notes.append(f"section '{name}' is not read by any stage rebm plan knows; not checked")
        else:
            v.sections[name] = v.check(model, name, raw[name])
