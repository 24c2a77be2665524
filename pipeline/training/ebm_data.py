"""Real windows paired with the base LM's samples for the same prefix: the NCE training data.

Each step of conditional NCE (paper §3.1) takes a real window x⁺ and, for the same prefix,
one of the n continuations the LM sampled for it, drawn uniformly. Which one is a pure
function of (seed, epoch, window_id), so a resumed run draws the same negatives.

The data never sits in memory as a whole. `build_nce_store` streams a split's windows and
negatives from their Parquet files, a few thousand rows at a time, into two flat int32 files
on disk (`windows.i32` [N, T] and `negatives.i32` [N, n, T − p], row r of one being window r of
the other); a batch then reads exactly its rows with `os.pread`. So the epoch's order stays a
global permutation of the N windows (the same batches as an in-memory run, bit for bit), memory
holds one batch of tokens plus 8 bytes per window (its id), and a Ray Train worker that gets an
`NCEData` (a path, pickled) reads only the rows of its own micro-batches. Several workers on one
machine share the files; on several machines the store must sit on a shared filesystem
(`REBM_NCE_STORE`, like the Ray Train storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import RebmError
from pipeline.sampling.negatives import NEGATIVES_SCHEMA, SHARD_RE
from pipeline.training.token_store import (
    TOKEN_BYTES,
    StoreOwner,
    WindowRows,
    load_window_rows,
    read_rows,
    record_batches,
    remove_stale_stores,
    store_directory,
    tokens_of,
    write_windows_store,
)

__all__ = ["NCEData", "WindowRows", "load_nce_data", "load_window_rows", "nce_data_from_arrays", "remove_stale_stores"]


def _write_runs(fd: int, slots: np.ndarray, rows: np.ndarray, row_bytes: int) -> None:
    """Write `rows` [k, width] at slot indices `slots` of a flat file, one pwrite per contiguous run."""
    order = np.argsort(slots, kind="stable")
    slots, rows = slots[order], rows[order]
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    for run_slots, run_rows in zip(np.split(slots, breaks), np.split(rows, breaks), strict=True):
        os.pwrite(fd, np.ascontiguousarray(run_rows).tobytes(), int(run_slots[0]) * row_bytes)


@dataclass
class NCEData:
    """A split's windows [N, T] and its LM continuations [N, n, T − p], on disk (`build_nce_store`)."""

    store: Path
    window_ids: np.ndarray  # [N] int64, row order
    seq_len: int
    prefix_len: int
    samples_per_prefix: int
    rows: np.ndarray | None = None  # a view: these store rows, in this order (None: all)
    read_log: Path | None = None  # audits (tests): each batch appends {pid, epoch, rows} as a JSON line
    _cleanup: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:  # a worker's copy reads the store; only the builder removes it
        return {**self.__dict__, "_cleanup": None}

    def __len__(self) -> int:
        return len(self.window_ids) if self.rows is None else len(self.rows)

    def _store_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.rows is None else self.rows[rows]

    def subset(self, rows: np.ndarray) -> NCEData:
        """The given rows (windows and their samples), in that order."""
        return NCEData(self.store, self.window_ids, self.seq_len, self.prefix_len, self.samples_per_prefix,
                       self._store_rows(rows), self.read_log, self._cleanup)

    def head(self, limit: int | None) -> NCEData:
        return self if limit is None or limit >= len(self) else self.subset(np.arange(limit))

    def ids(self, rows: np.ndarray) -> np.ndarray:
        return self.window_ids[self._store_rows(rows)]

    def windows(self, rows: np.ndarray) -> np.ndarray:
        """Token ids of the given rows' real windows: int32 [B, T]."""
        return read_rows(self.store / "windows.i32", self._store_rows(rows), (self.seq_len,))

    def negatives(self, rows: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
        """Continuation `sample_idx[i]` of row `rows[i]`: int32 [B, T − p]."""
        flat = self._store_rows(rows) * self.samples_per_prefix + np.asarray(sample_idx, dtype=np.int64)
        return read_rows(self.store / "negatives.i32", flat, (self.seq_len - self.prefix_len,))

    def draw_samples(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """Uniform sample index per row, from (seed, epoch, window_id) only."""
        ids = self.ids(rows)
        return np.array([np.random.default_rng([seed, epoch, int(w)]).integers(self.samples_per_prefix)
                         for w in ids], dtype=np.int64)

    def batch(self, rows: np.ndarray, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        if self.read_log is not None:
            with open(self.read_log, "a", encoding="utf-8") as log:
                log.write(json.dumps({"pid": os.getpid(), "epoch": epoch,
                                      "rows": self._store_rows(rows).tolist()}) + "\n")
        real = self.windows(rows)
        lm = np.concatenate([real[:, : self.prefix_len], self.negatives(rows, self.draw_samples(rows, seed, epoch))],
                            axis=1)
        # int32 up to here; the embedding takes int64 ids
        return {"real": torch.from_numpy(real).long(), "lm": torch.from_numpy(lm).long()}

    def digest(self) -> str:
        """What identifies the data of a training run (its checkpoints' fingerprint)."""
        return (self.store / "digest").read_text(encoding="utf-8")


class _RowIndex:
    """window id -> row of the windows file, by binary search (8 bytes per window, no dict)."""

    def __init__(self, window_ids: np.ndarray, negatives_dir: Path, windows_path: Path):
        self.order = np.argsort(window_ids, kind="stable")
        self.sorted = window_ids[self.order]
        self.where = f"{negatives_dir}: column 'window_id' has {{}}, not a window of {windows_path}"

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.sorted, ids), len(self.sorted) - 1)
        found = self.sorted[pos] == ids
        if not found.all():
            raise RebmError(self.where.format(int(ids[~found][0])))
        return self.order[pos]


def _sampled_windows(negatives_dir: Path) -> int | None:
    """How many windows of the split (its first ones) the negatives stage sampled: its manifest's
    count, which `negatives.windows` may cap below the split's size (None: no manifest, all)."""
    manifest = negatives_dir.parent / "manifest.json"
    if not manifest.exists():
        return None
    return int(json.loads(manifest.read_text(encoding="utf-8"))["splits"][negatives_dir.name]["windows"])


def _samples_per_window(files: list[Path], row_of: _RowIndex, window_ids: np.ndarray, negatives_dir: Path) -> int:
    """n, after checking from the index columns alone that every window has samples 0 … n − 1 once.

    Per window: how many rows, and the sum and sum of squares of their sample_idx, which are those
    of 0 … n − 1 when each index appears once (O(N) memory, where a set of pairs would be O(N·n)).
    """
    counts, sums, squares = (np.zeros(len(window_ids), dtype=np.int64) for _ in range(3))
    n = 0
    for batch in record_batches(files, NEGATIVES_SCHEMA, ["window_id", "sample_idx"]):
        rows = row_of(batch.column("window_id").to_numpy().astype(np.int64))
        idx = batch.column("sample_idx").to_numpy().astype(np.int64)
        n = max(n, int(idx.max()) + 1 if len(idx) else 0)
        np.add.at(counts, rows, 1)
        np.add.at(sums, rows, idx)
        np.add.at(squares, rows, idx * idx)
    if n == 0 or (counts != n).any():
        bad = int(np.flatnonzero(counts != n)[0]) if n else 0
        raise RebmError(f"{negatives_dir}: window {int(window_ids[bad])} has {int(counts[bad])} samples, "
                        f"expected {n} for every window (rerun the negatives stage)")
    if (sums != n * (n - 1) // 2).any() or (squares != (n - 1) * n * (2 * n - 1) // 6).any():
        raise RebmError(f"{negatives_dir}: duplicate (window_id, sample_idx) rows (rerun the negatives stage)")
    return n


def _write_negatives(files: list[Path], row_of: _RowIndex, windows: int, n: int, cont_len: int, directory: Path,
                     negatives_dir: Path, digest) -> None:
    """Stream the shards' tokens into negatives.i32 at slot row · n + sample_idx."""
    row_bytes = cont_len * TOKEN_BYTES
    fd = os.open(directory / "negatives.i32", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, windows * n * row_bytes)
        for batch in record_batches(files, NEGATIVES_SCHEMA, ["window_id", "sample_idx", "token_ids"]):
            rows = row_of(batch.column("window_id").to_numpy().astype(np.int64))
            slots = rows * n + batch.column("sample_idx").to_numpy().astype(np.int64)
            tokens = tokens_of(batch, "token_ids", cont_len, negatives_dir)
            _write_runs(fd, slots, tokens, row_bytes)
            digest.update(slots.tobytes())
            digest.update(tokens.tobytes())
    finally:
        os.close(fd)


def load_nce_data(windows_path: Path, negatives_dir: Path, prefix_len: int, limit: int | None = None,
                  scratch: Path | None = None, name: str = "nce") -> NCEData:
    """Stream a split's windows and negatives into an on-disk store (module docstring); every
    window must have the same n samples. The store is the directory `.<name>.tmp-*` in $REBM_NCE_STORE,
    else `scratch`, else the system's temp directory; it is removed when the data is garbage collected."""
    windows_path, negatives_dir = Path(windows_path), Path(negatives_dir)
    files = sorted(p for p in negatives_dir.glob("shard-*.parquet") if SHARD_RE.match(p.name))
    if not files:
        raise RebmError(f"{negatives_dir}: no negatives shards (has the negatives stage run?)")
    directory = store_directory(scratch, name)
    try:
        digest = hashlib.sha256()
        window_ids, seq_len = write_windows_store(windows_path, directory, digest, _sampled_windows(negatives_dir))
        row_of = _RowIndex(window_ids, negatives_dir, windows_path)
        n = _samples_per_window(files, row_of, window_ids, negatives_dir)
        _write_negatives(files, row_of, len(window_ids), n, seq_len - prefix_len, directory, negatives_dir, digest)
        (directory / "digest").write_text(digest.hexdigest(), encoding="utf-8")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    data = NCEData(directory, window_ids, seq_len, prefix_len, n, _cleanup=StoreOwner(directory))
    return data.head(limit)


def nce_data_from_arrays(window_ids: np.ndarray, windows: np.ndarray, negatives: np.ndarray, prefix_len: int,
                         directory: Path) -> NCEData:
    """An `NCEData` over given arrays (tests and benchmarks): the store written directly."""
    directory.mkdir(parents=True, exist_ok=True)
    windows = np.ascontiguousarray(windows, dtype=np.int32)
    negatives = np.ascontiguousarray(negatives, dtype=np.int32)
    (directory / "windows.i32").write_bytes(windows.tobytes())
    (directory / "negatives.i32").write_bytes(negatives.tobytes())
    digest = hashlib.sha256(windows.tobytes())
    digest.update(negatives.tobytes())
    (directory / "digest").write_text(digest.hexdigest(), encoding="utf-8")
    return NCEData(directory, np.asarray(window_ids, dtype=np.int64), windows.shape[1], prefix_len, negatives.shape[1])
