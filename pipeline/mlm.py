"""The bidirectional body of the BIT energy, pretrained as a masked LM on our own train split.

The paper's BIT rows start from RoBERTa; offline we pretrain the same kind of encoder on the
train windows first (stage `pretrain_mlm`), because a from-scratch BIT trained by NCE alone
never leaves chance (DESIGN.md). The encoder reuses the LM's token ids and adds two special
tokens — padding and mask — after them, so an LM window feeds it id for id.

It is a BERT-architecture encoder trained RoBERTa-style (dynamic masking, MLM only): BERT's
absolute position ids start at 0 whatever the padding id, whereas RoBERTa offsets positions
by the padding id, which would need ~vocab-size position embeddings with a padding id
placed after the LM's vocabulary.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
)

from pipeline.config import EncoderArch, PretrainMLMConfig
from pipeline.training import ShuffledBatches, TrainResult, train

PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"


def mlm_tokenizer(lm_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The LM tokenizer plus distinct padding and mask tokens (ids after the LM's vocabulary)."""
    tok = copy.deepcopy(lm_tokenizer)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN})
    return tok


def build_mlm(arch: EncoderArch, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.d_model,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        intermediate_size=arch.d_ff,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        max_position_embeddings=max_positions,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForMaskedLM(config)


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
