"""Continuation log-likelihood of a causal LM: the positions every model in Table 1 is scored on.

A window holds T tokens; the first p (`prefix_len`) are the prefix. A model is scored on the
T - p continuation tokens x_{p+1..T} (0-based positions prefix_len..T-1), each given
everything before it — the prefix tokens are context only, never targets. Log-probabilities
come out of a log-softmax in float32 and are summed in float64.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from pipeline.core.errors import RebmError
from pipeline.core.precision import autocast


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor | np.ndarray,
    prefix_len: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """log P(x_t | x_<t) for t = prefix_len..T-1 of every window: float64 array [N, T - prefix_len].

    `model(input_ids=...)` must return an object with `.logits` of shape [B, L, V] (any HF causal
    LM, or `ResidualLM`). Only the last T - prefix_len + 1 positions' logits are materialised
    when the model supports `logits_to_keep`.
    """
    ids = torch.as_tensor(np.asarray(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long)
    if ids.ndim != 2:
        raise RebmError(f"expected windows as a [N, T] array of token ids, got shape {tuple(ids.shape)}")
    n, seq_len = ids.shape
    if not 0 < prefix_len < seq_len:
        raise RebmError(f"prefix_len ({prefix_len}) must be inside the window (1..{seq_len - 1})")
    keep = seq_len - prefix_len + 1  # logits at positions prefix_len-1 .. T-1; the last is unused
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = np.empty((n, seq_len - prefix_len), dtype=np.float64)
    amp = autocast(device, precision)
    try:
        for start in range(0, n, batch_size):
            batch = ids[start : start + batch_size].to(device)
            with amp:
                logits = model(input_ids=batch, **kwargs).logits
            logits = logits[:, -keep:-1].float()  # predicts positions prefix_len .. T-1
            targets = batch[:, prefix_len:]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out[start : start + len(batch)] = logp.double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def continuation_nll(
    model: torch.nn.Module,
    ids: torch.Tensor | np.ndarray,
    prefix_len: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of continuation tokens)."""
    logp = continuation_logprobs(model, ids, prefix_len, batch_size, device, precision)
    return float(-logp.sum()), int(logp.size)


def continuation_perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor | np.ndarray,
    prefix_len: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> float:
    """exp(mean NLL over the continuation tokens of all windows)."""
    total, count = continuation_nll(model, ids, prefix_len, batch_size, device, precision)
    return math.exp(total / count)

