"""`rebm plan`'s memory column: what each stage holds at its peak, from the params alone.

Estimates, in bytes, for the driver (the stage's own process) and for one worker (a Ray actor
or Ray Train worker; the driver itself when the stage runs in one process), and what a stage
leaves on disk. The rules, written once here:

training    16 bytes per trained parameter (fp32 weights, gradients, AdamW's two moments), 4 per
            frozen one (RALM's base), plus activations of one micro-batch,
            batch · T · layers · (34 · d + 5 · heads · T) bytes at 16 bits, twice that in fp32
            (Korthikanti et al. 2022, eq. 2, without recomputation), plus the logits and their
            gradient, batch · T · |V| · 4 · 2.
sampling    the LM's weights plus a KV cache of batch_samples · T · layers · 2 · d values and
            the last position's logits, batch_samples · |V| · 4 · 2.
data        what the stage reads stays bounded: a Parquet row group, the tasks in flight, an
            8-byte id per window; training splits are read by rows from on-disk stores (disk).
Each estimate is a rule of thumb (allocator slack, the framework's own ~0.5 GB and CUDA's
context are not in it): read it as "fits" or "does not fit", not to the megabyte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import OptimConfig
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, PRETRAINED_ENERGIES, stage_name

ROW_GROUP = 4096  # rows per Parquet row group of every streaming writer (StreamingTableWriter)
INFLIGHT = 2  # tasks queued per actor (pipeline.sampling.actor_pool.ActorPool)
SHARD_BYTES = 200  # the driver's record of one negatives shard (plan, manifest)


@dataclass(frozen=True)
class Shape:
    layers: int
    d: int
    heads: int


@dataclass(frozen=True)
class MemoryRow:
    stage: str
    driver: float | None  # bytes
    worker: float | None  # bytes, per worker
    workers: int  # 0: the work runs in the driver
    disk: float | None  # bytes the stage's outputs or scratch take
    basis: str
    gpu_workers: bool = False  # the per-worker figure is GPU memory, not this machine's RAM


def machine_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _shape_of(config: Any) -> Shape | None:
    if config is None:
        return None

    def get(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None)), None)

    layers = get("n_layer", "num_hidden_layers")
    d = get("n_embd", "hidden_size")
    heads = get("n_head", "num_attention_heads")
    return Shape(layers, d, heads) if layers and d and heads else None


def model_shapes(v: Any, resolver: Any) -> dict[str, Shape | None]:
    """(layers, d, heads) of every model, from the params or a resolvable pretrained config."""
    lms, ebm = v.sections["train_lm"], v.sections["train_ebm"]

    def lm(cfg: Any) -> Shape | None:
        if cfg is None:
            return None
        if getattr(cfg, "init", None) is not None:  # RALM's phi has no init: always its arch
            return _shape_of(resolver.config(cfg.init)[0])
        return Shape(cfg.arch.n_layer, cfg.arch.d_model, cfg.arch.n_head)

    bit = v.sections["energy"]["bit"]
    shapes = {("ralm_phi" if variant == "ralm" else variant): lm(lms[variant]) for variant in LM_VARIANTS}
    shapes["mlm"] = Shape(bit.n_layer, bit.d_model, bit.n_head)
    shapes["unit"], shapes["bit"] = shapes["base"], shapes["mlm"]  # UNIT: the base LM's body; BIT: the MLM's encoder
    for variant in PRETRAINED_ENERGIES:
        cfg = getattr(ebm, variant)
        shapes[variant] = _shape_of(resolver.config(cfg.init)[0]) if cfg is not None else None
    return shapes


def _mul(*xs: float | int | None) -> float | int | None:
    """Product, None when any factor is unknown (shared with pipeline/tools/plan_rows.py)."""
    out: float | int = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def _add(*xs: float | int | None) -> float | int | None:
    return None if any(x is None for x in xs) else sum(xs)  # type: ignore[arg-type]


def activations(batch: int, T: int, shape: Shape | None, precision: str) -> float | None:
    """Activation bytes of one micro-batch kept for the backward pass (module docstring)."""
    if shape is None:
        return None
    per_token = shape.layers * (34 * shape.d + 5 * shape.heads * T)
    return batch * T * per_token * (1 if precision == "bf16" else 2)


def workers_on_gpu(cfg: Any) -> bool:
    """The one device rule of the memory column: whether a stage's workers hold their models on a
    GPU. Ray Train workers (an `optim` section) as `training.distributed.training_device` places
    them, pool actors (`num_workers`, `gpus_per_worker`) as `precision.pool_device`; work that
    runs in the driver (one training worker, `num_workers: 0`) counts as this machine's."""
    import torch  # here, not at import: validating a params file (`rebm plan`) needs no torch

    from pipeline.core.precision import pool_device

    driver = torch.device("cpu")  # the stage's own device: work in the driver is no GPU worker's
    if isinstance(cfg, OptimConfig):
        from pipeline.training.distributed import training_device

        return training_device(cfg, driver).type == "cuda"
    return pool_device(cfg.num_workers, cfg.gpus_per_worker, driver).type == "cuda"


def _training(stage: str, trained: int | None, frozen: int, shape: Shape | None, optim: Any, T: int, vocab: int | None,
              sequences_per_row: int, data: float | None, data_text: str, disk: float | None = None) -> MemoryRow:
    micro = max(1, optim.batch_size // (optim.workers * optim.grad_accum)) * sequences_per_row
    logits = _mul(micro, T, vocab, 8) if vocab else 0.0
    worker = _add(_mul(16, trained), 4 * frozen, activations(micro, T, shape, optim.precision), logits, data)
    driver = _add(_mul(4, trained), 4 * frozen, data) if optim.workers > 1 else worker
    gpu = workers_on_gpu(optim)
    count = f"{trained / 1e6:,.0f}M" if trained else "?"
    basis = (f"16 B x {count} trained params, activations of {micro} sequences x T, {data_text}"
             + (f"; {optim.workers} Ray Train workers on {'GPU' if gpu else 'CPU'}" if optim.workers > 1 else ""))
    return MemoryRow(stage, driver, worker, optim.workers if optim.workers > 1 else 0, disk, basis, gpu_workers=gpu)


@dataclass(frozen=True)
class _Dataset:
    """What every stage's estimate reads: the validated sections, one dataset's windows and the models."""

    v: Any  # pipeline.tools.plan_validate.Validated
    w: dict[str, int]
    P: dict[str, int | None]  # distinct parameters per model
    shapes: dict[str, Shape | None]
    vocab: int | None
    ds: str

    @property
    def T(self) -> int:
        return self.v.sections["tokenize"].seq_len

    @property
    def p(self) -> int:
        return self.v.sections["tokenize"].prefix_len

    def cap(self, n: int | None) -> int | None:
        """At most negatives.windows windows of a split get samples."""
        neg = self.v.sections["negatives"]
        return n if n is None or neg.windows is None else min(n, neg.windows)


def dataset_memory(v: Any, windows: dict[str, int] | None, sizes: dict[str, Any], shapes: dict[str, Shape | None],
                   vocab: int | None, ds: str) -> list[MemoryRow]:
    """Every stage's peak for one dataset (None where a size is unknown)."""
    d = _Dataset(v, windows or {}, {k: s.total for k, s in sizes.items()}, shapes, vocab, ds)
    w, T = d.w, d.T
    rows = [
        MemoryRow("ingest", ROW_GROUP * 20_000.0, None, 0, None,
                  f"a batch of {ROW_GROUP:,} documents per split writer (20 kB per document assumed)"),
        MemoryRow("tokenize", _mul(ROW_GROUP, T, 8), None, 0,
                  _mul(_add(*(w.get(s) for s in ("train", "valid", "test"))), T, 4),
                  f"a row group of {ROW_GROUP:,} windows; BPE training adds its word counts (distinct words, "
                  "not documents)"),
    ]
    rows += _lm_memory(d)
    rows.append(_negatives_memory(d))
    rows += _energy_memory(d)
    rows += _scoring_memory(d)
    return rows


def _lm_memory(d: _Dataset) -> list[MemoryRow]:
    """Causal-LM training: the train split is read by rows from an on-disk int32 store."""
    lms, P, T = d.v.sections["train_lm"], d.P, d.T
    store = _mul(d.w.get("train"), T, 4)
    rows = []
    for variant in LM_VARIANTS:
        cfg = lms[variant]
        if cfg is None or not cfg.optim.max_steps:
            continue
        if variant == "ralm":
            rows.append(_training(stage_name(variant), P.get("ralm_phi"), P.get("base") or 0, d.shapes.get("ralm_phi"),
                                  cfg.optim, T, d.vocab, 1, 0.0, "train windows read by rows from disk (+ 4 B x the "
                                  "frozen base)", disk=store))
        else:
            rows.append(_training(stage_name(variant), P.get(variant), 0, d.shapes.get(variant), cfg.optim, T, d.vocab,
                                  1, 0.0, "train windows read by rows from disk", disk=store))
    return rows


def _negatives_memory(d: _Dataset) -> MemoryRow:
    """The driver streams (a row group, the tasks in flight); each actor samples."""
    neg, w, T, p = d.v.sections["negatives"], d.w, d.T, d.p
    L = T - p
    s = d.shapes.get("base")
    bytes_w = 2 if neg.dtype == "bfloat16" else 4
    kv = None if s is None else neg.batch_samples * T * s.layers * 2 * s.d * bytes_w
    actor = _add(_mul(bytes_w, d.P.get("base")), kv, _mul(neg.batch_samples, d.vocab, 8))
    samples = neg.samples.get(d.ds, {})
    n_max = max(samples.values(), default=1)
    inflight = max(neg.num_workers, 1) * INFLIGHT * neg.shard_windows * (p * 8 + n_max * L * 8 + n_max * 12)
    shards = _add(*(_mul(d.cap(w.get(split)), 1 / neg.shard_windows) for split in samples)) if samples else 0.0
    driver = _add(ROW_GROUP * T * 8, inflight, _mul(shards, SHARD_BYTES))
    disk = _add(*(_mul(d.cap(w.get(split)), n, L * 8 + 12) for split, n in samples.items())) if samples else 0.0
    return MemoryRow("negatives", driver if neg.num_workers else _add(driver, actor),
                     actor if neg.num_workers else None,
                     neg.num_workers, disk, f"actor: LM weights + KV cache of {neg.batch_samples} samples x T; "
                     f"driver: a row group + {INFLIGHT} shards in flight per actor",
                     gpu_workers=workers_on_gpu(neg))


def _energy_memory(d: _Dataset) -> list[MemoryRow]:
    """pretrain_mlm (BIT's encoder) and the energies: an 8-byte id per window, pairs read from disk."""
    ebm, mlm, P, T, w = d.v.sections["train_ebm"], d.v.sections["pretrain_mlm"], d.P, d.T, d.w
    tr, va = w.get("train"), w.get("valid")
    rows = []
    if mlm is not None and ebm.bit is not None:
        rows.append(_training("pretrain_mlm", P.get("mlm"), 0, d.shapes.get("mlm"), mlm.optim, T, d.vocab, 1,
                              0.0, "train windows read by rows from disk", disk=_mul(tr, T, 4)))
    n_train = d.v.sections["negatives"].samples.get(d.ds, {}).get("train", 1)
    for variant in ENERGY_VARIANTS:
        cfg = getattr(ebm, variant)
        if cfg is None:
            continue
        ids = _mul(_add(d.cap(tr), va), 8)
        store = _add(_mul(d.cap(tr), T, 4), _mul(d.cap(tr), n_train, T - d.p, 4))
        rows.append(_training(stage_name(variant), P.get(variant), 0, d.shapes.get(variant), cfg.optim, T, None, 2,
                              ids, "8 B per window id (pairs read from the on-disk store)", disk=store))
    return rows


def _scoring_memory(d: _Dataset) -> list[MemoryRow]:
    """evaluate, generate and stepwise: the models, one forward batch per worker, the per-prefix energies."""
    ev, gen, sw = (d.v.sections[k] for k in ("evaluate", "generate", "stepwise"))
    neg, P, T = d.v.sections["negatives"], d.P, d.T
    energies = [P.get(e) for e in ev.energies]
    weights = _mul(4, _add(P.get("base"), max((e for e in energies if e is not None), default=0)))
    batch = neg.batch_samples * T * 8
    rows = [MemoryRow("evaluate", _add(weights, _mul(d.w.get("test"), sum(ev.n_eval.values()), 8)),
                      _add(weights, batch) if ev.num_workers else None, ev.num_workers, None,
                      "the base LM + the largest energy, a forward batch; float64 energies per prefix and sample "
                      "(the plan's evaluate note has the detail)"),
            MemoryRow("generate", _add(_mul(4, _add(P.get("base"), P.get(gen.energy))), batch), None, 0, None,
                      "the base LM + its energy and a forward batch")]
    chunk = sw.candidates * max(1, neg.batch_samples) * T * 8  # a worker's completions in flight
    results = 2 * sw.pairs * sw.candidates * sw.samples * 8  # every context's float64 weights, on the driver
    stepwise_weights = _mul(4, _add(P.get("base"), P.get(sw.energy)))
    rows.append(MemoryRow("stepwise", _add(stepwise_weights, results), _add(stepwise_weights, chunk)
                          if sw.num_workers else None, sw.num_workers, None,
                          f"the base LM + {sw.energy}; a worker holds K x batch_samples completions at a time, the "
                          "driver every context's K x n weights"))
    return rows


def fits(row: MemoryRow, ram: int) -> str:
    """Whether the driver and one CPU worker each fit in `ram` ('yes', 'no', '?'); a GPU worker's
    figure is for its GPU, said beside."""
    need = [row.driver] + ([row.worker] if row.worker is not None and not row.gpu_workers else [])
    verdict = "?" if any(x is None for x in need) else "yes" if max(need) <= ram else "no"
    return f"{verdict}, worker on GPU" if row.gpu_workers else verdict

