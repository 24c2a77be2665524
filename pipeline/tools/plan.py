"""`rebm plan`: validate a params file and count what every stage of dvc.yaml will compute.

Two pure steps, both without touching a model hub or allocating a model:

* `validate_params(path)` checks every section with its model in `pipeline.core.config` (and a few
  rules that only show across sections, e.g. an LM's n_positions against tokenize.seq_len),
  collecting ALL errors, each as `<file>: <section.key>: <message>`.
* `build_plan(path, ...)` counts, per dataset and stage, the sequences and tokens processed and
  the approximate FLOPs:

      training           ≈ 6 · N · tokens
      inference forward  ≈ 2 · N · tokens
      sampling           ≈ 2 · N · (prefix tokens + new tokens)   (KV cache, each prefix run once)

  N counts the parameters that multiply every token: all parameters minus embedding lookups,
  plus a tied output projection. Attention scores (≈ 4 · layers · T · d per token, a few
  percent at T = 160) are left out.

Model sizes come from the architecture in the params (instantiated on the `meta` device: no
memory), or for a pretrained `init` from a local directory / the offline HF cache; anything
else is reported as unknown, never guessed. Corpus sizes (windows per split) come from
`--windows` or from data/<dataset>/tokenize_stats.json when that was made with the same
tokenize settings and source type.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline.core import config as C
from pipeline.core.errors import RebmError
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, PRETRAINED_ENERGIES
from pipeline.tools.memory import _add, _mul, dataset_memory, fits, machine_memory, model_shapes

SPLITS = ("train", "valid", "test")
FORMULAS = {
    "train": "6·N·tokens",
    "forward": "2·N·tokens",
    "sample": "2·N·(prefix + new tokens)",
}
FORMULA_NOTE = (
    "FLOPs: training ≈ 6·N·tokens; inference forward ≈ 2·N·tokens; sampling with a KV cache ≈ "
    "2·N·(prefix tokens + new tokens), each prefix run once per window. N = parameters that multiply "
    "every token (embedding lookups excluded, a tied output projection included); attention scores "
    "(≈ 4·layers·T·d per token, a few % at T = 160) left out. Tokens are LM tokens (T per window)."
)
BPE_TOKENIZER = "byte-level BPE trained on train split"  # what stage tokenize records

# --------------------------------------------------------------------------- validation
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
_SOURCE = TypeAdapter(C.DatasetSource)


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


def validate_params(path: Path) -> Validated:
    """Validate every section of `path`, collecting all errors instead of stopping at the first."""
    path = Path(path)
    raw = C.read_params(path)  # missing file / bad YAML / not a mapping: one RebmError
    v = Validated(path, raw)

    def check(model: Any, where: str, node: Any) -> Any:
        # pydantic runs a model's cross-field rules only once its fields are valid, so an unknown
        # key would hide e.g. "prefix_len must be below seq_len": report the unknown keys, drop
        # them, and validate again, so that every problem shows up in one run.
        node = copy.deepcopy(node)
        if node is None and C.unwrap_optional(model) is not model:
            return None  # a section that may be null (a variant not applicable to the run) and is
        model = C.unwrap_optional(model)
        for _ in range(5):
            try:
                return model.model_validate(node)
            except ValidationError as exc:
                for line in C.format_validation_error(path, where, exc).splitlines():
                    if line not in v.errors:
                        v.errors.append(line)
                extras = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
                if not extras or not all(_drop(node, loc) for loc in extras):
                    return None
        return None

    for name in REQUIRED:
        if name not in raw:
            v.error(name, "missing section")
    seed = raw.get("seed")
    if "seed" in raw and (not isinstance(seed, int) or isinstance(seed, bool)):
        v.error("seed", f"expected an integer, got {seed!r}")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        v.error("device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")

    datasets = raw.get("datasets")
    if "datasets" in raw:
        if not isinstance(datasets, dict) or not datasets:
            v.error("datasets", "expected a mapping of dataset keys to sources (at least one)")
        else:
            for key, spec in datasets.items():
                try:
                    v.datasets[str(key)] = _SOURCE.validate_python(spec)
                except ValidationError as exc:
                    tag = spec.get("source") if isinstance(spec, dict) else None
                    for err in exc.errors():  # drop the union's tag ('hf') from the location
                        loc = err["loc"][1:] if err["loc"][:1] == (tag,) else err["loc"]
                        v.error(".".join(str(p) for p in ("datasets", key, *loc)), err["msg"])

    for name, model in SECTION_MODELS.items():
        if name in raw:
            v.sections[name] = check(model, name, raw[name])
    for name, children in SUBSECTION_MODELS.items():
        node = raw.get(name)
        if name not in raw:
            continue
        if not isinstance(node, dict):
            v.error(name, f"expected a mapping with keys {', '.join(children)}")
            continue
        parts = {}
        for key, model in children.items():
            if key not in node:
                v.error(f"{name}.{key}", "missing section")
            else:
                parts[key] = check(model, f"{name}.{key}", node[key])
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
            v.sections[name] = check(model, name, raw[name])

    _cross_checks(v)
    return v


def _cross_checks(v: Validated) -> None:
    for where, message in C.cross_section_problems(v.raw, list(v.datasets), v.sections):
        v.error(where, message)


# --------------------------------------------------------------------------- model sizes
@dataclass
class ModelSize:
    total: int | None  # distinct parameters (tied weights once), as count_parameters reports
    flop: int | None  # N of the FLOP formulas
    source: str

    @property
    def known(self) -> bool:
        return self.flop is not None


def unknown(reason: str) -> ModelSize:
    return ModelSize(None, None, f"unknown: {reason}")


def _sizes(model: Any, source: str, extra: int = 0) -> ModelSize:
    """Total and per-token (matmul) parameter counts of a model built on the meta device."""
    import torch

    from pipeline.models.lm import count_parameters

    seen: set[int] = set()
    lookups = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            lookups += module.weight.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head.weight.numel() if head is not None and id(head.weight) in seen else 0
    total = count_parameters(model)
    return ModelSize(total + extra, total - lookups + tied + extra, source)


def _on_meta(build: Any) -> Any:
    import torch

    with torch.device("meta"):
        return build()


class ModelResolver:
    """Configs of pretrained models by name: --model-config overrides, `package:`, a directory, the HF cache."""

    def __init__(self, overrides: dict[str, Path] | None = None):
        self.overrides = {k: Path(p) for k, p in (overrides or {}).items()}

    def config(self, name: str) -> tuple[Any | None, str]:
        from transformers import AutoConfig

        from pipeline.models.sources import cached_model_source, is_cached_source, resolve_model_source

        where = None
        if name in self.overrides:
            where = self.overrides[name]
            where = where.parent if where.is_file() else where
            label = f"--model-config {name}={self.overrides[name]}"
        elif is_cached_source(name) and cached_model_source(name) is None:  # planning never fetches nor builds
            return None, (f"'{name}' is not in the model cache yet "
                          "(its first use fetches or builds it; or --model-config)")
        else:
            try:
                local = Path(cached_model_source(name) if is_cached_source(name) else resolve_model_source(name))
            except RebmError as exc:
                return None, str(exc)
            if (local / "config.json").exists():
                where, label = local, f"{local}/config.json"
        if where is not None:
            try:
                return AutoConfig.from_pretrained(str(where), local_files_only=True), label
            except (OSError, ValueError) as exc:
                return None, f"cannot read the config in {where}: {exc}"
        try:  # a hub id: only what is already in the local HF cache, never the network
            return AutoConfig.from_pretrained(name, local_files_only=True), f"'{name}' config in the local HF cache"
        except (OSError, ValueError):
            return None, (f"'{name}' has no local config (not a directory, not in the HF cache; "
                          f"pass --model-config {name}=DIR)")

    def vocab_size(self, name: str) -> tuple[int | None, str]:
        """Size of a pretrained tokenizer (directory or cached hub id)."""
        from transformers import AutoTokenizer

        from pipeline.models.sources import cached_model_source, is_cached_source

        local = cached_model_source(name) if is_cached_source(name) else name  # planning never fetches nor builds
        if local is None:
            return None, f"tokenizer '{name}' is not in the model cache yet (its first use fetches or builds it)"
        try:
            tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError):
            return None, f"tokenizer '{name}' not available offline"
        return len(tok), f"tokenizer '{name}' (local)"


@dataclass
class _Tokenizer:
    """Just what build_mlm reads from a tokenizer: its length and pad id."""

    size: int

    def __len__(self) -> int:
        return self.size

    @property
    def pad_token_id(self) -> int:
        return self.size - 2


def model_sizes(v: Validated, vocab: int | None, resolver: ModelResolver) -> tuple[dict[str, ModelSize], int | None]:
    """N for every model of the pipeline given the LM vocabulary size (None: unknown), and the LM's vocabulary.

    A pretrained base LM (`train_lm.base.init`) brings its own vocabulary, which then wins.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from pipeline.models.lm import build_gpt2, gpt2_config
    from pipeline.models.mlm import build_mlm

    tok = v.sections["tokenize"]
    lms, ebm = v.sections["train_lm"], v.sections["train_ebm"]
    bit_arch = v.sections["energy"]["bit"]
    out: dict[str, ModelSize] = {}
    no_vocab = "the LM vocabulary size is unknown"

    def plain_lm(cfg: C.LMVariantConfig, key: str) -> tuple[ModelSize, Any]:
        if cfg.init is not None:
            config, label = resolver.config(cfg.init)
            if config is None:
                return unknown(label), None
            model = _on_meta(lambda: AutoModelForCausalLM.from_config(config))
            return _sizes(model, label), config
        if vocab is None:
            return unknown(no_vocab), None
        config = gpt2_config(cfg.arch, vocab, 0)
        return _sizes(_on_meta(lambda: build_gpt2(cfg.arch, vocab, 0)), f"train_lm.{key}.arch (meta device)"), config

    out["base"], base_config = plain_lm(lms["base"], "base")
    if lms["balm"] is not None:
        out["balm"], _ = plain_lm(lms["balm"], "balm")
    lm_vocab = base_config.vocab_size if base_config is not None else vocab
    # A variant null in params (not applicable to this run) gets no size: each block runs only for a set one.
    if lms["ralm"] is not None:
        arch = lms["ralm"].arch
        out["ralm_phi"] = (unknown(no_vocab) if lm_vocab is None else _sizes(
            _on_meta(lambda: build_gpt2(arch, lm_vocab, 0)), "train_lm.ralm.arch (meta device)"))
    # UNIT: the base LM's body (no LM head) + a d -> 1 projection.
    if ebm.unit is not None and base_config is None:
        out["unit"] = unknown(out["base"].source.removeprefix("unknown: "))
    elif ebm.unit is not None:
        body = _on_meta(lambda: AutoModel.from_config(base_config))
        out["unit"] = _sizes(body, "the base LM's body + scalar head", extra=body.config.hidden_size + 1)
    # pretrain_mlm: a BERT masked LM over the LM's tokens + [pad] + [mask]; BIT is its encoder + head.
    if ebm.bit is not None and lm_vocab is None:
        out["mlm"] = out["bit"] = unknown(no_vocab)
    elif ebm.bit is not None:
        mlm = _on_meta(lambda: build_mlm(bit_arch, _Tokenizer(lm_vocab + 2), tok.seq_len))
        out["mlm"] = _sizes(mlm, "energy.bit as a masked LM (meta device)")
        body = _on_meta(lambda: AutoModel.from_config(mlm.config))
        out["bit"] = _sizes(body, "energy.bit encoder + scalar head (meta device)", extra=bit_arch.d_model + 1)
    for variant in PRETRAINED_ENERGIES:
        if getattr(ebm, variant) is None:
            continue
        config, label = resolver.config(getattr(ebm, variant).init)
        if config is None:
            out[variant] = unknown(label)
        else:
            body = _on_meta(functools.partial(AutoModel.from_config, config))
            out[variant] = _sizes(body, f"{label} + scalar head", extra=config.hidden_size + 1)
    if "ralm_phi" in out:
        out["ralm"] = _sum(out["base"], out["ralm_phi"], "base + phi")
    return out, lm_vocab


def _sum(a: ModelSize, b: ModelSize, source: str) -> ModelSize:
    if not (a.known and b.known):
        return unknown(a.source if not a.known else b.source)
    return ModelSize(a.total + b.total, a.flop + b.flop, source)


# --------------------------------------------------------------------------- corpus sizes
@dataclass
class Corpus:
    windows: dict[str, int] | None
    source: str
    vocab: int | None = None  # the tokenizer's actual size, when tokenize_stats.json is used


def parse_windows(specs: list[str]) -> dict[str, dict[str, int]]:
    """`news=2.86M,233k,198` -> {"news": {"train": 2860000, "valid": 233000, "test": 198}}."""
    out = {}
    for spec in specs:
        name, sep, counts = spec.partition("=")
        parts = counts.split(",")
        if not sep or not name or len(parts) != 3:
            raise RebmError(f"--windows {spec!r}: expected DATASET=TRAIN,VALID,TEST (e.g. news=2.8M,14k,560)")
        try:
            out[name] = dict(zip(SPLITS, (_count(p) for p in parts), strict=True))
        except ValueError:
            raise RebmError(f"--windows {spec!r}: counts must be numbers, optionally with k, M or G") from None
    return out


def _count(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9_]*\.?[0-9]+)\s*([kKMG]?)\s*", text)
    if not m:
        raise ValueError(text)
    value = float(m.group(1).replace("_", "")) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
    if value <= 0:
        raise ValueError(text)
    return int(round(value))


def corpus_from_stats(dataset: str, v: Validated, root: Path) -> Corpus:
    """Windows per split from data/<dataset>/tokenize_stats.json, if it matches these params."""
    from pipeline.core.paths import DatasetPaths

    paths = DatasetPaths(dataset, root)
    stats_path = paths.tokenize_stats
    if not stats_path.exists():
        return Corpus(None, f"unknown: no {stats_path}; pass --windows {dataset}=TRAIN,VALID,TEST")
    try:
        stats = json.loads(stats_path.read_text())
        windows = {split: int(stats["splits"][split]["windows"]) for split in SPLITS}
    except (ValueError, KeyError, TypeError) as exc:
        return Corpus(None, f"unknown: {stats_path} unreadable ({exc}); pass --windows {dataset}=TRAIN,VALID,TEST")
    tok = v.sections["tokenize"]
    wanted = {"prefix_len": tok.prefix_len, "seq_len": tok.seq_len, "stride": tok.stride,
              "tokenizer": tok.pretrained or BPE_TOKENIZER}
    differ = [f"{k} {stats.get(k)!r} vs {want!r}" for k, want in wanted.items() if stats.get(k) != want]
    if not tok.pretrained and isinstance(stats.get("vocab_size"), int) and stats["vocab_size"] > tok.vocab_size:
        differ.append(f"vocab_size {stats['vocab_size']} vs {tok.vocab_size}")
    try:
        source = json.loads(paths.ingest_stats.read_text()).get("source")
    except (OSError, ValueError):
        source = None
    if source != v.datasets[dataset].source:
        differ.append(f"source {source!r} vs {v.datasets[dataset].source!r}")
    if differ:
        return Corpus(None, f"unknown: {stats_path} was made with other settings ({'; '.join(differ)}); "
                            f"pass --windows {dataset}=TRAIN,VALID,TEST")
    vocab = stats.get("vocab_size") if isinstance(stats.get("vocab_size"), int) else None
    return Corpus(windows, str(stats_path), vocab)


# --------------------------------------------------------------------------- the plan
@dataclass
class Row:
    dataset: str
    stage: str
    part: str
    model: str
    n: int | None  # N in the FLOP formula (for RALM training: phi's; the frozen base is listed in the note)
    sequences: int | None
    tokens: int | None
    flops: float | None
    formula: str
    note: str = ""


@dataclass
class DatasetPlan:
    dataset: str
    source: str
    windows: dict[str, int] | None
    windows_source: str
    vocab: int | None
    vocab_source: str
    models: dict[str, dict[str, Any]]
    rows: list[Row]
    notes: list[str]
    memory: list[dict[str, Any]]  # pipeline.tools.memory.MemoryRow per stage, bytes


@dataclass
class Plan:
    params: str
    formulas: str
    datasets: list[DatasetPlan]
    stage_totals: list[dict[str, Any]]
    total: dict[str, Any]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _evals(optim: C.OptimConfig) -> int:
    """Validations the training loop runs: every eval_every steps and at the last step."""
    return math.ceil(optim.max_steps / optim.eval_every)


def dataset_rows(
    ds: str, v: Validated, windows: dict[str, int] | None, sizes: dict[str, ModelSize], vocab: int | None
) -> tuple[list[Row], list[str]]:
    """The work of every stage for one dataset (None wherever a size is unknown)."""
    tok, neg, ev, gen = (v.sections[k] for k in ("tokenize", "negatives", "evaluate", "generate"))
    lms, ebm, mlm = v.sections["train_lm"], v.sections["train_ebm"], v.sections["pretrain_mlm"]
    p, T = tok.prefix_len, tok.seq_len
    L = T - p
    w = windows or {}
    tr, va, te = (w.get(s) for s in SPLITS)
    rows: list[Row] = []
    notes: list[str] = []

    def row(stage: str, part: str, model: str, size: ModelSize, sequences, tokens, kind: str, note: str = "",
            extra_flops: float | None = 0.0) -> None:
        factor = 6 if kind == "train" else 2
        flops = _add(_mul(factor, size.flop, tokens), extra_flops)
        rows.append(Row(ds, stage, part, model, size.flop, sequences, tokens, flops, FORMULAS[kind], note))

    def epochs(sequences: int, train_windows: int | None) -> str:
        return f"{sequences / train_windows:.2f} epochs of {train_windows:,} windows" if train_windows else ""

    # -- causal LMs ----------------------------------------------------------------------
    for variant in LM_VARIANTS:
        cfg = lms[variant]
        if cfg is None:
            continue  # not applicable: its stage writes a record in seconds
        o = cfg.optim
        seqs = o.batch_size * o.max_steps
        stage = f"train_lm_{variant}"
        if variant == "ralm":
            base_fwd = _mul(2, sizes["base"].flop, seqs * T)
            row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,}", "RALM phi", sizes["ralm_phi"], seqs,
                seqs * T, "train", f"+ 2·N_base·tokens for the frozen base; {epochs(seqs, tr)}".rstrip("; "),
                extra_flops=base_fwd)
            model, size = "RALM (base + phi)", sizes["ralm"]
        else:
            model, size = ("base LM" if variant == "base" else "BALM"), sizes[variant]
            if o.max_steps:  # 0: a pretrained LM used as is
                row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,}", model, size, seqs, seqs * T, "train",
                    epochs(seqs, tr))
        vseqs = _add(_mul(_evals(o), va), va, te)
        row(stage, f"validation x{_evals(o)} + final valid/test", model, size, vseqs, _mul(vseqs, T), "forward")

    # -- negatives -----------------------------------------------------------------------
    for split, n in neg.samples.get(ds, {}).items():
        wins = w.get(split)
        seqs, new, prefix = _mul(wins, n), _mul(wins, n, L), _mul(wins, p)
        rows.append(Row(ds, "negatives", f"sample {split} (n={n:,})", "base LM", sizes["base"].flop, seqs, new,
                        _mul(2, sizes["base"].flop, _add(prefix, new)), FORMULAS["sample"],
                        f"new tokens = windows x n x (T-p); + {_fmt(prefix)} prefix tokens"
                        if prefix is not None else ""))

    # -- masked-LM pretraining of BIT ------------------------------------------------------
    if mlm is not None:
        o = mlm.optim
        seqs = o.batch_size * o.max_steps
        row("pretrain_mlm", f"train {o.max_steps:,} steps x {o.batch_size:,}", "BIT masked LM", sizes["mlm"], seqs,
            seqs * T, "train", epochs(seqs, tr))
        vseqs = _mul(_evals(o), va)
        row("pretrain_mlm", f"validation x{_evals(o)}", "BIT masked LM", sizes["mlm"], vseqs, _mul(vseqs, T),
            "forward")

    # -- energy models -------------------------------------------------------------------
    names = {"unit": "UNIT energy", "bit": "BIT energy", "bit_star": "BIT* energy", "bit_large": "BIT-LARGE* energy"}
    for variant in ENERGY_VARIANTS:
        cfg = getattr(ebm, variant)
        if cfg is None:
            continue
        o = cfg.optim
        stage = f"train_ebm_{variant}"
        seqs = 2 * o.batch_size * o.max_steps
        row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,} pairs", names[variant], sizes[variant], seqs,
            seqs * T, "train", f"real + LM sample per window; {epochs(o.batch_size * o.max_steps, tr)}".rstrip("; "))
        valid_windows = None if va is None else min(va, cfg.eval_windows or va)
        vseqs = _mul(_evals(o) + 1, 2, valid_windows)
        row(stage, f"validation x{_evals(o)} + final", names[variant], sizes[variant], vseqs, _mul(vseqs, T), "forward")

    # -- evaluate --------------------------------------------------------------------------
    n_draw = ev.log_z_samples
    te_eval = None if te is None else min(ev.windows, te) if ev.windows else te  # evaluate.windows
    W = None if te_eval is None else min(ev.positions.windows, te_eval) if ev.positions.energies else 0
    exact = None if W is None else min(ev.positions.exact_last_for(ds), W)
    s = ev.positions.samples
    lm_names = {"base": "base LM", "balm": "BALM", "ralm": "RALM (base + phi)"}
    for lm in ev.lms:
        row("evaluate", f"LM log-probs {lm}", lm_names[lm], sizes[lm], te_eval, _mul(te_eval, T), "forward")
    new, prefix = _mul(te_eval, n_draw, L), _mul(te_eval, p)
    cap = "; at most: a futile draw stops at a look" if ev.convergence.stop_khat is not None else ""
    rows.append(Row(ds, "evaluate", f"log Z samples (n={n_draw:,} per prefix)", "base LM", sizes["base"].flop,
                    _mul(te_eval, n_draw), new, _mul(2, sizes["base"].flop, _add(new, prefix)), FORMULAS["sample"],
                    (f"+ {_fmt(prefix)} prefix tokens" if prefix is not None else "") + cap))
    if W:
        new = _mul(W, s, L * (L + 1) // 2)
        prefix = _mul(W, L * p + L * (L - 1) // 2)
        rows.append(Row(ds, "evaluate", f"Fig. 1 completions ({W} windows x {L} positions x {s:,})", "base LM",
                        sizes["base"].flop, _mul(W, L, s), new, _mul(2, sizes["base"].flop, _add(new, prefix)),
                        FORMULAS["sample"], f"+ {_fmt(prefix)} prefix tokens"))
        row("evaluate", f"Fig. 1 exact last position ({exact} windows)", "base LM", sizes["base"], exact,
            _mul(exact, T - 1), "forward")
    for energy in ev.energies:
        n_eval = ev.n_eval[energy]
        seqs = _mul(te_eval, _add(1, n_eval))
        part = f"energies {energy}: real + {_fmt(n_eval)} samples/prefix"
        if energy in ev.positions.energies and W:
            seqs = _add(seqs, W * L * s, _mul(exact, vocab))
            part += " + Fig. 1"
        row("evaluate", part, names[energy], sizes[energy], seqs, _mul(seqs, T), "forward")
    if te_eval is not None:
        notes.append(_evaluate_memory(ev, neg, te_eval, W or 0, exact or 0, vocab, L, T))

    # -- generate --------------------------------------------------------------------------
    Wg = None if te is None else min(gen.windows, te) if gen.windows else te
    row("generate", "gold log-probs", "base LM", sizes["base"], Wg, _mul(Wg, T), "forward")
    new, prefix = _mul(Wg, gen.n_gen, L), _mul(Wg, p)
    rows.append(Row(ds, "generate", f"top-{gen.top_k} samples (n={gen.n_gen:,})", "base LM", sizes["base"].flop,
                    _mul(Wg, gen.n_gen), new, _mul(2, sizes["base"].flop, _add(new, prefix)), FORMULAS["sample"],
                    f"+ {_fmt(prefix)} prefix tokens" if prefix is not None else ""))
    seqs = _mul(Wg, gen.n_gen + 1)
    row("generate", f"energies {gen.energy}: gold + samples", names[gen.energy], sizes[gen.energy], seqs,
        _mul(seqs, T), "forward")
    rows += _stepwise_rows(ds, v.sections["stepwise"], sizes, names, p, T, te)
    return rows, notes


def _stepwise_rows(ds: str, sw: C.StepwiseConfig, sizes: dict[str, ModelSize], names: dict[str, str], p: int, T: int,
                   te: int | None) -> list[Row]:
    """Appendix A.1: 2 x pairs contexts, each K candidates x n completions of at most T - p - 1
    tokens (counted at that horizon: contexts sit anywhere in the continuation), all scored."""
    L = T - p
    W = None if te is None else min(sw.windows, te)
    contexts = 2 * sw.pairs
    seqs = contexts * sw.candidates * sw.samples
    new, prefix = seqs * max(L - 1, 0), contexts * sw.candidates * T
    base = sizes["base"]
    return [
        Row(ds, "stepwise", f"context samples: {_fmt(W)} prefixes, top-{sw.lm_top_k}", "base LM", base.flop, W,
            _mul(W, L), _mul(2, base.flop, _mul(W, T)), FORMULAS["sample"], ""),
        Row(ds, "stepwise", f"{contexts} contexts x top-{sw.candidates} x n={sw.samples:,} completions", "base LM",
            base.flop, seqs, new, _mul(2, base.flop, new + prefix), FORMULAS["sample"],
            f"+ {_fmt(prefix)} context tokens"),
        Row(ds, "stepwise", f"energies {sw.energy}: every completion", names[sw.energy], sizes[sw.energy].flop, seqs,
            seqs * T, _mul(2, sizes[sw.energy].flop, seqs * T), FORMULAS["forward"], ""),
    ]


def _evaluate_memory(ev: C.EvaluateConfig, neg: C.NegativesConfig, windows: int, W: int, exact: int,
                     vocab: int | None, L: int, T: int) -> str:
    """What evaluate holds at its peak: the LM samples stream (chunks of stream_samples per prefix,
    drawn, scored and dropped on the workers), so the per-prefix float64 energies of every energy, one
    forward batch of tokens per worker, and the |V| last-position candidate windows of one energy."""
    def mb(nbytes: float | None) -> str:
        if nbytes is None:
            return "? MB"
        return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"

    s = ev.positions.samples
    energies = {e: 8 * (windows * ev.n_eval[e] + (W * L * s if e in ev.positions.energies else 0)) for e in ev.energies}
    rows = min(ev.stream_samples, neg.batch_samples, max(ev.log_z_samples, s if W else 0))
    batch = rows * T * 8
    candidates = None if vocab is None else exact * vocab * T * 8
    tokens = None if vocab is None else (windows * ev.log_z_samples + W * L * s + exact * vocab) * T * 8
    figure1 = f" (a Fig. 1 energy also its {W} x {L} x {s:,})" if W and ev.positions.energies else ""
    return (f"evaluate streams its LM samples, {ev.stream_samples:,} per prefix per chunk: it keeps their per-prefix "
            f"float64 energies{figure1}, " + ", ".join(f"{e} {mb(n)}" for e, n in energies.items())
            + f"; a worker holds one forward batch of {rows:,} samples x T int64 ({mb(batch)}) at a time"
            + (f"; the exact last position scores {exact} x |V| candidate windows ({mb(candidates)} int64)"
               if exact else "")
            + f": peak ≈ {mb(_add(sum(energies.values()), batch, candidates or 0))} on top of the models "
            + f"(all sample tokens at once would be {mb(tokens)})")


def build_plan(
    params: Path,
    root: Path = Path("."),
    windows: dict[str, dict[str, int]] | None = None,
    model_configs: dict[str, Path] | None = None,
) -> Plan:
    """Validate `params` and count every stage's work. Raises RebmError listing every problem."""
    v = validate_params(params)
    windows = windows or {}
    unknown_ds = sorted(set(windows) - set(v.raw.get("datasets") or {}))
    for ds in unknown_ds:
        v.errors.append(f"--windows {ds}=…: no dataset '{ds}' in {params} "
                        f"(datasets: {', '.join(v.datasets) or 'none'})")
    if v.errors:
        raise RebmError("\n".join(v.errors))
    resolver = ModelResolver(model_configs)
    tok = v.sections["tokenize"]
    plans: list[DatasetPlan] = []
    size_cache: dict[int | None, tuple[dict[str, ModelSize], int | None]] = {}
    for ds, spec in v.datasets.items():
        corpus = corpus_from_stats(ds, v, root)
        if ds in windows:
            if corpus.windows is not None:
                v.notes.append(f"{ds}: --windows overrides {corpus.source}")
            corpus = Corpus(windows[ds], "--windows (given on the command line)")
        vocab, vocab_source = _vocab(tok, corpus, resolver)
        if vocab not in size_cache:
            size_cache[vocab] = model_sizes(v, vocab, resolver)
        sizes, lm_vocab = size_cache[vocab]
        rows, notes = dataset_rows(ds, v, corpus.windows, sizes, lm_vocab)
        memory = dataset_memory(v, corpus.windows, sizes, model_shapes(v, resolver), lm_vocab, ds)
        plans.append(DatasetPlan(
            dataset=ds, source=_describe_source(spec), windows=corpus.windows, windows_source=corpus.source,
            vocab=lm_vocab, vocab_source=vocab_source if lm_vocab == vocab else "the pretrained base LM's config",
            models={k: asdict(m) for k, m in sizes.items()}, rows=rows, notes=notes,
            memory=[{**asdict(m), "fits_this_machine": fits(m, machine_memory())} for m in memory],
        ))
    stage_totals = _totals(plans)
    total = _total([r for dp in plans for r in dp.rows])
    return Plan(str(params), FORMULA_NOTE, plans, stage_totals, total, v.notes)


def _vocab(tok: C.TokenizeConfig, corpus: Corpus, resolver: ModelResolver) -> tuple[int | None, str]:
    if corpus.vocab is not None:
        return corpus.vocab, corpus.source
    if tok.pretrained:
        size, label = resolver.vocab_size(tok.pretrained)
        if size is not None:
            return size, label
        return tok.vocab_size, f"tokenize.vocab_size in the params ({label})"
    return tok.vocab_size, "tokenize.vocab_size (the BPE target; the trained vocabulary can be slightly smaller)"


def _describe_source(spec: Any) -> str:
    if spec.source == "brown":
        return f"brown: {', '.join(spec.categories)}"
    if spec.source == "hf":
        extra = f", {spec.rows_per_doc} rows per document" if spec.rows_per_doc > 1 else ""
        return f"hf: {spec.path}{f' ({spec.name})' if spec.name else ''} split {spec.split}{extra}"
    return f"files: {spec.glob}"


def _total(rows: list[Row]) -> dict[str, Any]:
    """Sums over rows; `unknown` names the columns where some row's value is unknown (the sum is then a lower bound)."""
    out: dict[str, Any] = {"unknown": []}
    for attr in ("sequences", "tokens", "flops"):
        values = [getattr(r, attr) for r in rows]
        known = sum(x for x in values if x is not None)
        out[attr] = float(known) if attr == "flops" else int(known)
        if any(x is None for x in values):
            out["unknown"].append(attr)
    return out


def _totals(plans: list[DatasetPlan]) -> list[dict[str, Any]]:
    order: list[str] = []
    by_stage: dict[str, list[Row]] = {}
    for dp in plans:
        for r in dp.rows:
            if r.stage not in by_stage:
                order.append(r.stage)
                by_stage[r.stage] = []
            by_stage[r.stage].append(r)
    return [{"stage": s, **_total(by_stage[s])} for s in order]


# --------------------------------------------------------------------------- formatting
def _fmt(x: float | int | None) -> str:
    """1234 -> 1.23k; None -> ?"""
    if x is None:
        return "?"
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _bytes(x: float | None) -> str:
    if x is None:
        return "?"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x / 1e6:,.2f} MB"


def _flops(x: float | None) -> str:
    return "?" if x is None else f"{x:.2e}"


def _table(header: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]


def format_plan(plan: Plan) -> str:
    out = [f"rebm plan {plan.params}", "", plan.formulas, ""]
    for dp in plan.datasets:
        w = dp.windows
        counts = " / ".join(f"{w[s]:,}" for s in SPLITS) if w else "?"
        out.append(f"== {dp.dataset} ({dp.source})")
        out.append(f"windows train / valid / test: {counts}  [{dp.windows_source}]")
        out.append(f"LM vocabulary: {f'{dp.vocab:,}' if dp.vocab else '?'}  [{dp.vocab_source}]")
        model_rows = [[name, _fmt(m["total"]), _fmt(m["flop"]), m["source"]] for name, m in dp.models.items()]
        out.extend(_table(["model", "params", "N (FLOPs)", "from"], model_rows, {1, 2}))
        out.append("")
        body = [[r.stage, r.part, _fmt(r.n), _fmt(r.sequences), _fmt(r.tokens), _flops(r.flops), r.formula, r.note]
                for r in dp.rows]
        out.extend(_table(["stage", "work", "N", "sequences", "tokens", "FLOPs", "formula", "note"], body,
                          {2, 3, 4, 5}))
        out.extend(f"note: {n}" for n in dp.notes)
        out.append("")
        out.append("memory at the peak (estimates, pipeline/tools/memory.py; "
                   f"this machine: {_bytes(machine_memory())} RAM)")
        body = [[m["stage"], _bytes(m["driver"]), _bytes(m["worker"]) if m["workers"] else "-",
                 str(m["workers"] or "-"), _bytes(m["disk"]), m["fits_this_machine"], m["basis"]] for m in dp.memory]
        out.extend(_table(["stage", "driver", "per worker", "workers", "disk", "fits here", "basis"], body,
                          {1, 2, 3, 4}))
        out.append("")
    out.append("== per stage, all datasets")

    def total_row(name: str, t: dict[str, Any]) -> list[str]:
        def cell(attr: str, text: str) -> str:
            if attr not in t["unknown"]:
                return text
            return ">=" + text if t[attr] else "?"

        return [name, cell("sequences", _fmt(t["sequences"])), cell("tokens", _fmt(t["tokens"])),
                cell("flops", _flops(t["flops"]))]

    body = [total_row(t["stage"], t) for t in plan.stage_totals]
    body.append(total_row("TOTAL", plan.total))
    out.extend(_table(["stage", "sequences", "tokens", "FLOPs"], body, {1, 2, 3}))
    if plan.total["unknown"]:
        out.append("'>=': a lower bound that leaves out work of unknown size ('?' above)")
    out.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(out) + "\n"


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2, sort_keys=False) + "\n"

