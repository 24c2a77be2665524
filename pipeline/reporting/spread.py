"""The report's run-to-run spread: each Table 1 row over k seeds (results/seed_spread.json,
written by `rebm seeds collect`, pipeline/tools/seeds.py), beside the interval over documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import RebmError
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS, display_name

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


def table1_rows(metrics: dict) -> dict[str, float]:
    """The numbers of one dataset's Table 1 (evaluate's metrics.json): every LM's perplexity and
    each joint model's range ends."""
    rows = {f"{v} ppl": float(m["ppl"]) for v, m in metrics.get("perplexity", {}).items()}
    for v, m in metrics.get("joint", {}).items():
        rows[f"{v} ppl_low"], rows[f"{v} ppl_high"] = float(m["ppl_low"]), float(m["ppl_high"])
    return rows


def row_order(row: str) -> tuple[int, int]:
    """Table 1's order: the LMs, then the joint models, each T_n end before its U_n end."""
    variant, _, end = row.partition(" ")
    order = [*LM_VARIANTS, *ENERGY_VARIANTS]
    return (order.index(variant) if variant in order else len(order), ["ppl", "ppl_low", "ppl_high"].index(end))


def _row_label(row: str) -> str:
    variant, _, end = row.partition(" ")
    return {"ppl": display_name(variant), "ppl_low": f"{display_name(variant)}, T_n end",
            "ppl_high": f"{display_name(variant)}, U_n end"}[end]


def matches_current(spread: dict, evaluations: dict[str, dict]) -> bool:
    """Whether the spread's run of the workspace seed is this report's run: every row's value for
    that seed equals the current metrics (else the spread is from older code or data)."""
    own = str(spread.get("workspace_seed"))
    for dataset, rows in spread["rows"].items():
        current = table1_rows(evaluations.get(dataset, {}))
        for row, s in rows.items():
            if own not in s["values"] or row not in current or round(current[row], 3) != s["values"][own]:
                return False
    return True


def _machine(machine: dict) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, cpu, precision auto = bf16' from `machine_description`."""
    if not machine:
        return "a machine not recorded"
    parts = [machine.get("cpu", "unknown CPU"), f"{machine.get('cores', '?')} cores", machine.get("device", "?"),
             f"precision auto = {machine.get('precision_auto', '?')}"]
    return ", ".join(str(p) for p in parts)


def spread_section(spread: dict | None, evaluations: dict[str, dict]) -> dict[str, Any]:
    """Rows (dataset, row, each seed's value, min–max, range as % of the mean) and the notes that
    say what the spread covers, on which machine and at which commit."""
    if spread is None:
        return {"rows": [], "measured": False}
    seeds = [str(s) for s in spread["seeds"]]
    rows = []
    for dataset, table in spread["rows"].items():
        for row, s in sorted(table.items(), key=lambda item: row_order(item[0])):
            values = " / ".join(f"{s['values'][k]:.2f}" for k in seeds)
            next_run = f"{s['next_run'][0]:.2f}–{s['next_run'][1]:.2f}" if "next_run" in s else "not computed"
            rows.append([dataset, _row_label(row), values, f"{s['min']:.2f}–{s['max']:.2f}",
                         f"{s['range']:.2f} ({s['range_pct_of_mean']:.2f} %)", next_run])
    machine = spread.get("machine") or {}
    commit = spread.get("commit", "?")
    return {"rows": rows, "measured": True, "seeds": ", ".join(seeds), "covers": spread.get("covers", ""),
            "workspace_seed": spread.get("workspace_seed", "?"),
            "machine": _machine(machine),
            "commit": commit[:8], "current": matches_current(spread, evaluations)}
