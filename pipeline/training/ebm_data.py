"""Real windows paired with the base LM's samples for the same prefix: the NCE training data.

Each step of conditional NCE (paper §3.1) takes a real window x⁺ and, for the same prefix,
one of the n continuations the LM sampled for it, drawn uniformly. Which one is a pure
function of (seed, epoch, window_id), so a resumed run draws the same negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import RebmError
from pipeline.data.tokenization import read_windows
from pipeline.sampling.negatives import read_negatives


@dataclass
class NCEData:
    """Windows [N, T] and, aligned with them, the LM's continuations [N, n, T − p]."""

    window_ids: np.ndarray
    windows: np.ndarray
    negatives: np.ndarray
    prefix_len: int

    @property
    def samples_per_prefix(self) -> int:
        return self.negatives.shape[1]

    def __len__(self) -> int:
        return len(self.window_ids)

    def subset(self, rows: np.ndarray) -> NCEData:
        """The given rows (windows and their samples), in that order."""
        return NCEData(self.window_ids[rows], self.windows[rows], self.negatives[rows], self.prefix_len)

    def negative_windows(self, rows: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
        """prefix of each row's real window + its `sample_idx`-th LM continuation: [B, T]."""
        prefixes = self.windows[rows, : self.prefix_len]
        continuations = self.negatives[rows, sample_idx]
        return np.concatenate([prefixes, continuations], axis=1)

    def draw_samples(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """Uniform sample index per row, from (seed, epoch, window_id) only."""
        keys = np.stack([np.full(len(rows), seed), np.full(len(rows), epoch), self.window_ids[rows]], axis=1)
        return np.array(
            [np.random.default_rng(k.tolist()).integers(self.samples_per_prefix) for k in keys], dtype=np.int64
        )

    def batch(self, rows: np.ndarray, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        sample_idx = self.draw_samples(rows, seed, epoch)
        return {
            "real": torch.from_numpy(self.windows[rows]),
            "lm": torch.from_numpy(self.negative_windows(rows, sample_idx)),
        }


def load_nce_data(windows_path: Path, negatives_dir: Path, prefix_len: int, limit: int | None = None) -> NCEData:
    """Join a split's windows with its negatives; every window must have the same n samples."""
    window_ids, windows = read_windows(windows_path)
    negatives = read_negatives(negatives_dir)
    neg_window = negatives.column("window_id").to_numpy()
    neg_sample = negatives.column("sample_idx").to_numpy()
    tokens_col = negatives.column("token_ids").combine_chunks()
    cont_len = windows.shape[1] - prefix_len
    tokens = tokens_col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(tokens) != len(negatives) * cont_len:
        raise RebmError(f"{negatives_dir}: column 'token_ids' rows are not all {cont_len} tokens (T − p)")
    tokens = tokens.reshape(len(negatives), cont_len)

    n = int(neg_sample.max()) + 1 if len(neg_sample) else 0
    row_of = {int(w): i for i, w in enumerate(window_ids)}
    rows = np.array([row_of.get(int(w), -1) for w in neg_window])
    if (rows < 0).any():
        stray = int(neg_window[rows < 0][0])
        raise RebmError(f"{negatives_dir}: column 'window_id' has {stray}, not a window of {windows_path}")
    counts = np.bincount(rows, minlength=len(window_ids))
    if n == 0 or (counts != n).any():
        bad = int(np.flatnonzero(counts != n)[0]) if n else 0
        raise RebmError(
            f"{negatives_dir}: window {int(window_ids[bad])} has {int(counts[bad])} samples, expected {n} "
            "for every window (rerun the negatives stage)"
        )
    if len(np.unique(rows * n + neg_sample)) != len(rows):
        raise RebmError(f"{negatives_dir}: duplicate (window_id, sample_idx) rows (rerun the negatives stage)")
    aligned = np.empty((len(window_ids), n, cont_len), dtype=np.int64)
    aligned[rows, neg_sample] = tokens
    if limit is not None:
        window_ids, windows, aligned = window_ids[:limit], windows[:limit], aligned[:limit]
    return NCEData(window_ids=window_ids, windows=windows, negatives=aligned, prefix_len=prefix_len)
