"""The residual energy E_θ(x_{1:T}) and its conditional NCE loss (paper §3, Eq. 3).

An energy model is a transformer body (causal for UNIT, bidirectional for BIT), a mean
pool of its top hidden states over real tokens, and a linear map to one scalar. Real text
should get LOW energy: the joint model is P_LM(x) · exp(−E(x)) / Z.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.core.errors import RebmError


class EnergyConfig(PretrainedConfig):
    model_type = "residual_energy"

    def __init__(self, body: dict[str, Any] | None = None, architecture: str = "bit", keep_layout: bool = True,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.body = body or {}
        self.architecture = architecture  # "unit" (causal body) or "bit" (bidirectional body)
        self.keep_layout = keep_layout  # text input only: line breaks kept as markers (WhitespaceMarkers)


class EnergyModel(PreTrainedModel):
    """E(x) = w · mean_{t: mask_t=1} h_t + b, with h the body's top hidden states."""

    config_class = EnergyConfig
    base_model_prefix = "energy"
    _supports_sdpa = True

    def __init__(self, config: EnergyConfig, body: PreTrainedModel | None = None):
        super().__init__(config)
        if body is None:
            body = AutoModel.from_config(_body_config(config.body))
        if getattr(body, "pooler", None) is not None:
            body.pooler = None  # BERT/RoBERTa's [CLS] pooler is unused: the energy mean-pools
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The body arrives initialised (pretrained or from its own config); only the head is new.
        if module is getattr(self, "head", None):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_body(cls, body: PreTrainedModel, architecture: str, keep_layout: bool = True) -> EnergyModel:
        """Wrap an initialised body (a base LM's transformer, an MLM's encoder, MiniLM …)."""
        config = EnergyConfig(body=body.config.to_dict(), architecture=architecture, keep_layout=keep_layout)
        return cls(config, body=body)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        # The scalar head runs in fp32 even under bf16 autocast: a bf16 energy has ~3 significant
        # digits (steps of 0.03 at |E| ≈ 5), too coarse for log Z and perplexity bounds.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float()).squeeze(-1)


def _body_config(body: dict[str, Any]) -> PretrainedConfig:
    body = dict(body)
    model_type = body.pop("model_type", None)
    if model_type is None:
        raise RebmError("energy config has no body.model_type: the checkpoint is not an EnergyModel")
    return AutoConfig.for_model(model_type, **body)


AutoConfig.register(EnergyConfig.model_type, EnergyConfig, exist_ok=True)
AutoModel.register(EnergyConfig, EnergyModel, exist_ok=True)


def nce_loss(energy_real: torch.Tensor, energy_lm: torch.Tensor) -> torch.Tensor:
    """Conditional NCE with the LM as noise (Eq. 3): −log σ(−E(x⁺)) − log σ(E(x⁻)), averaged.

    logsigmoid is exact for large |E| where log(sigmoid(·) + eps) saturates.
    """
    return -(F.logsigmoid(-energy_real) + F.logsigmoid(energy_lm)).mean()


def nce_accuracy(energy_real: torch.Tensor, energy_lm: torch.Tensor) -> torch.Tensor:
    """Share of correct real-vs-LM decisions by the NCE classifier σ(−E) > 1/2, both classes."""
    return torch.cat([(energy_real < 0), (energy_lm > 0)]).float().mean()


class EnergyScorer:
    """Scores LM token windows with an energy model, bridging tokenizers when they differ.

    When the energy body's tokenizer is the LM's (same ids for every LM token) windows go in
    as ids; otherwise they are detokenised and re-encoded (the BIT* rows, e.g. MiniLM), with
    line breaks and the end-of-document token mapped to markers the body's tokenizer keeps
    (`WhitespaceMarkers`), so that two windows differing only in layout score differently.
    """

    def __init__(self, model: EnergyModel, tokenizer: PreTrainedTokenizerBase, lm_tokenizer: PreTrainedTokenizerBase,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.lm_tokenizer = lm_tokenizer
        self.shares_vocab = same_token_ids(lm_tokenizer, tokenizer)
        self.markers = None if self.shares_vocab else WhitespaceMarkers.for_energy(model.config, tokenizer)
        limit = getattr(model.body.config, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or limit, limit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def texts(self, lm_ids: torch.Tensor | list[list[int]]) -> list[str]:
        """The energy body's input text for each LM window (only when the vocabularies differ)."""
        ids = lm_ids.tolist() if isinstance(lm_ids, torch.Tensor) else lm_ids
        texts = self.lm_tokenizer.batch_decode(ids, skip_special_tokens=False)
        return [self.markers.apply(t, self.lm_tokenizer.eos_token) for t in texts]

    def input_ids(self, lm_ids: torch.Tensor | list[list[int]]) -> list[list[int]]:
        """The body's token ids for each LM window, unpadded (text input only: what `pad` batches)."""
        return self.tokenizer(self.texts(lm_ids), truncation=True, max_length=self.max_length,
                              return_token_type_ids=False)["input_ids"]

    def pad(self, input_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """A batch of body token ids padded by the body's tokenizer, with its mask, on the model's device."""
        batch = self.tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}

    def encode(self, lm_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shares_vocab:
            return {"input_ids": lm_ids.to(self.device), "attention_mask": torch.ones_like(lm_ids, device=self.device)}
        return self.pad(self.input_ids(lm_ids))

    def __call__(self, lm_ids: torch.Tensor) -> torch.Tensor:
        return self.model(**self.encode(lm_ids))


class WhitespaceMarkers:
    """What line breaks and the LM's end-of-document token become in an energy body's input text.

    An uncased WordPiece tokenizer (MiniLM, BERT) treats "\\n" as a space, so "it,.\\n\\n\\nThe"
    and "it,. The" would get the same energy, and Algorithm 1 could not see layout at all (it then
    preferred newline-heavy samples). A body tokenizer that keeps line breaks (byte-level BPE:
    RoBERTa, GPT-2) gets them unchanged. The end of a document becomes the body's separator token.
    """

    NEWLINE_CANDIDATES = ("\u00b6", "|")  # pilcrow first: in BERT's uncased vocabulary, rare in prose

    def __init__(self, newline: str, end_of_document: str):
        self.newline = newline
        self.end_of_document = end_of_document

    @classmethod
    def for_energy(cls, config: EnergyConfig, tokenizer: PreTrainedTokenizerBase) -> WhitespaceMarkers:
        """The markers an energy model was trained with: its config says whether layout is kept."""
        return cls.for_tokenizer(tokenizer) if config.keep_layout else cls.dropped()

    @classmethod
    def dropped(cls) -> WhitespaceMarkers:
        """The earlier input: line breaks as they are, end of document as a line break (which an
        uncased WordPiece tokenizer then drops). Kept to measure what keeping the layout changes."""
        return cls("\n", "\n")

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> WhitespaceMarkers:
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        newline = "\n"
        if ids("a\nb") == ids("a b"):
            usable = [m for m in cls.NEWLINE_CANDIDATES
                      if len(ids(m)) == 1 and ids(m)[0] != tokenizer.unk_token_id]
            if not usable:
                raise RebmError(f"{tokenizer.name_or_path}: the energy tokenizer drops line breaks and encodes none of "
                                f"{cls.NEWLINE_CANDIDATES} as one known token; no marker to keep them")
            newline = f" {usable[0]} "
        end = tokenizer.sep_token or tokenizer.eos_token
        return cls(newline, f" {end} " if end else newline + newline)

    def apply(self, text: str, lm_end_of_document: str | None) -> str:
        if lm_end_of_document:
            text = text.replace(lm_end_of_document, "\0")  # the LM's token may itself contain a newline
        return text.replace("\n", self.newline).replace("\0", self.end_of_document)

    def as_dict(self) -> dict[str, str]:
        return {"newline": self.newline, "end_of_document": self.end_of_document}


def input_markers(energy_dir: str | Path, lm_tokenizer_dir: str | Path) -> dict[str, str] | None:
    """What a saved energy's scorer turns line breaks and end-of-document into (None: ids in)."""
    tokenizer = AutoTokenizer.from_pretrained(energy_dir)
    if same_token_ids(AutoTokenizer.from_pretrained(lm_tokenizer_dir), tokenizer):
        return None
    return WhitespaceMarkers.for_energy(EnergyConfig.from_pretrained(energy_dir), tokenizer).as_dict()


def same_token_ids(lm_tokenizer: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when every LM token has the same id in `tokenizer` (it may add e.g. a mask token)."""
    theirs = tokenizer.get_vocab()
    return all(theirs.get(tok) == idx for tok, idx in lm_tokenizer.get_vocab().items())


def load_energy(directory: str | Path) -> tuple[EnergyModel, PreTrainedTokenizerBase]:
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise RebmError(f"{directory}: no trained energy model here (config.json missing)")
    return EnergyModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def resolve_pretrained(name: str) -> str:
    """A local folder for an energy body's `init` (see `pipeline.models.sources.resolve_model_source`)."""
    from pipeline.models.sources import resolve_model_source

    return resolve_model_source(name)
