"""The causal LMs of Table 1: the base LM, BALM, and the residual baseline RALM (Eq. 6).

BASE LM and BALM are plain GPT-2-style causal LMs (`GPT2LMHeadModel`) trained from scratch,
or any HF causal LM loaded from an id or directory. RALM is

    log P_RALM(x_t | x_<t) = log P_LM(x_t | x_<t) + log P_phi(x_t | x_<t) + const

implemented as one softmax over `logits_base + logits_phi`, with the base frozen. Because
log_softmax(a + b) = log_softmax(a) + log_softmax(b) - logsumexp(...), that is exactly Eq. 6
with the constant being the per-position normaliser. `ResidualLM` is a `PreTrainedModel`
registered with the Auto classes, so `load_lm(dir)` (or `AutoModelForCausalLM.from_pretrained`
after importing this module) restores the combined model offline.

A saved RALM holds only what it adds: the composite config, phi in `residual/`, and the base
LM's path (relative to the RALM directory) with the sha256 of its weights. Loading reads the
base from there and refuses one whose weights changed, so a paper-scale RALM does not carry a
second copy of GPT-2's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutput

from pipeline.core.config import CausalLMArch, EncoderArch
from pipeline.core.errors import RebmError
from pipeline.core.io import file_digest


# --------------------------------------------------------------------------- plain causal LMs
def gpt2_config(arch: CausalLMArch, vocab_size: int, eos_id: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=arch.n_positions,
        n_embd=arch.d_model,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        n_inner=arch.d_ff,
        resid_pdrop=arch.dropout,
        embd_pdrop=arch.dropout,
        attn_pdrop=arch.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def build_gpt2(arch: CausalLMArch, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2-style LM (seed torch before calling for reproducibility)."""
    model = GPT2LMHeadModel(gpt2_config(arch, vocab_size, eos_id))
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, without the warning
    return model


def load_lm(
    name_or_path: str | Path, device: str | torch.device = "cpu", *, dtype: str | None = None, where: str | None = None
) -> PreTrainedModel:
    """Any HF causal LM in eval mode on `device`: a saved variant (base, balm, ralm), a local
    directory or a hub id (offline if its files are local). `dtype` ("float32", "bfloat16")
    casts the weights; `where` (a params key) leads the error when it cannot be loaded."""
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise RebmError(f"{where or name_or_path}: cannot load causal LM '{name_or_path}': {exc}") from exc
    return model.to(device).eval()


def context_length(config: PreTrainedConfig) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_context(model: PreTrainedModel, seq_len: int, where: str) -> None:
    ctx = context_length(model.config)
    if ctx is not None and ctx < seq_len:
        raise RebmError(f"{where}: the model's context ({ctx} positions) is shorter than tokenize.seq_len={seq_len}")


def check_same_tokenizer(
    windows_tokenizer: PreTrainedTokenizerBase, model_tokenizer: PreTrainedTokenizerBase, where: str, windows_dir: Path
) -> None:
    """Fail unless the windows were cut with the model's tokenizer (same vocabulary and ids)."""
    if windows_tokenizer.get_vocab() != model_tokenizer.get_vocab():
        raise RebmError(
            f"{where}: the model's tokenizer ({len(model_tokenizer)} tokens) differs from the one the windows "
            f"in {windows_dir} were cut with ({len(windows_tokenizer)} tokens); set tokenize.pretrained to the "
            "same model and rerun the tokenize stage"
        )


def load_tokenizer(path: str | Path, where: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise RebmError(f"{where}: cannot load tokenizer '{path}': {exc}") from exc


# --------------------------------------------------------------------------- parameter counts
def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_causal_lm_parameters(config: PreTrainedConfig) -> int:
    """Parameter count of a causal LM built from `config`, without allocating it (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def bit_config(arch: EncoderArch, vocab_size: int, seq_len: int, pad_id: int) -> RobertaConfig:
    """The RoBERTa-style bidirectional energy body of `energy.bit` (reused by the energy stages)."""
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.d_model,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        intermediate_size=arch.d_ff,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        max_position_embeddings=seq_len + 2,  # RoBERTa offsets positions by padding_idx + 1
        type_vocab_size=1,
        pad_token_id=pad_id,
    )


def bit_energy_parameters(arch: EncoderArch, vocab_size: int, seq_len: int, pad_id: int) -> int:
    """Parameters of the BIT energy network: the encoder plus the mean-pool -> scalar projection."""
    with torch.device("meta"):
        body = RobertaModel(bit_config(arch, vocab_size, seq_len, pad_id), add_pooling_layer=False)
    return count_parameters(body) + arch.d_model + 1


# --------------------------------------------------------------------------- RALM
class ResidualLMConfig(PreTrainedConfig):
    """Two causal LM configs: the frozen `base` and the trainable residual `residual` (phi)."""

    model_type = "residual_lm"
    sub_configs_defaults = {
        "base": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
        "residual": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    base: PreTrainedConfig | dict | None = None
    residual: PreTrainedConfig | dict | None = None
    tie_word_embeddings: bool = False  # nothing is shared between the two parts
    # Where the frozen base LM lives (absolute until saved, then relative to the RALM directory)
    # and the sha256 of its model.safetensors; None for a RALM saved whole.
    base_path: str | None = None
    base_sha256: str | None = None


class ResidualLM(PreTrainedModel):
    """RALM: `logits = logits_base + logits_phi`, one softmax, base frozen (never trained, always eval)."""

    config_class = ResidualLMConfig
    config: ResidualLMConfig
    base_model_prefix = "residual_lm"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: ResidualLMConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # one cross-entropy over the combined logits
        self.base = AutoModelForCausalLM.from_config(config.base)
        self.residual = AutoModelForCausalLM.from_config(config.residual)
        self.base.requires_grad_(False)
        self.base.eval()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> ResidualLM:
        directory = Path(pretrained_model_name_or_path)
        config = kwargs.pop("config", None)
        if not isinstance(config, ResidualLMConfig):
            config = ResidualLMConfig.from_pretrained(directory)
        if config.base_path is None:  # saved whole (base weights inside)
            model = super().from_pretrained(directory, *args, config=config, **kwargs)
            model.base.requires_grad_(False)  # loading materialises fresh parameters
            return model
        base_dir = (directory / config.base_path).resolve()
        weights = base_dir / "model.safetensors"
        if not weights.exists():
            raise RebmError(f"{directory}: RALM's base LM {base_dir} (base_path '{config.base_path}') is missing")
        actual = None if config.base_sha256 is None else file_digest(weights)
        if actual is not None and actual != config.base_sha256:
            raise RebmError(f"{directory}: the base LM at {base_dir} is not the one RALM was trained on "
                            f"(sha256 {actual[:12]}…, expected {config.base_sha256[:12]}…); "
                            "retrain RALM: rebm train-lm <dataset> ralm")
        dtype = {"dtype": kwargs["dtype"]} if "dtype" in kwargs else {}
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), **dtype)
        residual = AutoModelForCausalLM.from_pretrained(str(directory / "residual"), **dtype)
        return cls.from_parts(base, residual, base_dir=base_dir, base_sha256=config.base_sha256)

    @classmethod
    def from_parts(
        cls, base: PreTrainedModel, residual: PreTrainedModel, *, base_dir: Path | None = None,
        base_sha256: str | None = None,
    ) -> ResidualLM:
        """RALM from a base LM and phi. With `base_dir`, a save keeps phi only and points at it."""
        if base.config.vocab_size != residual.config.vocab_size:
            raise RebmError(
                f"RALM: the residual LM's vocabulary ({residual.config.vocab_size}) must equal the base LM's "
                f"({base.config.vocab_size})"
            )
        # Fresh sub-configs (not the parts' own objects, which the composite would re-dispatch),
        # then the parts' weights.
        model = cls(ResidualLMConfig(
            base=base.config.to_dict(), residual=residual.config.to_dict(),
            base_path=None if base_dir is None else str(Path(base_dir).resolve()), base_sha256=base_sha256,
        ))
        model.base.load_state_dict(base.state_dict())
        model.residual.load_state_dict(residual.state_dict())
        return model.to(base.dtype)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Phi and the composite config only when the base has a home (`base_path`); else whole."""
        if self.config.base_path is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        base_dir = (directory / self.config.base_path).resolve()  # absolute, or relative to an earlier save
        self.residual.save_pretrained(directory / "residual", *args, **kwargs)
        config = self.config.to_dict()
        config["base_path"] = os.path.relpath(base_dir, directory.resolve())
        ResidualLMConfig.from_dict(config).save_pretrained(directory)
        return None

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # both parts initialise (or load) themselves

    def train(self, mode: bool = True) -> ResidualLM:
        super().train(mode)
        self.base.eval()  # frozen: no dropout, so the base term is the base LM's exact distribution
        return self

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.residual.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutput:
        with torch.no_grad():
            base = self.base(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits
        residual = self.residual(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        logits = base.float() + residual.logits.float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutput(loss=loss, logits=logits)


def zero_init_output(lm: PreTrainedModel) -> None:
    """Make a GPT-2 LM output all-zero logits (final layer-norm gain and bias 0); it still learns."""
    ln_f = getattr(getattr(lm, "transformer", None), "ln_f", None)
    if ln_f is None:
        raise RebmError("train_lm.ralm.zero_init: only supported for GPT-2-style residual LMs")
    with torch.no_grad():
        ln_f.weight.zero_()
        ln_f.bias.zero_()


AutoConfig.register("residual_lm", ResidualLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ResidualLMConfig, ResidualLM, exist_ok=True)
