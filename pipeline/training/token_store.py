"""On-disk token stores: a split's windows (and, for NCE, its LM samples) streamed from Parquet
into flat int32 files and read back by rows with `os.pread`. The NCE data (`ebm_data.py`) and
the LM stages' train split (`WindowRows`) train from them, so memory holds a batch and a few
bytes per window whatever the corpus, and a Ray Train worker given a store (pickled: a path)
reads only the rows of its own micro-batches."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.errors import RebmError
from pipeline.core.io import check_schema, iter_record_batches
from pipeline.data.tokenization import WINDOWS_SCHEMA

READ_ROWS = 4096  # Parquet rows per streamed record batch: the bound on what a build holds
TOKEN_BYTES = 4  # int32 on disk and in every batch until the model's embedding
STORE_ENV = "REBM_NCE_STORE"  # parent directory of every store, NCE and LM (default: the stage's scratch)


def record_batches(files: list[Path], schema: pa.Schema, columns: list[str]) -> Iterator[pa.RecordBatch]:
    for path in files:
        check_schema(path, schema, columns)
        yield from iter_record_batches(path, columns, READ_ROWS)


def tokens_of(batch: pa.RecordBatch, column: str, width: int, where: Path) -> np.ndarray:
    """The list<int> column as int32 [rows, width]; every row must hold `width` tokens."""
    values = batch.column(column)
    lengths = np.diff(values.offsets.to_numpy())
    if (lengths != width).any():
        raise RebmError(f"{where}: column '{column}' has rows of {int(lengths[lengths != width][0])} tokens, "
                        f"expected {width}")
    flat = values.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    start = values.offsets[0].as_py()
    return flat[start : start + len(values) * width].reshape(len(values), width)


def read_rows(path: Path, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of a flat int32 file of row shape `shape`, in the given order: [len(rows), *shape]."""
    row_bytes = int(np.prod(shape)) * TOKEN_BYTES
    out = np.empty((len(rows), *shape), dtype=np.int32)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, r in enumerate(np.asarray(rows, dtype=np.int64)):
            out[i] = np.frombuffer(os.pread(fd, row_bytes, int(r) * row_bytes), dtype=np.int32).reshape(shape)
    finally:
        os.close(fd)
    return out


def write_windows_store(windows_path: Path, directory: Path, digest, limit: int | None) -> tuple[np.ndarray, int]:
    """Stream the first `limit` windows (all: None) into windows.i32: (window ids in row order, T)."""
    ids, seq_len, left = [], None, limit
    with open(directory / "windows.i32", "wb") as out:
        for batch in record_batches([windows_path], WINDOWS_SCHEMA, ["window_id", "input_ids"]):
            if left is not None:
                if left <= 0:
                    break
                batch, left = batch.slice(0, left), left - min(left, len(batch))
            column = batch.column("input_ids")
            seq_len = seq_len if seq_len is not None else (len(column[0]) if len(column) else None)
            if seq_len is None:
                continue
            tokens = tokens_of(batch, "input_ids", seq_len, windows_path)
            out.write(tokens.tobytes())
            digest.update(tokens.tobytes())
            ids.append(batch.column("window_id").to_numpy().astype(np.int64))
    if seq_len is None or not ids:
        raise RebmError(f"{windows_path}: no windows")
    return np.concatenate(ids), seq_len


@dataclass
class WindowRows:
    """A split's windows [N, T] in an on-disk int32 store, read by rows as int64 tensors: what the
    LM stages train on (`ShuffledBatches` indexes it like a tensor). Pickled, it is a path, so a
    Ray Train worker reads only the rows of its own micro-batches."""

    store: Path
    count: int
    seq_len: int
    max_id: int
    _cleanup: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cleanup": None}

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.seq_len)

    def max(self) -> int:
        return self.max_id

    def __getitem__(self, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = np.arange(self.count)[rows]
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        return torch.from_numpy(read_rows(self.store / "windows.i32", rows, (self.seq_len,))).long()

    def digest(self) -> str:
        return (self.store / "digest").read_text(encoding="utf-8")


def load_window_rows(windows_path: Path, scratch: Path | None = None, name: str = "windows") -> WindowRows:
    """Stream a windows file into an on-disk store `.<name>.tmp-*` (as `load_nce_data` does),
    removed when the rows are garbage collected."""
    directory = store_directory(scratch, name)
    try:
        digest = hashlib.sha256()
        window_ids, seq_len = write_windows_store(Path(windows_path), directory, digest, None)
        max_id = 0
        with open(directory / "windows.i32", "rb") as stored:
            for chunk in iter(lambda: stored.read(READ_ROWS * seq_len * TOKEN_BYTES), b""):
                max_id = max(max_id, int(np.frombuffer(chunk, dtype=np.int32).max()))
        (directory / "digest").write_text(digest.hexdigest(), encoding="utf-8")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return WindowRows(directory, len(window_ids), seq_len, max_id, _cleanup=StoreOwner(directory))


class StoreOwner:
    """Held by every view of one store (`NCEData.subset`); the directory goes with the last of them."""

    def __init__(self, directory: Path):
        self.finalizer = weakref.finalize(self, shutil.rmtree, directory, True)


def store_directory(scratch: Path | None, name: str) -> Path:
    # absolute: Ray Train workers open it from their own working directories
    parent = Path(os.environ.get(STORE_ENV) or scratch or tempfile.gettempdir()).resolve()
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))  # *.tmp-* is git-ignored


def remove_stale_stores(scratch: Path, name: str) -> None:
    """Stores a killed run left behind (a finished run removes its own)."""
    for stale in Path(scratch).glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
