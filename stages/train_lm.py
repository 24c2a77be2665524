"""Stage `train_lm`: the base LM and the paper's two baselines, BALM and RALM.

    base  a GPT-2-style causal LM trained on the train windows (or fine-tuned from `init`)
    balm  the same family, sized like base + the BIT energy network (`energy.bit`)
    ralm  frozen base + a residual causal LM phi, one softmax over the summed logits (Eq. 6)

Writes models/<dataset>/lm/<variant>/ (save_pretrained + tokenizer), <variant>_metrics.json
(parameter counts, continuation perplexity on valid and test) and <variant>_curve.tsv.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import (
    EncoderArch,
    LMVariantConfig,
    RalmConfig,
    TokenizeConfig,
    load_device,
    load_section,
    load_seed,
    load_subsection,
)
from pipeline.distributed import cluster_for, training_device
from pipeline.errors import RebmError
from pipeline.io import file_digest, fingerprint
from pipeline.lm import (
    ResidualLM,
    bit_energy_parameters,
    build_gpt2,
    check_context,
    check_same_tokenizer,
    count_causal_lm_parameters,
    count_parameters,
    gpt2_config,
    load_lm,
    load_pretrained_lm,
    load_tokenizer,
    zero_init_output,
)
from pipeline.paths import DatasetPaths
from pipeline.precision import resolve_precision
from pipeline.perplexity import continuation_nll
from pipeline.tokenization import end_of_document_id, read_window_ids
from pipeline.training import ShuffledBatches, resolve_device, save_trained_run, train

VARIANTS = ("base", "balm", "ralm")


def base_parameter_count(cfg: LMVariantConfig, vocab_size: int, eos_id: int) -> int:
    """Parameters of the model `train_lm.base` describes, without building it."""
    if cfg.init is not None:
        return count_causal_lm_parameters(AutoConfig.from_pretrained(cfg.init))
    return count_causal_lm_parameters(gpt2_config(cfg.arch, vocab_size, eos_id))


def _plain_lm(cfg: LMVariantConfig, variant: str, tokenizer: PreTrainedTokenizerBase, paths: DatasetPaths,
              ) -> PreTrainedModel:
    where = f"train_lm.{variant}.init"
    if cfg.init is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.init, where), where, paths.windows)
        return load_pretrained_lm(cfg.init, where)
    return build_gpt2(cfg.arch, len(tokenizer), end_of_document_id(tokenizer))


def run(dataset: str, variant: str, params: Path, root: Path = Path(".")) -> dict:
    if variant not in VARIANTS:
        raise RebmError(f"unknown LM variant '{variant}' (expected one of: {', '.join(VARIANTS)})")
    started = time.perf_counter()
    paths = DatasetPaths(dataset, root)
    seed = load_seed(params)
    device = resolve_device(load_device(params))
    prefix_len = load_section(TokenizeConfig, "tokenize", params).prefix_len
    splits = {split: read_window_ids(paths.windows_split(split)) for split in ("train", "valid", "test")}
    seq_len = splits["train"].shape[1]
    if not 0 < prefix_len < seq_len:
        raise RebmError(f"tokenize.prefix_len={prefix_len} must be below the windows' length {seq_len} "
                        f"({paths.windows}); rerun the tokenize stage")

    metrics: dict = {"dataset": dataset, "variant": variant, "prefix_len": prefix_len, "seq_len": seq_len}
    torch.manual_seed(seed)
    if variant == "ralm":
        cfg = load_subsection(RalmConfig, "train_lm.ralm", params)
        base_dir = paths.lm("base")
        if not (base_dir / "config.json").exists():
            raise RebmError(f"{base_dir}: base LM not found (train it first: rebm train-lm {dataset} base)")
        tokenizer = load_tokenizer(base_dir, "train_lm.ralm")
        base = load_lm(base_dir)
        phi = build_gpt2(cfg.arch, base.config.vocab_size, end_of_document_id(tokenizer))
        if cfg.zero_init:
            zero_init_output(phi)
        model = ResidualLM.from_parts(base, phi)
        extra_fingerprint = file_digest(base_dir / "model.safetensors")
        metrics |= {
            "parameters_total": count_parameters(model),
            "parameters_trainable": count_parameters(model, trainable_only=True),
            "parameters_base": count_parameters(model.base),
        }
        metrics["parameters"] = metrics["parameters_total"]
    else:
        cfg = load_subsection(LMVariantConfig, f"train_lm.{variant}", params)
        tokenizer = load_tokenizer(paths.tokenizer, f"train_lm.{variant}")
        model = _plain_lm(cfg, variant, tokenizer, paths)
        extra_fingerprint = None
        metrics["parameters"] = count_parameters(model)
        if variant == "balm":
            # BALM has about as many parameters as the joint model: base LM + BIT energy network.
            base_cfg = load_subsection(LMVariantConfig, "train_lm.base", params)
            bit = load_subsection(EncoderArch, "energy.bit", params)
            eos = end_of_document_id(tokenizer)
            metrics["parameters_base"] = base_parameter_count(base_cfg, len(tokenizer), eos)
            metrics["parameters_bit_energy"] = bit_energy_parameters(bit, len(tokenizer), seq_len, eos)
            metrics["parameters_base_plus_bit"] = metrics["parameters_base"] + metrics["parameters_bit_energy"]
            metrics["parameters_ratio_to_base_plus_bit"] = metrics["parameters"] / metrics["parameters_base_plus_bit"]
    check_context(model, seq_len, f"train_lm.{variant}")
    vocab = model.get_output_embeddings().weight.shape[0] if variant != "ralm" else model.config.base.vocab_size
    if int(splits["train"].max()) >= vocab:
        raise RebmError(f"{paths.windows}: token id {int(splits['train'].max())} is outside the model's vocabulary "
                        f"({vocab}); were the windows cut with another tokenizer?")
    model.to(device)
    for key, value in metrics.items():
        if key.startswith("parameters") and isinstance(value, int):
            print(f"{dataset}/{variant}: {key} = {value:,}")

    optim = cfg.optim
    train_device = training_device(optim, device)  # the Ray Train workers' device when optim.workers > 1
    train_ids = torch.from_numpy(splits["train"])
    valid_ids = torch.from_numpy(splits["valid"])

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = batch.to(train_device, non_blocking=True)
        return m(input_ids=batch, labels=batch).loss, batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(m: torch.nn.Module) -> float:
        total, count = continuation_nll(m, valid_ids, prefix_len, optim.eval_batch_size, train_device,
                                        optim.precision)
        return total / count

    with cluster_for(optim):  # a Ray session (RAY_ADDRESS, else local) only above one worker
        result = train(
            model,
            loss_fn,
            lambda epoch: ShuffledBatches(train_ids, optim.batch_size, seed, epoch),
            evaluate,
            optim,
            checkpoint_dir=paths.lm_checkpoint(variant),
            seed=seed,
            device=train_device,
            fingerprint=fingerprint(cfg.model_dump(mode="json"), seed, prefix_len, extra_fingerprint, splits["train"]),
            desc=f"{dataset}/{variant}",
        )

    for split in ("valid", "test"):
        total, count = continuation_nll(model, splits[split], prefix_len, optim.eval_batch_size, device,
                                        optim.precision)
        metrics[f"{split}_nll"] = total / count
        metrics[f"{split}_ppl"] = float(np.exp(total / count))
        metrics[f"{split}_continuation_tokens"] = count
    metrics |= {
        "steps": result.steps,
        "best_step": result.best_step,
        "train_tokens": result.tokens,
        "train_seconds": round(result.train_seconds, 1),
        "train_tokens_per_s": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "resumed_from_step": result.resumed_from,
        "device": str(train_device),
        "workers": optim.workers,
        "precision": resolve_precision(optim.precision, train_device),
    }

    return save_trained_run(
        model, tokenizer, result, metrics,
        model_dir=paths.lm(variant), curve_path=paths.lm_curve(variant), metrics_path=paths.lm_metrics(variant),
        checkpoint_dir=paths.lm_checkpoint(variant), started=started,
    )
