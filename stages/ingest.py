"""Stage `ingest`: a dataset's documents -> data/<dataset>/docs/{train,valid,test}.parquet."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import IngestConfig, load_dataset_source, load_section
from pipeline.core.io import atomic_output, write_json
from pipeline.core.paths import DatasetPaths
from pipeline.data.corpora import ingest_documents, iter_documents


def run(dataset: str, params: Path, root: Path = Path(".")) -> dict:
    started = time.perf_counter()
    spec = load_dataset_source(dataset, params)
    ingest = load_section(IngestConfig, "ingest", params)
    paths = DatasetPaths(dataset, root)
    with atomic_output(paths.docs, directory=True) as tmp:
        stats = ingest_documents(dataset, iter_documents(spec, ingest), ingest, tmp)
    summary = {"dataset": dataset, "source": spec.source, **stats.as_dict(),
               "wall_seconds": round(time.perf_counter() - started, 3)}
    write_json(paths.ingest_stats, summary)
    return summary
