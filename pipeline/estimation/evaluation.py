"""The evaluation's building blocks: joint-model ranges, Eq. 5 per position, window helpers.

Pure array code on top of the estimators of `pipeline.estimation.joint`: the evaluate stage's work
(`pipeline.estimation.evaluation_work`) gathers the inputs and `pipeline.estimation.evaluation_summary` combines
them with these into Table 1 and the figures. The seeds of evaluate's LM samples are in
`pipeline.core.seeds`, with every other derived seed. Shapes: N test windows of T
tokens, prefix p, L = T − p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.estimation.joint import last_position_logprob, position_logprob_bounds


def evenly_spaced(count: int, total: int) -> np.ndarray:
    """`count` distinct row indices spread over 0..total−1 (test windows from many documents)."""
    count = min(count, total)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))


def completed_windows(windows: np.ndarray, start: int, continuations: np.ndarray) -> np.ndarray:
    """x_{<start} of each window followed by each of its n sampled completions: [W, n, T]."""
    W, n, _ = continuations.shape
    prefix = np.broadcast_to(windows[:, None, :start], (W, n, start))
    return np.concatenate([prefix, continuations], axis=-1)


def last_position_candidates(window: np.ndarray, vocab_size: int) -> np.ndarray:
    """The window with its last token replaced by every token of the vocabulary: [V, T]."""
    candidates = np.repeat(np.asarray(window, dtype=np.int64)[None], vocab_size, axis=0)
    candidates[:, -1] = np.arange(vocab_size)
    return candidates


@dataclass
class JointRange:
    low: float
    high: float


def per_position_logprob_bounds(
    lm_token_logprob: np.ndarray, real_energy: np.ndarray, position_energies: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of log P(x_t | x_<t) for t = p+1..T by Eq. 5: arrays [W, L].

    position_energies[:, j] holds −log-weights' sources for the completions that start at
    continuation index j (token index p + j): E(x_{<p+j}, x'_{p+j..T}) for n samples x'. The
    denominator at index j is that column; the numerator clamps x_{p+j}, i.e. the column j + 1,
    and at the last index it is the real window's own energy — nothing left to marginalise.
    """
    e = torch.from_numpy(np.asarray(position_energies, dtype=np.float64))  # [W, L, n]
    real = torch.from_numpy(np.asarray(real_energy, dtype=np.float64))  # [W]
    W, L, _ = e.shape
    lower = np.empty((W, L))
    upper = np.empty((W, L))
    base = torch.from_numpy(np.asarray(lm_token_logprob, dtype=np.float64))
    for j in range(L):
        numerator = -e[:, j + 1] if j + 1 < L else -real[:, None]
        lo, hi = position_logprob_bounds(base[:, j], numerator, -e[:, j])
        lower[:, j], upper[:, j] = lo.numpy(), hi.numpy()
    return lower, upper


def exact_last_logprob(lm_logprobs: np.ndarray, candidate_energies: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Exact log P(x_T | x_<T) of the joint model from all |V| candidates: [E] (Eq. 5, t = T)."""
    return last_position_logprob(
        torch.from_numpy(np.asarray(lm_logprobs, dtype=np.float64)),
        torch.from_numpy(np.asarray(candidate_energies, dtype=np.float64)),
        torch.from_numpy(np.asarray(target, dtype=np.int64)),
    ).numpy()


def position_perplexity(logprob: np.ndarray) -> np.ndarray:
    """Per-position perplexity over windows: exp(−mean_w log P(x_t | x_<t)), one per column."""
    return np.exp(-np.asarray(logprob, dtype=np.float64).mean(axis=0))


def count_saved_parameters(model_dir: Path) -> int:
    """Parameters of a saved model, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def format_parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M"
