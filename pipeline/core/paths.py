"""Where every artifact lives; dvc.yaml declares the same paths as stage outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache of fetched corpora and built models: $REBM_CACHE, else
    $XDG_CACHE_HOME/rebm, else ~/.cache/rebm."""
    if os.environ.get("REBM_CACHE"):
        return Path(os.environ["REBM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rebm"


class DatasetPaths:
    def __init__(self, dataset: str, root: Path = Path(".")):
        self.dataset = dataset
        self.data = Path(root) / "data" / dataset
        self.models = Path(root) / "models" / dataset
        self.results = Path(root) / "results" / dataset

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

    def lm(self, variant: str) -> Path:
        """A trained causal LM (`base`, `balm`, `ralm`): a save_pretrained directory with its tokenizer."""
        return self.models / "lm" / variant

    def lm_metrics(self, variant: str) -> Path:
        return self.models / "lm" / f"{variant}_metrics.json"

    def lm_live(self, variant: str) -> Path:
        """Learning curve as a dvclive folder: plots/metrics/<name>.tsv (step, value) for train_loss,
        valid_loss, lr, tokens_per_s, ... and metrics.json (the last validation); DVC plots."""
        return self.models / "lm" / f"{variant}_live"

    def lm_checkpoint(self, variant: str) -> Path:
        """Resumable training state while a run is in progress; deleted when training completes."""
        return self.models / "lm" / f".{variant}.tmp-checkpoint"

    @property
    def negatives(self) -> Path:
        """LM samples per prefix: negatives/<split>/shard-00000.parquet … plus manifest.json."""
        return self.data / "negatives"

    def negatives_split(self, split: str) -> Path:
        return self.negatives / split

    @property
    def negatives_stats(self) -> Path:
        return self.data / "negatives_stats.json"

    @property
    def mlm(self) -> Path:
        """The BIT body pretrained as a masked LM (stage pretrain_mlm): save_pretrained + tokenizer."""
        return self.models / "mlm"

    @property
    def mlm_metrics(self) -> Path:
        return self.models / "mlm_metrics.json"

    @property
    def mlm_live(self) -> Path:
        return self.models / "mlm_live"

    @property
    def mlm_checkpoint(self) -> Path:
        return self.models / ".mlm.tmp-checkpoint"

    def energy(self, variant: str) -> Path:
        """A trained energy model (`unit`, `bit`, `bit_star`): save_pretrained + its tokenizer."""
        return self.models / "energy" / variant

    def energy_metrics(self, variant: str) -> Path:
        return self.models / "energy" / f"{variant}_metrics.json"

    def energy_live(self, variant: str) -> Path:
        return self.models / "energy" / f"{variant}_live"

    def energy_checkpoint(self, variant: str) -> Path:
        """Resumable NCE training state while a run is in progress; deleted when it completes."""
        return self.models / "energy" / f".{variant}.tmp-checkpoint"

    @property
    def evaluation(self) -> Path:
        """Stage evaluate's outputs: metrics.json, table1.md and the figures' TSVs."""
        return self.results / "evaluation"

    @property
    def evaluation_checkpoint(self) -> Path:
        """Finished parts of an interrupted evaluate run (LM log-probs, samples, energies)."""
        return self.results / ".evaluation.tmp-checkpoint"

    @property
    def generations(self) -> Path:
        """Stage generate's samples: generations.parquet, one row per test prefix (GENERATIONS_SCHEMA)."""
        return self.data / "generations"

    @property
    def generations_file(self) -> Path:
        return self.generations / "generations.parquet"

    @property
    def generation_results(self) -> Path:
        """Stage generate's analyses: metrics.json, unique_ngrams.tsv, density_*.tsv, examples.md."""
        return self.results / "generation"

    @property
    def generation_checkpoint(self) -> Path:
        return self.results / ".generation.tmp-checkpoint"

    @property
    def stepwise_file(self) -> Path:
        """Stage stepwise's estimates: one row per context and candidate (CANDIDATES_SCHEMA)."""
        return self.data / "stepwise" / "candidates.parquet"

    @property
    def stepwise_results(self) -> Path:
        """Stage stepwise's Table 3 (table3.md) and the repetition claim (metrics.json)."""
        return self.results / "stepwise"

    @property
    def stepwise_checkpoint(self) -> Path:
        return self.results / ".stepwise.tmp-checkpoint"


class ReportPaths:
    """Stage report's outputs (reports/report.md, report.html, figures/) and the human-eval files it reads."""

    def __init__(self, root: Path = Path(".")):
        self.reports = Path(root) / "reports"

    @property
    def markdown(self) -> Path:
        return self.reports / "report.md"

    @property
    def html(self) -> Path:
        """The same report as one self-contained page (inline CSS, figures as data URIs)."""
        return self.reports / "report.html"

    @property
    def figures(self) -> Path:
        """Figures 1–3 per dataset as PNG (report.md links them; report.html inlines them)."""
        return self.reports / "figures"

    @property
    def humaneval(self) -> Path:
        """`rebm humaneval export` writes sheet.html and pairs.csv here; raters' CSVs go in votes/."""
        return self.reports / "humaneval"

    @property
    def humaneval_pairs(self) -> Path:
        return self.humaneval / "pairs.csv"

    @property
    def humaneval_votes(self) -> Path:
        return self.humaneval / "votes"
