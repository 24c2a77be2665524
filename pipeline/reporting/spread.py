"""The report's run-to-run spread: each Table 1 row over k seeds (results/seed_spread.json,
written by `rebm seeds collect`, pipeline/tools/seeds.py), beside the interval over documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import RebmError
from pipeline.core.variants import display_name

SPREAD_FILE = Path("results/seed_spread.json")  # pipeline.tools.seeds writes it


def load_spread(root: Path = Path(".")) -> dict | None:
    """The measured spread, or None where no sweep was collected (a bad file is an error)."""
    path = root / SPREAD_FILE
    if not path.exists():
        return None
    try:
        spread = json.loads(path.read_text(encoding="utf-8"))
        spread["rows"], spread["seeds"]  # noqa: B018  (the two keys every use needs)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RebmError(f"{path}: not a seed spread written by `rebm seeds collect` ({exc})") from None
    return spread


def _row_label(row: str) -> str:
    variant, _, end = row.partition(" ")
    return {"ppl": display_name(variant), "ppl_low": f"{display_name(variant)}, T_n end",
            "ppl_high": f"{display_name(variant)}, U_n end"}[end]


def spread_section(spread: dict | None, git_revision: str) -> dict[str, Any]:
    """Rows (dataset, row, each seed's value, min–max, range as % of the mean) and the notes that
    say what the spread covers, on which machine and at which commit."""
    if spread is None:
        return {"rows": [], "measured": False}
    seeds = [str(s) for s in spread["seeds"]]
    rows = []
    for dataset, table in spread["rows"].items():
        for row, s in table.items():
            values = " / ".join(f"{s['values'][k]:.2f}" for k in seeds)
            rows.append([dataset, _row_label(row), values, f"{s['min']:.2f}–{s['max']:.2f}",
                         f"{s['range']:.2f} ({s['range_pct_of_mean']:.2f} %)"])
    machine = spread.get("machine") or {}
    commit = spread.get("commit", "?")
    return {"rows": rows, "measured": True, "seeds": ", ".join(seeds), "covers": spread.get("covers", ""),
            "machine": ", ".join(f"{k} {v}" for k, v in machine.items()) or "not recorded",
            "commit": commit[:8], "same_commit": git_revision.startswith(commit[:8]) or commit.startswith(git_revision)}
