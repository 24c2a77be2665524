"""`rebm plan`: validate a params file and count what every stage of dvc.yaml will compute.

Two pure steps, both without touching a model hub or allocating a model:

* `validate_params(path)` (pipeline/tools/plan_validate.py) checks every section with its model
  in `pipeline.core.config` and the rules that only show across sections (e.g. an LM's
  n_positions against tokenize.seq_len), collecting ALL errors, each as
  `<file>: <section.key>: <message>`.
* `build_plan(path, ...)` counts, per dataset and stage, the sequences and tokens processed and
  the approximate FLOPs (pipeline/tools/plan_rows.py):

      training           ≈ 6 · N · tokens
      inference forward  ≈ 2 · N · tokens
      sampling           ≈ 2 · N · (prefix tokens + new tokens)   (KV cache, each prefix run once)

  N counts the parameters that multiply every token: all parameters minus embedding lookups,
  plus a tied output projection. Attention scores (≈ 4 · layers · T · d per token, a few
  percent at T = 160) are left out. Each stage's peak memory comes from pipeline/tools/memory.py.

Model sizes come from the architecture in the params (instantiated on the `meta` device: no
memory), or for a pretrained `init` from a local directory / the offline HF cache; anything
else is reported as unknown, never guessed (pipeline/tools/plan_models.py). Corpus sizes
(windows per split) come from `--windows` or from data/<dataset>/tokenize_stats.json when that
was made with the same tokenize settings and source type.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core import config as C
from pipeline.core.errors import RebmError
from pipeline.tools.memory import dataset_memory, fits, machine_memory, model_shapes
from pipeline.tools.plan_models import ModelResolver, ModelSize, model_sizes
from pipeline.tools.plan_rows import SPLITS, Row, _fmt, dataset_rows
from pipeline.tools.plan_validate import Validated, validate_params

__all__ = ["ModelResolver", "ModelSize", "Plan", "Validated", "build_plan", "format_plan", "parse_windows",
           "plan_json", "validate_params"]

FORMULA_NOTE = (
    "FLOPs: training ≈ 6·N·tokens; inference forward ≈ 2·N·tokens; sampling with a KV cache ≈ "
    "2·N·(prefix tokens + new tokens), each prefix run once per window. N = parameters that multiply "
    "every token (embedding lookups excluded, a tied output projection included); attention scores "
    "(≈ 4·layers·T·d per token, a few % at T = 160) left out. Tokens are LM tokens (T per window)."
)
BPE_TOKENIZER = "byte-level BPE trained on train split"  # what stage tokenize records


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
    shapes = model_shapes(v, resolver)  # the same for every dataset: no vocabulary in it
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
        memory = dataset_memory(v, corpus.windows, sizes, shapes, lm_vocab, ds)
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

