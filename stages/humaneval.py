"""`rebm humaneval export|score`: the human-evaluation sheet and Table 2 (paper §4.2, A.4).

Not a DVC stage (votes come from people, after the pipeline ran): thin wiring from the
generate stage's Parquet files to pipeline.generation.humaneval and back to the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import RebmError
from pipeline.core.paths import DatasetPaths


def generations_path(dataset: str, root: Path = Path(".")) -> Path:
    """Where the `generate` stage writes one dataset's generations (one row per test prefix)."""
    return DatasetPaths(dataset, root).generations_file


def parse_pair(text: str) -> tuple[str, str]:
    """'joint:base' -> ('joint', 'base'): Table 2 reports how often the first is preferred."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 2 or not all(parts):
        raise RebmError(f"--pair {text!r}: expected MODEL_1:MODEL_2, e.g. joint:base")
    return parts[0], parts[1]


def parse_source(text: str, root: Path) -> tuple[str, Path]:
    """'news' -> (news, data/news/generations/generations.parquet); 'news=file.parquet' overrides the path."""
    name, sep, path = text.partition("=")
    if not name or (sep and not path):
        raise RebmError(f"dataset {text!r}: expected NAME or NAME=PATH")
    return name, Path(path) if sep else generations_path(name, root)


def export(
    datasets: Sequence[str],
    out: Path,
    params: Path,
    pairs: Sequence[str] | None = None,
    windows: int | None = None,
    seed: int | None = None,
    root: Path = Path("."),
) -> dict:
    from pipeline.core.config import load_seed
    from pipeline.generation.humaneval import DEFAULT_PAIRS, GOLD, export_sheet
    from pipeline.generation.resample import GENERATIONS_SCHEMA, read_generations

    if not datasets:
        raise RebmError("name at least one dataset")
    model_pairs = [parse_pair(p) for p in pairs] if pairs else list(DEFAULT_PAIRS)
    seed = load_seed(params) if seed is None else seed
    systems = sorted({s for p in model_pairs for s in p} | {GOLD})
    columns = ["window_id", "prefix_text", *(f"{s}_text" for s in systems)]
    unknown = [c for c in columns if c not in GENERATIONS_SCHEMA.names]
    if unknown:
        known = [n.removesuffix("_text") for n in GENERATIONS_SCHEMA.names
                 if n.endswith("_text") and n != "prefix_text"]
        raise RebmError(f"--pair: no generations column '{unknown[0]}'; systems are {known}")
    sources = dict(parse_source(d, root) for d in datasets)
    tables = {name: read_generations(path, columns) for name, path in sources.items()}
    summary = export_sheet(tables, out, model_pairs, seed=seed, windows_per_dataset=windows)
    return {"seed": seed, "generations": {k: str(v) for k, v in sources.items()}, **summary}


def score(votes: Sequence[Path], pairs: Path, json_out: Path | None = None):
    from pipeline.core.io import write_json
    from pipeline.generation.humaneval import score_votes

    result = score_votes(pairs, list(votes))
    if json_out is not None:
        write_json(json_out, result.to_dict())
    return result
