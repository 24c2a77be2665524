"""The bidirectional body of the BIT energy, pretrained as a masked LM on our own train split.

The paper's BIT rows start from RoBERTa; offline we pretrain the same kind of encoder on the
train windows first (stage `pretrain_mlm`, `pipeline.training.mlm`), because a from-scratch BIT trained by NCE alone
never leaves chance (docs/design.md). The encoder reuses the LM's token ids and adds two special
tokens — padding and mask — after them, so an LM window feeds it id for id.

It is a BERT-architecture encoder trained RoBERTa-style (dynamic masking, MLM only): BERT's
absolute position ids start at 0 whatever the padding id, whereas RoBERTa offsets positions
by the padding id, which would need ~vocab-size position embeddings with a padding id
placed after the LM's vocabulary.
"""

from __future__ import annotations

import copy

from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerBase

from pipeline.core.config import EncoderArch

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
