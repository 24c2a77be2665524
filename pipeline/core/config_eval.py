"""The params sections of what the pipeline measures: `evaluate` (Table 1, Figures 1 and 2),
`generate` (Algorithm 1, §4.3) and `stepwise` (Appendix A.1). Re-exported by
`pipeline.core.config`, which loads them."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from pipeline.core.precision import Precision
from pipeline.core.section import Section
from pipeline.core.variants import LM_VARIANTS, EnergyVariant, LMVariant


class PoolSection(Section):
    """What the stages that score on a pool of Ray actors (evaluate, generate, stepwise) share:
    the energies' precision and batch, and the pool (`num_workers: 0` = in this process, no Ray)."""

    precision: Precision = "auto"
    batch_size: int = Field(default=64, gt=0)
    num_workers: int = Field(default=2, ge=0)
    cpus_per_worker: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)  # Ray num_gpus per actor: models on the GPU Ray assigns


class PositionEvalConfig(Section):
    """`evaluate.positions`: per-position perplexity by Eq. 5 (Figure 1).

    Each of `windows` test windows (evenly spaced over Table 1's windows) gets `samples` LM
    continuations from every position t = p+1..T; the last position is also computed exactly
    on the first `exact_last_windows` of them, which costs |V| energy evaluations per window
    (an int for every dataset, or {dataset: count}; a dataset not named gets 0).
    """

    energies: list[EnergyVariant] = Field(default_factory=lambda: ["bit_star"])
    windows: int = Field(default=2, ge=0)
    samples: int = Field(default=64, ge=2)
    exact_last_windows: int | dict[str, Annotated[int, Field(ge=0)]] = 1

    def exact_last_for(self, dataset: str) -> int:
        if isinstance(self.exact_last_windows, int):
            return self.exact_last_windows
        return self.exact_last_windows.get(dataset, 0)

    @model_validator(mode="after")
    def _exact_subset(self) -> PositionEvalConfig:
        counts = ([self.exact_last_windows] if isinstance(self.exact_last_windows, int)
                  else list(self.exact_last_windows.values()))
        if any(c < 0 for c in counts):
            raise ValueError("exact_last_windows: must be ≥ 0")
        if any(c > self.windows for c in counts):
            raise ValueError("exact_last_windows: must not exceed positions.windows (it is a subset of them)")
        return self


class ConvergenceConfig(Section):
    """`evaluate.convergence`: the rule that calls a log Z estimate converged (pipeline/estimation/convergence.py)."""

    epsilon: float = Field(default=0.2, gt=0)  # nats of mean log Z; exp(ε / (T − p)) in per-token perplexity
    min_samples: int = Field(default=256, ge=2)
    # Stop drawing an energy's samples at a look (n = stop_after, 2·stop_after, …) where the mean
    # per-prefix PSIS k̂ is at least stop_khat: no affordable n makes such an estimate reliable
    # (pipeline/estimation/diagnostics.py, `futile_draw`). null: always draw n_eval.
    stop_khat: float | None = Field(default=0.8, gt=0.7)
    stop_after: int = Field(default=1024, ge=64)


class BootstrapConfig(Section):
    """`evaluate.bootstrap` / `generate.bootstrap`: the paired intervals over test documents
    (pipeline/estimation/intervals.py: studentized bootstrap, widened to Student t where wider)."""

    resamples: int = Field(default=2000, ge=100)
    level: float = Field(default=0.95, gt=0, lt=1)


class EvaluateConfig(PoolSection):
    """`evaluate`: Table 1, Figure 1 and Figure 2 (left) on the test windows (stage `evaluate`).

    Everything is computed on `windows` test windows, evenly spaced over the test file (null:
    all of them). log Z of each prefix comes from `n_eval[energy]` full-distribution samples of
    the base LM that this stage draws (one set, nested: an energy with a smaller n uses the
    first n); Figure 2 (left) doubles n from 2 to that n, and `convergence` turns the last
    doubling into a verdict. Energies are scored and the LM samples drawn on `num_workers` Ray
    actors (0: in this process, no Ray), in fixed shards of `shard_sequences`, so results do
    not depend on the worker count.
    """

    lms: list[LMVariant] = Field(default_factory=lambda: list(LM_VARIANTS), min_length=1)
    energies: list[EnergyVariant] = Field(default_factory=lambda: ["unit", "bit", "bit_star"])
    windows: int | None = Field(default=8, gt=0)
    n_eval: dict[EnergyVariant, Annotated[int, Field(ge=2)]] = Field(
        default_factory=lambda: {"unit": 256, "bit": 256, "bit_star": 4096})
    convergence: ConvergenceConfig = Field(default_factory=ConvergenceConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    positions: PositionEvalConfig = Field(default_factory=PositionEvalConfig)
    shard_sequences: int = Field(default=256, gt=0)
    # LM samples per prefix per chunk: samples are drawn, scored and dropped chunk by chunk (each
    # chunk checkpointed), so memory holds per-prefix energies, never every sample's tokens
    stream_samples: int = Field(default=1024, gt=0)

    @model_validator(mode="after")
    def _base_lm_scored(self) -> EvaluateConfig:
        if "base" not in self.lms:
            raise ValueError("lms: must include base (the joint models and the per-position gains are relative to it)")
        missing = [e for e in self.energies if e not in self.n_eval]
        if missing:
            raise ValueError(f"n_eval: no sample count for {missing} (one per entry of evaluate.energies)")
        stray = sorted(set(self.positions.energies) - set(self.energies))
        if stray:
            raise ValueError(f"positions.energies: {stray} not in evaluate.energies")
        return self

    @property
    def log_z_samples(self) -> int:
        """LM samples drawn per test prefix: the largest n any scored energy uses."""
        return max((self.n_eval[e] for e in self.energies), default=0)


# --------------------------------------------------------------------------- generation
class GenerateConfig(PoolSection):
    """`generate`: Algorithm 1 on the test prefixes, and the analyses of §4.3 (stage `generate`).

    For each of `windows` test prefixes (evenly spaced; null = all) the base LM draws `n_gen`
    top-k samples (paper: k = 10, 10,000 samples); the joint sample is one of them resampled
    with probability softmax(−E) under `energy`. Sampling and scoring run on `num_workers`
    Ray actors (0: in this process), in fixed shards, so results do not depend on the count.
    """

    energy: EnergyVariant = "bit_star"
    n_gen: int = Field(default=32, ge=2)
    top_k: int = Field(default=10, ge=0)
    windows: int | None = Field(default=32, gt=0)
    shard_windows: int = Field(default=8, gt=0)
    density_bins: int = Field(default=40, ge=5)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)  # §4.3 claims' paired intervals
    shard_sequences: int = Field(default=256, gt=0)


class StepwiseConvergenceConfig(Section):
    """`stepwise.convergence`: evaluate's rule (pipeline/estimation/convergence.py) on each shown
    candidate's log Z_c. min_samples is lower than evaluate's: n completions per candidate cost
    K × n energies per context."""

    epsilon: float = Field(default=0.2, gt=0)
    min_samples: int = Field(default=32, ge=2)


class StepwiseConfig(PoolSection):
    """`stepwise`: Appendix A.1, the joint factorised token by token (stage `stepwise`).

    `windows` test prefixes (evenly spaced) are each completed by one top-`lm_top_k` LM sample;
    in the first `pairs` samples with a repetition (x_t ends an `ngram`-gram seen earlier in the
    window) that position and the nearest non-repeating one are the contexts. Each gets Eq. 5 over
    the base LM's top `candidates` (K), `samples` (n) completions per candidate, scored by `energy`.
    """

    energy: EnergyVariant = "bit_star"
    windows: int = Field(default=48, gt=0)
    lm_top_k: int = Field(default=10, ge=0)
    ngram: int = Field(default=2, ge=1)
    pairs: int = Field(default=8, ge=2)
    candidates: int = Field(default=12, ge=2)
    samples: int = Field(default=32, ge=2)
    renormalise_top: int = Field(default=10, ge=2)
    show: int = Field(default=5, ge=1)
    examples: int = Field(default=3, ge=1)
    convergence: StepwiseConvergenceConfig = Field(default_factory=StepwiseConvergenceConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)

    @model_validator(mode="after")
    def _fits(self) -> StepwiseConfig:
        if self.renormalise_top > self.candidates:
            raise ValueError(f"renormalise_top ({self.renormalise_top}) exceeds candidates ({self.candidates})")
        if self.show > self.renormalise_top:
            raise ValueError(f"show ({self.show}) exceeds renormalise_top ({self.renormalise_top})")
        return self
