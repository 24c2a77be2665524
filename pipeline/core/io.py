"""Artifact I/O shared by every stage: atomic outputs and schema-checked Parquet.

A stage writes into a hidden sibling temporary path and renames it into place only when
everything is written, so a killed stage never leaves a half artifact that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import RebmError


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, directory: bool) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists() or path.is_symlink():
        _remove(path)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_table(path: str | os.PathLike[str], rows: dict[str, list[Any]] | pa.Table, schema: pa.Schema) -> None:
    """Write one Parquet file, cast to the declared `schema` (fails on a missing column)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pydict(rows, schema=schema)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: table lacks columns {missing} of its declared schema")
    table = table.select(schema.names).cast(schema)
    with atomic_output(path, directory=False) as tmp:
        pq.write_table(table, tmp)


def check_schema(path: str | os.PathLike[str], schema: pa.Schema, columns: list[str] | None = None) -> None:
    """Fail unless the Parquet file at `path` has `schema`'s columns with compatible types.

    The error names the file and the column, which is what a user needs to find which
    stage produced the bad artifact. Only the footer is read.
    """
    path = Path(path)
    if not path.exists():
        raise RebmError(f"{path}: not found (has the stage that writes it run?)")
    try:
        file_schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RebmError(f"{path}: not a readable Parquet file: {exc}") from exc
    for name in columns or schema.names:
        expected = schema.field(name).type
        if name not in file_schema.names:
            raise RebmError(f"{path}: missing column '{name}' (expected {expected})")
        actual = file_schema.field(name).type
        if actual != expected and not _castable(actual, expected):
            raise RebmError(f"{path}: column '{name}' has type {actual}, expected {expected}")


def read_table(path: str | os.PathLike[str], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file after `check_schema`, cast to the declared types."""
    wanted = columns or schema.names
    check_schema(path, schema, wanted)
    table = pq.read_table(path, columns=wanted)
    return table.cast(pa.schema([schema.field(n) for n in wanted]))


def _castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    integer_like = (pa.types.is_integer, pa.types.is_floating)
    if any(f(actual) for f in integer_like) and any(f(expected) for f in integer_like):
        return True
    if (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and pa.types.is_list(expected):
        return _castable(actual.value_type, expected.value_type) or actual.value_type == expected.value_type
    return (pa.types.is_string(actual) or pa.types.is_large_string(actual)) and pa.types.is_string(expected)


class StreamingTableWriter:
    """Append rows to one Parquet file in batches, so outputs larger than memory pass through."""

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, batch_rows: int = 4096):
        self.schema = schema
        self.batch_rows = batch_rows
        self.rows = 0
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._writer = pq.ParquetWriter(path, schema)

    def append(self, **row: Any) -> None:
        for name, values in self._buffer.items():
            values.append(row[name])
        self.rows += 1
        if len(self._buffer[self.schema.names[0]]) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self._buffer[self.schema.names[0]]:
            self._writer.write_table(pa.Table.from_pydict(self._buffer, schema=self.schema))
            for values in self._buffer.values():
                values.clear()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __enter__(self) -> StreamingTableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_record_batches(path: str | os.PathLike[str], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows as record batches of at most `batch_rows`, decoding one row group at a
    time and dropping it before the next. (With `ParquetFile.iter_batches` the NCE store build of
    265k windows peaked at 607 MiB against 537 MiB this way, and train_ebm's peak in `rebm bench
    scale` rose 579 → 653 MiB over 16x the windows, where it is now flat.)"""
    reader = pq.ParquetFile(path)
    for group in range(reader.metadata.num_row_groups):
        table = reader.read_row_group(group, columns=columns)
        yield from table.to_batches(max_chunksize=batch_rows)
        del table


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """sha256 over JSON-able values and numpy arrays: identifies a run's configuration and data,
    so a resumable stage never continues from state made under other inputs."""
    import numpy as np

    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


class ArrayCheckpoint:
    """Finished parts of a long, resumable stage, one .npz per part, each tied to a key.

    A part is reused only when it was saved under the same key (a fingerprint of everything it
    depends on), so a rerun after a crash redoes only what is missing or stale.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.npz"

    def load(self, name: str, key: str) -> dict[str, Any] | None:
        import numpy as np

        path = self._path(name)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["__key__"]) != key:
                    return None
                return {k: data[k] for k in data.files if k != "__key__"}
        except (OSError, ValueError, KeyError):
            return None  # a damaged part is recomputed, never trusted

    def save(self, name: str, key: str, **arrays: Any) -> None:
        import numpy as np

        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_output(self._path(name), directory=False) as tmp, open(tmp, "wb") as f:
            np.savez(f, __key__=np.array(key), **arrays)

    def discard(self) -> None:
        _remove(self.directory)


def write_tsv(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """A DVC-plottable TSV (header from the first row's keys; floats to 6 significant digits)."""
    columns = list(rows[0]) if rows else []
    lines = ["\t".join(columns)]
    lines += ["\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in columns) for r in rows]
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(text, encoding="utf-8")


# What a variant's stage writes where its model would be when the variant is null in params
# (not applicable to the run): see pipeline.training.trainer.save_not_applicable.
NOT_APPLICABLE_FILE = "not_applicable.json"


def require_model(model_dir: str | os.PathLike[str], stage: str) -> Path:
    """`model_dir` if it holds a saved model, else an error naming the stage that makes it."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        if (reason := not_applicable_reason(model_dir)) is not None:
            raise RebmError(f"{model_dir}: stage {stage} did not train a model ({reason})")
        raise RebmError(f"{model_dir}: not found; run stage {stage} first")
    return model_dir


def not_applicable_reason(model_dir: str | os.PathLike[str]) -> str | None:
    """Why a variant's stage wrote a not-applicable record instead of a model, or None."""
    record = Path(model_dir) / NOT_APPLICABLE_FILE
    if not record.exists():
        return None
    return str(json.loads(record.read_text(encoding="utf-8")).get("reason", "not applicable"))
