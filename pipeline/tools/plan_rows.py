"""`rebm plan`'s work rows: per dataset and stage, the sequences and tokens processed and the FLOPs.

    training           ≈ 6 · N · tokens
    inference forward  ≈ 2 · N · tokens
    sampling           ≈ 2 · N · (prefix tokens + new tokens)   (KV cache, each prefix run once)

N is `plan_models.ModelSize.flop`; every count is None where a size (windows, N) is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import config as C
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, plan_name, stage_name
from pipeline.tools.memory import _add, _mul
from pipeline.tools.plan_models import ModelSize
from pipeline.tools.plan_validate import Validated

SPLITS = ("train", "valid", "test")
FORMULAS = {
    "train": "6·N·tokens",
    "forward": "2·N·tokens",
    "sample": "2·N·(prefix + new tokens)",
}
BASE = plan_name("base")


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


def _fmt(x: float | int | None) -> str:
    """1234 -> 1.23k; None -> ?"""
    if x is None:
        return "?"
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _evals(optim: C.OptimConfig) -> int:
    """Validations the training loop runs: every eval_every steps and at the last step."""
    return math.ceil(optim.max_steps / optim.eval_every)


def _epochs(sequences: int, train_windows: int | None) -> str:
    return f"{sequences / train_windows:.2f} epochs of {train_windows:,} windows" if train_windows else ""


@dataclass
class _Rows:
    """One dataset's rows as they are added: its window counts, window shape and model sizes."""

    ds: str
    sizes: dict[str, ModelSize]
    p: int
    T: int
    tr: int | None
    va: int | None
    te: int | None
    rows: list[Row] = field(default_factory=list)

    @property
    def L(self) -> int:
        return self.T - self.p

    def row(self, stage: str, part: str, model: str, size: ModelSize, sequences: Any, tokens: Any, kind: str,
            note: str = "", extra_flops: float | None = 0.0) -> None:
        factor = 6 if kind == "train" else 2
        flops = _add(_mul(factor, size.flop, tokens), extra_flops)
        self.rows.append(Row(self.ds, stage, part, model, size.flop, sequences, tokens, flops, FORMULAS[kind], note))

    def sample(self, stage: str, part: str, sequences: Any, new: Any, prefix: Any, note: str) -> None:
        """Sampling with the base LM: `new` tokens drawn after `prefix` tokens run once."""
        flop = self.sizes["base"].flop
        self.rows.append(Row(self.ds, stage, part, BASE, flop, sequences, new, _mul(2, flop, _add(new, prefix)),
                             FORMULAS["sample"], note))


def dataset_rows(
    ds: str, v: Validated, windows: dict[str, int] | None, sizes: dict[str, ModelSize], vocab: int | None
) -> tuple[list[Row], list[str]]:
    """The work of every stage for one dataset (None wherever a size is unknown)."""
    tok = v.sections["tokenize"]
    w = windows or {}
    out = _Rows(ds, sizes, tok.prefix_len, tok.seq_len, *(w.get(s) for s in SPLITS))
    notes: list[str] = []
    _lm_rows(out, v.sections["train_lm"])
    _negatives_rows(out, v.sections["negatives"], w)
    if v.sections["pretrain_mlm"] is not None:
        _mlm_rows(out, v.sections["pretrain_mlm"])
    _energy_rows(out, v.sections["train_ebm"])
    te_eval, W, exact = _evaluate_rows(out, v.sections["evaluate"], vocab)
    if te_eval is not None:
        notes.append(_evaluate_memory(v.sections["evaluate"], v.sections["negatives"], te_eval, W or 0, exact or 0,
                                      vocab, out.L, out.T))
    _generate_rows(out, v.sections["generate"])
    out.rows += _stepwise_rows(ds, v.sections["stepwise"], sizes, out.p, out.T, out.te)
    return out.rows, notes


def _lm_rows(out: _Rows, lms: dict[str, Any]) -> None:
    """Causal LMs: training (none for a pretrained LM used as is) and the validations."""
    T, tr, va, te, sizes = out.T, out.tr, out.va, out.te, out.sizes
    for variant in LM_VARIANTS:
        cfg = lms[variant]
        if cfg is None:
            continue  # not applicable: its stage writes a record in seconds
        o = cfg.optim
        seqs = o.batch_size * o.max_steps
        stage = stage_name(variant)
        model, size = plan_name(variant), sizes[variant]
        if variant == "ralm":
            base_fwd = _mul(2, sizes["base"].flop, seqs * T)
            out.row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,}", "RALM phi", sizes["ralm_phi"], seqs,
                    seqs * T, "train", f"+ 2·N_base·tokens for the frozen base; {_epochs(seqs, tr)}".rstrip("; "),
                    extra_flops=base_fwd)
        elif o.max_steps:  # 0: a pretrained LM used as is
            out.row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,}", model, size, seqs, seqs * T, "train",
                    _epochs(seqs, tr))
        vseqs = _add(_mul(_evals(o), va), va, te)
        out.row(stage, f"validation x{_evals(o)} + final valid/test", model, size, vseqs, _mul(vseqs, T), "forward")


def _negatives_rows(out: _Rows, neg: C.NegativesConfig, w: dict[str, int]) -> None:
    for split, n in neg.samples.get(out.ds, {}).items():
        wins = w.get(split)
        seqs, new, prefix = _mul(wins, n), _mul(wins, n, out.L), _mul(wins, out.p)
        out.sample("negatives", f"sample {split} (n={n:,})", seqs, new, prefix,
                   f"new tokens = windows x n x (T-p); + {_fmt(prefix)} prefix tokens" if prefix is not None else "")


def _mlm_rows(out: _Rows, mlm: C.PretrainMLMConfig) -> None:
    """Masked-LM pretraining of BIT."""
    o, T = mlm.optim, out.T
    seqs = o.batch_size * o.max_steps
    out.row("pretrain_mlm", f"train {o.max_steps:,} steps x {o.batch_size:,}", "BIT masked LM", out.sizes["mlm"],
            seqs, seqs * T, "train", _epochs(seqs, out.tr))
    vseqs = _mul(_evals(o), out.va)
    out.row("pretrain_mlm", f"validation x{_evals(o)}", "BIT masked LM", out.sizes["mlm"], vseqs, _mul(vseqs, T),
            "forward")


def _energy_rows(out: _Rows, ebm: C.TrainEBMConfig) -> None:
    T, va = out.T, out.va
    for variant in ENERGY_VARIANTS:
        cfg = getattr(ebm, variant)
        if cfg is None:
            continue
        o = cfg.optim
        stage, name, size = stage_name(variant), plan_name(variant), out.sizes[variant]
        seqs = 2 * o.batch_size * o.max_steps
        out.row(stage, f"train {o.max_steps:,} steps x {o.batch_size:,} pairs", name, size, seqs, seqs * T, "train",
                f"real + LM sample per window; {_epochs(o.batch_size * o.max_steps, out.tr)}".rstrip("; "))
        valid_windows = None if va is None else min(va, cfg.eval_windows or va)
        vseqs = _mul(_evals(o) + 1, 2, valid_windows)
        out.row(stage, f"validation x{_evals(o)} + final", name, size, vseqs, _mul(vseqs, T), "forward")


def _evaluate_rows(out: _Rows, ev: C.EvaluateConfig, vocab: int | None) -> tuple[int | None, int | None, int | None]:
    """Evaluate's rows; the test windows it scores, the Fig. 1 windows and their exact last positions."""
    ds, p, T, L, te, sizes = out.ds, out.p, out.T, out.L, out.te, out.sizes
    n_draw = ev.log_z_samples
    te_eval = None if te is None else min(ev.windows, te) if ev.windows else te  # evaluate.windows
    W = None if te_eval is None else min(ev.positions.windows, te_eval) if ev.positions.energies else 0
    exact = None if W is None else min(ev.positions.exact_last_for(ds), W)
    s = ev.positions.samples
    for lm in ev.lms:
        out.row("evaluate", f"LM log-probs {lm}", plan_name(lm), sizes[lm], te_eval, _mul(te_eval, T), "forward")
    cap = "; at most: a futile draw stops at a look" if ev.convergence.stop_khat is not None else ""
    prefix = _mul(te_eval, p)
    out.sample("evaluate", f"log Z samples (n={n_draw:,} per prefix)", _mul(te_eval, n_draw), _mul(te_eval, n_draw, L),
               prefix, (f"+ {_fmt(prefix)} prefix tokens" if prefix is not None else "") + cap)
    if W:
        prefix = _mul(W, L * p + L * (L - 1) // 2)
        out.sample("evaluate", f"Fig. 1 completions ({W} windows x {L} positions x {s:,})", _mul(W, L, s),
                   _mul(W, s, L * (L + 1) // 2), prefix, f"+ {_fmt(prefix)} prefix tokens")
        out.row("evaluate", f"Fig. 1 exact last position ({exact} windows)", BASE, sizes["base"], exact,
                _mul(exact, T - 1), "forward")
    for energy in ev.energies:
        n_eval = ev.n_eval[energy]
        seqs = _mul(te_eval, _add(1, n_eval))
        part = f"energies {energy}: real + {_fmt(n_eval)} samples/prefix"
        if energy in ev.positions.energies and W:
            seqs = _add(seqs, W * L * s, _mul(exact, vocab))
            part += " + Fig. 1"
        out.row("evaluate", part, plan_name(energy), sizes[energy], seqs, _mul(seqs, T), "forward")
    return te_eval, W, exact


def _generate_rows(out: _Rows, gen: C.GenerateConfig) -> None:
    T, te, sizes = out.T, out.te, out.sizes
    Wg = None if te is None else min(gen.windows, te) if gen.windows else te
    out.row("generate", "gold log-probs", BASE, sizes["base"], Wg, _mul(Wg, T), "forward")
    prefix = _mul(Wg, out.p)
    out.sample("generate", f"top-{gen.top_k} samples (n={gen.n_gen:,})", _mul(Wg, gen.n_gen),
               _mul(Wg, gen.n_gen, out.L), prefix, f"+ {_fmt(prefix)} prefix tokens" if prefix is not None else "")
    seqs = _mul(Wg, gen.n_gen + 1)
    out.row("generate", f"energies {gen.energy}: gold + samples", plan_name(gen.energy), sizes[gen.energy], seqs,
            _mul(seqs, T), "forward")


def _stepwise_rows(ds: str, sw: C.StepwiseConfig, sizes: dict[str, ModelSize], p: int, T: int,
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
        Row(ds, "stepwise", f"context samples: {_fmt(W)} prefixes, top-{sw.lm_top_k}", BASE, base.flop, W,
            _mul(W, L), _mul(2, base.flop, _mul(W, T)), FORMULAS["sample"], ""),
        Row(ds, "stepwise", f"{contexts} contexts x top-{sw.candidates} x n={sw.samples:,} completions", BASE,
            base.flop, seqs, new, _mul(2, base.flop, new + prefix), FORMULAS["sample"],
            f"+ {_fmt(prefix)} context tokens"),
        Row(ds, "stepwise", f"energies {sw.energy}: every completion", plan_name(sw.energy), sizes[sw.energy].flop,
            seqs, seqs * T, _mul(2, sizes[sw.energy].flop, seqs * T), FORMULAS["forward"], ""),
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

