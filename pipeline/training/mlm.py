"""Masked-LM pretraining of the BIT energy's encoder (stage `pretrain_mlm`), RoBERTa-style:
dynamic 80/10/10 masking, MLM loss only, on the train windows' LM token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from pipeline.core.config import PretrainMLMConfig
from pipeline.training.loop import ShuffledBatches, TrainResult
from pipeline.training.trainer import train


def masking_collator(tokenizer: PreTrainedTokenizerBase, mlm_probability: float) -> DataCollatorForLanguageModeling:
    """BERT's 80/10/10 dynamic masking; masks are drawn from torch's global RNG, which the
    training loop checkpoints, so a resumed run masks exactly as an uninterrupted one."""
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, return_tensors="pt")


def pretrain_mlm(
    model: BertForMaskedLM,
    tokenizer: PreTrainedTokenizerBase,
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    cfg: PretrainMLMConfig,
    *,
    seed: int,
    checkpoint_dir: Path,
    device: torch.device,
    fingerprint: str,
    desc: str,
) -> TrainResult:
    """Masked-LM training on windows of LM token ids; validation masks with a fixed seed."""
    collator = masking_collator(tokenizer, cfg.mlm_probability)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def masked(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, special))
        return inputs.to(device), labels.to(device)

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        inputs, labels = masked(batch)
        return model(input_ids=inputs, labels=labels).loss, batch.numel()

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[]):  # the same masks every validation, training RNG untouched
            torch.manual_seed(seed)
            for start in range(0, len(valid_ids), cfg.optim.eval_batch_size):
                inputs, labels = masked(valid_ids[start : start + cfg.optim.eval_batch_size])
                n = int((labels != -100).sum())
                total += model(input_ids=inputs, labels=labels).loss.item() * n
                count += n
        return total / max(count, 1)

    return train(
        model,
        loss_fn,
        lambda epoch: ShuffledBatches(train_ids, cfg.optim.batch_size, seed, epoch),
        evaluate,
        cfg.optim,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
        device=device,
        fingerprint=fingerprint,
        desc=desc,
    )
