from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import FilesSource, HFSource, IngestConfig
from pipeline.core.errors import RebmError
from pipeline.core.io import read_table
from pipeline.data.corpora import DOCS_SCHEMA, SPLITS, RawDocument, ingest_documents, iter_documents, split_of
from tests.conftest import REPO

INGEST = IngestConfig(valid_fraction=0.1, test_fraction=0.1)


def _docs(n: int) -> list[RawDocument]:
    return [RawDocument(f"doc-{i}", f"Text of document {i}.", "test") for i in range(n)]


def _split_ids(out: Path) -> dict[str, list[str]]:
    return {s: read_table(out / f"{s}.parquet", DOCS_SCHEMA).column("doc_id").to_pylist() for s in SPLITS}


def test_split_is_a_function_of_the_id_with_the_configured_fractions() -> None:
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [split_of(i, 0.1, 0.2) for i in ids]
    assert splits == [split_of(i, 0.1, 0.2) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in SPLITS}
    assert share["test"] == pytest.approx(0.2, abs=0.015)
    assert share["valid"] == pytest.approx(0.1, abs=0.015)


def test_ingest_is_order_independent_and_never_leaks(tmp_path: Path) -> None:
    docs = _docs(300)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    ingest_documents("t", iter(docs), INGEST, first)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    ingest_documents("t", iter(shuffled), INGEST, second)
    a, b = _split_ids(first), _split_ids(second)
    assert {s: sorted(v) for s, v in a.items()} == {s: sorted(v) for s, v in b.items()}
    all_ids = [i for ids in a.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 300  # every document in exactly one split


def test_empty_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    docs = _docs(100) + [RawDocument("blank", "   \n ", "t"), RawDocument("none", None, "t"), _docs(1)[0]]
    stats = ingest_documents("t", iter(docs), INGEST, tmp_path)
    assert stats.skipped == {"empty": 2, "duplicate_doc_id": 1}
    assert sum(stats.documents.values()) == 100


def test_split_without_documents_is_an_error_naming_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(RebmError, match="dataset 'tiny': split.*no documents"):
        ingest_documents("tiny", iter(_docs(2)), INGEST, tmp_path)


# ------------------------------------------------------------------ hf source (local files)
def _cc_news_layout(n: int) -> pd.DataFrame:
    """The columns of the hub's cc_news dataset."""
    return pd.DataFrame(
        {
            "title": [f"Title {i}" for i in range(n)],
            "text": ["" if i == 3 else f"News body {i}. Markets moved." for i in range(n)],
            "domain": ["example.com"] * n,
            "date": ["2017-01-01 00:00:00"] * n,
            "description": ["d"] * n,
            "url": [f"https://example.com/{i}" for i in range(n)],
            "image_url": [""] * n,
        }
    )


def test_hf_source_reads_a_local_parquet_in_cc_news_layout(tmp_path: Path) -> None:
    data = tmp_path / "cc_news"
    data.mkdir()
    _cc_news_layout(60).to_parquet(data / "train-00000.parquet")
    spec = HFSource(source="hf", path=str(data), text_column="text", id_column="url", max_docs=50)
    docs = list(iter_documents(spec, INGEST))
    assert len(docs) == 50
    assert docs[0].doc_id == "https://example.com/0" and docs[0].text == "News body 0. Markets moved."
    out = tmp_path / "out"
    out.mkdir()
    stats = ingest_documents("news", iter(docs), INGEST, out)
    assert stats.skipped == {"empty": 1} and sum(stats.documents.values()) == 49


def test_hf_source_groups_book_corpus_sentences_into_documents(tmp_path: Path) -> None:
    sentences = pd.DataFrame({"text": [f"sentence {i} ." for i in range(25)]})
    sentences.to_parquet(tmp_path / "books.parquet")
    spec = HFSource(source="hf", path="parquet", data_files=[str(tmp_path / "books.parquet")], rows_per_doc=10)
    docs = list(iter_documents(spec, INGEST))
    assert [d.text.count("\n") + 1 for d in docs] == [10, 10, 5]
    assert docs[1].text.splitlines()[0] == "sentence 10 ."
    assert len({d.doc_id for d in docs}) == 3


def test_hf_source_missing_text_column_is_named(tmp_path: Path) -> None:
    _cc_news_layout(5).to_parquet(tmp_path / "x.parquet")
    spec = HFSource(source="hf", path="parquet", data_files=[str(tmp_path / "x.parquet")], text_column="body")
    with pytest.raises(RebmError, match=r"no column 'body' \(columns: title, text, domain"):
        list(iter_documents(spec, INGEST))


def test_paper_params_pin_script_free_hub_revisions() -> None:
    """datasets >= 4 runs no loading scripts: each paper corpus names a repository, a revision and
    Parquet data files (REFERENCES: vblagoje/cc_news's Parquet branch, bookcorpus's PR 6)."""
    from pipeline.core.config import load_params

    sources = load_params(REPO / "params" / "paper.yaml").datasets
    assert (sources["news"].path, sources["news"].revision) == ("vblagoje/cc_news", "refs/convert/parquet")
    assert (sources["fiction"].path, sources["fiction"].revision) == ("bookcorpus/bookcorpus", "refs/pr/6")
    assert all(f.endswith(".parquet") for spec in sources.values() for f in spec.data_files)


def test_hub_layouts_stream_from_a_local_directory(tmp_path: Path) -> None:
    """The two paper corpora in their hub layouts, read with the paper's data_files and streaming:
    CC-News's five Parquet files under plain_text/train/, Book Corpus's sentence rows joined into
    documents across its file boundary, in file order."""
    news = tmp_path / "vblagoje_cc_news"
    (news / "plain_text" / "train").mkdir(parents=True)
    frame = _cc_news_layout(20)
    for part in range(2):
        frame.iloc[part * 10 : (part + 1) * 10].to_parquet(news / "plain_text" / "train" / f"000{part}.parquet")
    spec = HFSource(source="hf", path=str(news), data_files=["plain_text/train/*.parquet"], text_column="text",
                    id_column="url", streaming=True)
    docs = list(iter_documents(spec, INGEST))
    assert [d.doc_id for d in docs] == [f"https://example.com/{i}" for i in range(20)]

    books = tmp_path / "bookcorpus"
    (books / "plain_text").mkdir(parents=True)
    for part in range(2):
        pd.DataFrame({"text": [f"sentence {i} ." for i in range(part * 7, part * 7 + 7)]}).to_parquet(
            books / "plain_text" / f"train-0000{part}-of-00002.parquet")
    spec = HFSource(source="hf", path=str(books), data_files=["plain_text/train-*.parquet"], rows_per_doc=5,
                    streaming=True)
    docs = list(iter_documents(spec, INGEST))
    assert [d.text.splitlines() for d in docs] == [[f"sentence {i} ." for i in range(s, min(s + 5, 14))]
                                                   for s in (0, 5, 10)]  # doc 2 spans both files


def test_a_wrong_hub_id_revision_or_column_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network: the error must still name the source
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = HFSource(source="hf", path="nobody/no-such-corpus", revision="refs/pr/99", data_files=["x/*.parquet"])
    with pytest.raises(RebmError,
                       match=r"hf dataset 'nobody/no-such-corpus' revision 'refs/pr/99'.*could not be loaded"):
        list(iter_documents(spec, INGEST))
    data = tmp_path / "d"
    (data / "plain_text").mkdir(parents=True)
    _cc_news_layout(3).to_parquet(data / "plain_text" / "0.parquet")
    spec = HFSource(source="hf", path=str(data), data_files=["plain_text/*.parquet"], id_column="link")
    with pytest.raises(RebmError, match=r"no column 'link' \(columns: title, text"):
        list(iter_documents(spec, INGEST))


# ------------------------------------------------------------------ files source
def test_files_source_reads_txt_jsonl_parquet_and_survives_bad_utf8(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"Caf\xe9 au lait \xff\xfe is fine.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n", encoding="utf-8"
    )
    pq.write_table(pa.table({"body": ["third", None]}), tmp_path / "c.parquet")
    spec = FilesSource(source="files", glob=str(tmp_path / "*"), text_column="body")
    docs = list(iter_documents(spec, INGEST))
    assert [d.source for d in docs] == ["files:txt", "files:jsonl", "files:jsonl", "files:parquet", "files:parquet"]
    assert docs[0].repaired_utf8 and "\ufffd" in docs[0].text and docs[0].text.startswith("Caf")
    assert [d.text for d in docs[1:]] == ["first", "second", "third", None]
    assert docs[2].doc_id.endswith("b.jsonl:3")


def test_files_source_errors_name_the_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(RebmError, match=r"x.jsonl:2: no field 'text'"):
        list(iter_documents(FilesSource(source="files", glob=str(tmp_path / "*.jsonl")), INGEST))
    with pytest.raises(RebmError, match="matches no files"):
        list(iter_documents(FilesSource(source="files", glob=str(tmp_path / "*.md")), INGEST))
