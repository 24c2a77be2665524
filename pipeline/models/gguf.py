"""A model in a GGUF file as a plain fp32 HF folder (`convert_gguf_to_hf`), for `pypi:` wheels
(`pipeline.models.sources`) and local `.gguf` files (`pipeline.models.packaged`) alike."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import RebmError


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       check_tokens: int = 8) -> None:
    """Write the model in a GGUF file as a plain fp32 HF safetensors folder, with its tokenizer.

    transformers dequantizes a GGUF on load but refuses to save the result; a model built
    `from_config` without the quantization config, given the loaded state dict, saves as an
    ordinary checkpoint. The saved folder is reloaded and must give the same logits on
    `check_tokens` tokens as the GGUF load (0 skips the check).
    """
    gguf_path, out = Path(gguf_path), Path(out)
    where = f"converting {gguf_path.name} to an HF folder"
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        config = loaded.config.__class__.from_dict(loaded.config.to_dict())
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.architectures = [type(loaded).__name__]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        out.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out)  # safetensors: the default since transformers 4.35
        tokenizer.save_pretrained(out)
        del plain
        if check_tokens:
            ids = torch.arange(check_tokens).remainder(config.vocab_size).unsqueeze(0)
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (reloaded(ids).logits - loaded(ids).logits).abs().max().item()
            if not diff <= 1e-4:
                raise RebmError(f"{where}: the saved folder's logits differ from the GGUF load's by {diff:.3g}")
    except RebmError:
        raise
    except ImportError as exc:
        raise RebmError(f"{where} failed: {exc} (the GGUF loader needs `pip install gguf accelerate`)") from None
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, RuntimeError ... here
        unsupported = _unsupported_architecture(gguf_path, exc)
        if unsupported:
            raise RebmError(f"{where} failed: {unsupported}") from None
        raise RebmError(f"{where} failed: {type(exc).__name__}: {exc}") from None


def _unsupported_architecture(gguf_path: Path, exc: Exception) -> str | None:
    """A plain message if `exc` is the GGUF loader refusing the file's architecture, else None.

    The loader alone knows which architecture names it maps onto which model (qwen2moe,
    mistral-as-llama, ...), so its refusal is recognised rather than its table re-implemented.
    """
    try:
        import transformers
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        field = GGUFReader(str(gguf_path)).get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception:  # not a readable GGUF: the loader's own error says more
        return None
    if not (isinstance(exc, ValueError) and arch and "not supported" in str(exc) and arch in str(exc)):
        return None
    loads = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))
    return (f"its GGUF architecture '{arch}' is not supported by the GGUF loader of transformers "
            f"{transformers.__version__} (it loads: {loads}); convert the model to an HF folder with "
            "another tool and name that folder")
