"""`rebm plan`'s model sizes: N of the FLOP formulas for every model of the pipeline.

N counts the parameters that multiply every token: all parameters minus embedding lookups, plus
a tied output projection. Sizes come from the architecture in the params (instantiated on the
`meta` device: no memory), or for a pretrained `init` from a local directory / the offline HF
cache (`ModelResolver`); anything else is reported as unknown, never guessed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import config as C
from pipeline.core.errors import RebmError
from pipeline.core.variants import PRETRAINED_ENERGIES
from pipeline.tools.plan_validate import Validated


@dataclass
class ModelSize:
    total: int | None  # distinct parameters (tied weights once), as count_parameters reports
    flop: int | None  # N of the FLOP formulas
    source: str

    @property
    def known(self) -> bool:
        return self.flop is not None


def unknown(reason: str) -> ModelSize:
    return ModelSize(None, None, f"unknown: {reason}")


def _sizes(model: Any, source: str, extra: int = 0) -> ModelSize:
    """Total and per-token (matmul) parameter counts of a model built on the meta device."""
    import torch

    from pipeline.models.lm import count_parameters

    seen: set[int] = set()
    lookups = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            lookups += module.weight.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head.weight.numel() if head is not None and id(head.weight) in seen else 0
    total = count_parameters(model)
    return ModelSize(total + extra, total - lookups + tied + extra, source)


def _on_meta(build: Any) -> Any:
    import torch

    with torch.device("meta"):
        return build()


class ModelResolver:
    """Configs of pretrained models by name: --model-config overrides, `package:`, a directory, the HF cache."""

    def __init__(self, overrides: dict[str, Path] | None = None):
        self.overrides = {k: Path(p) for k, p in (overrides or {}).items()}
        self._configs: dict[str, tuple[Any | None, str]] = {}  # sizes and shapes of every dataset ask again

    def config(self, name: str) -> tuple[Any | None, str]:
        if name not in self._configs:
            self._configs[name] = self._read_config(name)
        return self._configs[name]

    def _read_config(self, name: str) -> tuple[Any | None, str]:
        from transformers import AutoConfig

        from pipeline.models.sources import cached_model_source, is_cached_source, resolve_model_source

        where = None
        if name in self.overrides:
            where = self.overrides[name]
            where = where.parent if where.is_file() else where
            label = f"--model-config {name}={self.overrides[name]}"
        elif is_cached_source(name) and cached_model_source(name) is None:  # planning never fetches nor builds
            return None, (f"'{name}' is not in the model cache yet "
                          "(its first use fetches or builds it; or --model-config)")
        else:
            try:
                local = Path(cached_model_source(name) if is_cached_source(name) else resolve_model_source(name))
            except RebmError as exc:
                return None, str(exc)
            if (local / "config.json").exists():
                where, label = local, f"{local}/config.json"
        if where is not None:
            try:
                return AutoConfig.from_pretrained(str(where), local_files_only=True), label
            except (OSError, ValueError) as exc:
                return None, f"cannot read the config in {where}: {exc}"
        try:  # a hub id: only what is already in the local HF cache, never the network
            return AutoConfig.from_pretrained(name, local_files_only=True), f"'{name}' config in the local HF cache"
        except (OSError, ValueError):
            return None, (f"'{name}' has no local config (not a directory, not in the HF cache; "
                          f"pass --model-config {name}=DIR)")

    def vocab_size(self, name: str) -> tuple[int | None, str]:
        """Size of a pretrained tokenizer (directory or cached hub id)."""
        from transformers import AutoTokenizer

        from pipeline.models.sources import cached_model_source, is_cached_source

        local = cached_model_source(name) if is_cached_source(name) else name  # planning never fetches nor builds
        if local is None:
            return None, f"tokenizer '{name}' is not in the model cache yet (its first use fetches or builds it)"
        try:
            tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError):
            return None, f"tokenizer '{name}' not available offline"
        return len(tok), f"tokenizer '{name}' (local)"


@dataclass
class _Tokenizer:
    """Just what build_mlm reads from a tokenizer: its length and pad id."""

    size: int

    def __len__(self) -> int:
        return self.size

    @property
    def pad_token_id(self) -> int:
        return self.size - 2


def model_sizes(v: Validated, vocab: int | None, resolver: ModelResolver) -> tuple[dict[str, ModelSize], int | None]:
    """N for every model of the pipeline given the LM vocabulary size (None: unknown), and the LM's vocabulary.

    A pretrained base LM (`train_lm.base.init`) brings its own vocabulary, which then wins.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from pipeline.models.lm import build_gpt2, gpt2_config
    from pipeline.models.mlm import build_mlm

    tok = v.sections["tokenize"]
    lms, ebm = v.sections["train_lm"], v.sections["train_ebm"]
    bit_arch = v.sections["energy"]["bit"]
    out: dict[str, ModelSize] = {}
    no_vocab = "the LM vocabulary size is unknown"

    def plain_lm(cfg: C.LMVariantConfig, key: str) -> tuple[ModelSize, Any]:
        if cfg.init is not None:
            config, label = resolver.config(cfg.init)
            if config is None:
                return unknown(label), None
            model = _on_meta(lambda: AutoModelForCausalLM.from_config(config))
            return _sizes(model, label), config
        if vocab is None:
            return unknown(no_vocab), None
        config = gpt2_config(cfg.arch, vocab, 0)
        return _sizes(_on_meta(lambda: build_gpt2(cfg.arch, vocab, 0)), f"train_lm.{key}.arch (meta device)"), config

    out["base"], base_config = plain_lm(lms["base"], "base")
    if lms["balm"] is not None:
        out["balm"], _ = plain_lm(lms["balm"], "balm")
    lm_vocab = base_config.vocab_size if base_config is not None else vocab
    # A variant null in params (not applicable to this run) gets no size: each block runs only for a set one.
    if lms["ralm"] is not None:
        arch = lms["ralm"].arch
        out["ralm_phi"] = (unknown(no_vocab) if lm_vocab is None else _sizes(
            _on_meta(lambda: build_gpt2(arch, lm_vocab, 0)), "train_lm.ralm.arch (meta device)"))
    # UNIT: the base LM's body (no LM head) + a d -> 1 projection.
    if ebm.unit is not None and base_config is None:
        out["unit"] = unknown(out["base"].source.removeprefix("unknown: "))
    elif ebm.unit is not None:
        body = _on_meta(lambda: AutoModel.from_config(base_config))
        out["unit"] = _sizes(body, "the base LM's body + scalar head", extra=body.config.hidden_size + 1)
    # pretrain_mlm: a BERT masked LM over the LM's tokens + [pad] + [mask]; BIT is its encoder + head.
    if ebm.bit is not None and lm_vocab is None:
        out["mlm"] = out["bit"] = unknown(no_vocab)
    elif ebm.bit is not None:
        mlm = _on_meta(lambda: build_mlm(bit_arch, _Tokenizer(lm_vocab + 2), tok.seq_len))
        out["mlm"] = _sizes(mlm, "energy.bit as a masked LM (meta device)")
        body = _on_meta(lambda: AutoModel.from_config(mlm.config))
        out["bit"] = _sizes(body, "energy.bit encoder + scalar head (meta device)", extra=bit_arch.d_model + 1)
    for variant in PRETRAINED_ENERGIES:
        if getattr(ebm, variant) is None:
            continue
        config, label = resolver.config(getattr(ebm, variant).init)
        if config is None:
            out[variant] = unknown(label)
        else:
            body = _on_meta(functools.partial(AutoModel.from_config, config))
            out[variant] = _sizes(body, f"{label} + scalar head", extra=config.hidden_size + 1)
    if "ralm_phi" in out:
        out["ralm"] = _sum(out["base"], out["ralm_phi"], "base + phi")
    return out, lm_vocab


def _sum(a: ModelSize, b: ModelSize, source: str) -> ModelSize:
    if not (a.known and b.known):
        return unknown(a.source if not a.known else b.source)
    return ModelSize(a.total + b.total, a.flop + b.flop, source)

