"""Tokenizer (trained byte-level BPE, or any HF tokenizer) and fixed-length windows.

Documents of a split are joined with an end-of-document token into one stream and cut into
windows of `seq_len` tokens every `stride` tokens; the first `prefix_len` tokens of a window
are the prefix the models condition on, the rest the continuation they are scored on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.core.errors import RebmError
from pipeline.core.io import StreamingTableWriter, iter_record_batches

END_OF_DOCUMENT = "<|endoftext|>"

WINDOWS_SCHEMA = pa.schema(
    [
        pa.field("window_id", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
)

# Window ids are unique within a dataset across splits, because per-sample randomness
# downstream is seeded from (seed, window_id, sample_idx).
SPLIT_ID_BASE = {"train": 0, "valid": 1 << 40, "test": 2 << 40}

_ENCODE_BATCH = 256


def iter_texts(docs_path: Path, batch_rows: int = 1024) -> Iterator[tuple[str, str]]:
    """(doc_id, text) pairs of a docs Parquet file, streamed."""
    for batch in iter_record_batches(docs_path, ["doc_id", "text"], batch_rows):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on `texts`, with one end-of-document token.

    Byte-level means no unknown tokens: any string, whatever its script or stray bytes,
    round-trips through encode/decode.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_DOCUMENT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=END_OF_DOCUMENT,
        eos_token=END_OF_DOCUMENT,
        unk_token=END_OF_DOCUMENT,
        pad_token=END_OF_DOCUMENT,
        model_max_length=1_000_000_000,  # windows are cut by us, never truncated by the tokenizer
    )


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Any HF tokenizer (hub id or local directory), loaded offline if the files are local."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise RebmError(f"tokenize.pretrained: cannot load tokenizer '{name_or_path}': {exc}") from exc
    end_of_document_id(tokenizer, where=f"tokenize.pretrained '{name_or_path}'")
    tokenizer.model_max_length = 1_000_000_000
    return tokenizer


def end_of_document_id(tokenizer: PreTrainedTokenizerBase, where: str = "tokenizer") -> int:
    """The id that separates documents: EOS, or SEP for encoder tokenizers that lack one."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise RebmError(f"{where}: has neither an EOS nor a SEP token to mark document ends")


@dataclass
class WindowStats:
    documents: int = 0
    tokens: int = 0
    windows: int = 0
    tail_tokens_dropped: int = 0
    skipped: Counter = field(default_factory=Counter)


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[tuple[str, str]], stats: WindowStats
) -> Iterator[tuple[str, list[int]]]:
    """(doc_id, token ids) in batches; documents that encode to nothing are skipped and counted."""
    batch: list[tuple[str, str]] = []

    def flush() -> Iterator[tuple[str, list[int]]]:
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (doc_id, _), ids in zip(batch, encoded, strict=True):
            if not ids:
                stats.skipped["no_tokens"] += 1
                continue
            stats.documents += 1
            yield doc_id, ids
        batch.clear()

    for doc_id, text in docs:
        batch.append((doc_id, text))
        if len(batch) >= _ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def cut_windows(
    encoded_docs: Iterable[tuple[str, list[int]]], eod_id: int, seq_len: int, stride: int, stats: WindowStats
) -> Iterator[tuple[str, np.ndarray]]:
    """(doc_id of the window's first token, ids[seq_len]) over the EOD-joined stream.

    Each document is followed by `eod_id`, so a window may cross a document boundary, as the
    paper's fixed-length windows over a concatenated corpus do. The final partial window is
    dropped (counted in `tail_tokens_dropped`).
    """
    ids: list[int] = []
    owners: list[str] = []  # doc id of every buffered token
    for doc_id, doc_ids in encoded_docs:
        ids.extend(doc_ids)
        ids.append(eod_id)
        owners.extend([doc_id] * (len(doc_ids) + 1))
        stats.tokens += len(doc_ids) + 1
        while len(ids) >= seq_len:
            stats.windows += 1
            yield owners[0], np.asarray(ids[:seq_len], dtype=np.int32)
            del ids[:stride]
            del owners[:stride]
    # Tokens left over were either covered by an earlier overlapping window or are lost.
    stats.tail_tokens_dropped = max(0, len(ids) - (seq_len - stride)) if stats.windows else len(ids)


def write_windows(
    path: Path,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    docs: Iterable[tuple[str, str]],
    seq_len: int,
    stride: int,
) -> WindowStats:
    stats = WindowStats()
    eod = end_of_document_id(tokenizer)
    encoded = encode_documents(tokenizer, docs, stats)
    with StreamingTableWriter(path, WINDOWS_SCHEMA) as writer:
        for index, (doc_id, window) in enumerate(cut_windows(encoded, eod, seq_len, stride, stats)):
            writer.append(window_id=SPLIT_ID_BASE[split] + index, doc_id=doc_id, input_ids=window)
    return stats


class WindowReader:
    """One split's windows file read a block of rows at a time: `blocks` streams it in order,
    `read` fetches a row range by decoding only the row groups that hold it (the writer's
    row groups are fixed, `StreamingTableWriter.batch_rows`), so memory never holds the split.
    `limit`: only the first `limit` windows exist for the reader."""

    COLUMNS = ["window_id", "input_ids"]

    def __init__(self, path: Path, limit: int | None = None):
        from pipeline.core.io import check_schema

        self.path = Path(path)
        check_schema(self.path, WINDOWS_SCHEMA, self.COLUMNS)
        metadata = pq.ParquetFile(self.path).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self.group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.rows = int(self.group_start[-1]) if limit is None else min(int(limit), int(self.group_start[-1]))
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None  # the last row group decoded

    def _decode(self, table: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        column = table.column("input_ids")
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = np.diff(column.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            raise RebmError(f"{self.path}: column 'input_ids' has rows of different lengths")
        start = column.offsets[0].as_py() if len(column) else 0
        flat = column.values.to_numpy(zero_copy_only=False)[start : start + int(lengths.sum())].astype(np.int64)
        ids = np.asarray(table.column("window_id").to_numpy(), dtype=np.int64)
        return ids, flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)

    def _group(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != index:
            table = pq.ParquetFile(self.path).read_row_group(index, columns=self.COLUMNS)
            self._cached = (index, *self._decode(table))
        return self._cached[1], self._cached[2]

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(window ids int64 [k], token ids int64 [k, T]) of rows start … start + count − 1 (k ≤ count at the end)."""
        stop = min(start + count, self.rows)
        ids, tokens = [], []
        group = int(np.searchsorted(self.group_start, start, side="right")) - 1
        while start < stop:
            group_ids, group_tokens = self._group(group)
            lo = start - int(self.group_start[group])
            hi = min(stop, int(self.group_start[group + 1])) - int(self.group_start[group])
            ids.append(group_ids[lo:hi])
            tokens.append(group_tokens[lo:hi])
            start, group = int(self.group_start[group]) + hi, group + 1
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
        if len({t.shape[1] for t in tokens}) > 1:
            raise RebmError(f"{self.path}: column 'input_ids' has rows of different lengths")
        return np.concatenate(ids), np.concatenate(tokens)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window ids, token ids) of the given rows, in that order (ascending rows decode each row
        group once)."""
        picked = [self.read(int(r), 1) for r in rows]
        if not picked:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
        return np.concatenate([p[0] for p in picked]), np.concatenate([p[1] for p in picked])

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, window ids, token ids) of consecutive blocks of `size` rows (the last may be shorter)."""
        for start in range(0, self.rows, size):
            yield (start, *self.read(start, size))


def read_windows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(window ids int64 [N], token ids int64 [N, seq_len]) of one whole split, schema-checked: for
    the small splits and the tools; the stages read by rows (`WindowReader`)."""
    reader = WindowReader(path)
    return reader.read(0, reader.rows)


def window_documents(path: Path, window_ids: np.ndarray) -> np.ndarray:
    """The doc_id [len(window_ids)] (str) of each of `window_ids` in one split, streamed from the
    window_id and doc_id columns (schema-checked): memory holds a batch and the wanted ids only."""
    from pipeline.core.io import check_schema

    check_schema(path, WINDOWS_SCHEMA, ["window_id", "doc_id"])
    wanted = {int(w) for w in window_ids}
    wanted_ids = np.fromiter(wanted, dtype=np.int64, count=len(wanted))
    document_of: dict[int, str] = {}
    for batch in iter_record_batches(path, ["window_id", "doc_id"], 4096):
        ids = batch.column(0).to_numpy()
        for i in np.flatnonzero(np.isin(ids, wanted_ids)):
            document_of[int(ids[i])] = batch.column(1)[int(i)].as_py()
    missing = wanted - set(document_of)
    if missing:
        raise RebmError(f"{path}: no window {min(missing)} in column 'window_id'")
    return np.asarray([document_of[int(w)] for w in window_ids], dtype=object)


def read_window_ids(path: Path) -> np.ndarray:
    """All windows of one split as an int64 [N, seq_len] array (with schema check)."""
    return read_windows(path)[1]
