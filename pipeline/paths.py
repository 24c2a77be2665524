"""Where every artifact lives; dvc.yaml declares the same paths as stage outputs."""

from __future__ import annotations

from pathlib import Path


class DatasetPaths:
    def __init__(self, dataset: str, root: Path = Path(".")):
        self.dataset = dataset
        self.data = Path(root) / "data" / dataset
        self.models = Path(root) / "models" / dataset

    @property
    def docs(self) -> Path:
        return self.data / "docs"

    @property
    def ingest_stats(self) -> Path:
        return self.data / "ingest_stats.json"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def windows(self) -> Path:
        return self.data / "windows"

    @property
    def tokenize_stats(self) -> Path:
        return self.data / "tokenize_stats.json"

    def docs_split(self, split: str) -> Path:
        return self.docs / f"{split}.parquet"

    def windows_split(self, split: str) -> Path:
        return self.windows / f"{split}.parquet"
