"""Human evaluation of generations (paper §4.2 "Human Evaluation", Table 2, Appendix A.4).

Protocol of the paper: "For each prefix, we present one completion from each model, and ask
humans to select the one that is a better continuation." (§4.2) "Every page asks for 4
comparisons, one of which we know what the ground truth answer is … we use one out of every
four comparisons as an attention check and drop responses if the turker did not pass the
check." (A.4) Table 2 reports, per model pair, the percentage of sentences whose majority
prefers one model, with a one-sided binomial p-value.

`export_sheet` writes the sheet a rater fills in (a self-contained HTML page that `humaneval_sheet` renders from
templates/sheet.html.j2 with sheet.css and sheet.js inlined; its script downloads the rater's
votes as CSV) and `pairs.csv`, the key that says which system is behind each side.
`score_votes` reads the key and the votes, drops raters who fail an attention check and
computes Table 2.

Attention checks. The paper does not say what its known-answer comparison was. It is NOT
real text vs an LM sample: the paper's own qualification task shows that even the kept raters
were only "higher than 66.67%" accurate at that, so such a check would drop honest raters.
Here a check pits the real continuation of a prefix against the same words in a shuffled
order (a "decoy"): an attentive reader always prefers the real text, a rater clicking at
random fails half of the checks. Check windows are taken from windows not used in any
comparison when there are some (`windows_per_dataset` smaller than the data), so a rater
never sees the gold text of a prefix they also judge in a model-vs-gold comparison.

Randomness (sides, order, check windows, decoys) is a counter-based hash of the seed, like the
rest of the pipeline: the same seed and data always give the same sheet.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import RebmError
from pipeline.core.io import atomic_output, write_text
from pipeline.core.seeds import humaneval_seed
from pipeline.generation.humaneval_sheet import ITEMS_PER_PAGE, render_sheet
from pipeline.sampling.sampler import sample_uniforms

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("joint", "base"), ("joint", "gold"))
ATTENTION_COMPARISON = "attention check"
GOLD, DECOY = "gold", "decoy"

# pairs.csv, one row per sheet item in display order; the 4 items of page k are rows 4k..4k+3.
# `comparison` is "<model_1> vs <model_2>" in the orientation the caller asked for (Table 2's
# rows); system_a / system_b say which system ended up on each side after randomisation.
PAIRS_COLUMNS = (
    "pair_id", "dataset", "window_id", "comparison", "prefix",
    "text_a", "text_b", "system_a", "system_b", "is_attention_check",
)
VOTES_COLUMNS = ("rater_id", "pair_id", "choice")

# Table 2 as returned by score_votes: one row per (dataset, model pair).
SCORE_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("model_1", pa.string(), nullable=False),
        pa.field("model_2", pa.string(), nullable=False),
        pa.field("items", pa.int64(), nullable=False),  # comparisons with >= 1 kept vote
        pa.field("items_preferred", pa.int64(), nullable=False),  # model_1 got strictly more votes
        pa.field("items_tied", pa.int64(), nullable=False),
        pa.field("rate", pa.float64(), nullable=False),  # items_preferred / items (paper's strict "<" rate)
        pa.field("p_value", pa.float64(), nullable=False),  # P(Bin(items, 1/2) >= items_preferred)
        pa.field("votes", pa.int64(), nullable=False),
        pa.field("votes_preferred", pa.int64(), nullable=False),
        pa.field("vote_rate", pa.float64(), nullable=False),
        pa.field("vote_p_value", pa.float64(), nullable=False),  # treats votes as independent
    ]
)


# --------------------------------------------------------------------------- randomness
def _uniforms(seed: int, labels: Sequence[str], keys: Sequence[int], n: int = 1, steps: int = 1) -> np.ndarray:
    return sample_uniforms(humaneval_seed(seed, *labels), np.asarray(keys, dtype=np.int64), n, steps)


# --------------------------------------------------------------------------- export
def _rows(dataset: str, generations: pa.Table | Sequence[Mapping[str, Any]], systems: set[str]) -> list[dict[str, Any]]:
    needed = ["window_id", "prefix_text", *sorted(f"{s}_text" for s in systems)]
    if isinstance(generations, pa.Table):
        missing = [c for c in needed if c not in generations.column_names]
        rows = generations.select([c for c in needed if c in generations.column_names]).to_pylist()
    else:
        rows = [dict(r) for r in generations]
        missing = sorted({c for r in rows for c in needed if c not in r})
    if missing:
        raise RebmError(f"generations of dataset '{dataset}': missing column '{missing[0]}' (needed: {needed})")
    seen: set[int] = set()
    for r in rows:
        wid = int(r["window_id"])
        if wid in seen:
            raise RebmError(f"generations of dataset '{dataset}': column 'window_id' repeats {wid}")
        seen.add(wid)
        for c in needed[1:]:
            if not isinstance(r[c], str):
                raise RebmError(f"generations of dataset '{dataset}': column '{c}' of window {wid} is not text")
    return sorted(rows, key=lambda r: int(r["window_id"]))


def _decoy(gold: str, seed: int, dataset: str, window_id: int) -> str | None:
    """The gold continuation's words in a hash-shuffled order (reversed if that changes nothing)."""
    words = gold.split()
    if len(set(words)) < 2:
        return None
    order = np.argsort(_uniforms(seed, ("decoy", dataset), [window_id], 1, len(words))[0, 0], kind="stable")
    candidates = [" ".join(words[i] for i in order), " ".join(reversed(words))]
    target = " ".join(words)
    return next((c for c in candidates if c != target), None)


@dataclass
class _Item:
    dataset: str
    window_id: int
    comparison: str
    prefix: str
    system_a: str
    system_b: str
    text_a: str
    text_b: str
    is_attention_check: bool


def _write_pairs_csv(path: Path, items: list[_Item], ids: list[str]) -> None:
    with atomic_output(path, directory=False) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(PAIRS_COLUMNS)
            for pair_id, it in zip(ids, items, strict=True):
                writer.writerow(
                    [pair_id, it.dataset, it.window_id, it.comparison, it.prefix, it.text_a, it.text_b,
                     it.system_a, it.system_b, int(it.is_attention_check)]
                )


def export_sheet(
    generations: Mapping[str, pa.Table | Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    seed: int = 0,
    windows_per_dataset: int | None = None,
    title: str = "Which continuation is better?",
) -> dict[str, Any]:
    """Write out_dir/pairs.csv and out_dir/sheet.html for A/B comparisons of generations.

    generations: dataset → a generations table (or a list of row dicts) with window_id,
    prefix_text and `<system>_text` for every system named in `pairs` (and gold_text, which
    the attention checks use). pairs: (model_1, model_2) comparisons, each made once per
    window; Table 2 then reports how often model_1 is preferred. windows_per_dataset: how many
    windows (a hash-random subset) to compare, the rest feed the attention checks; None = all.

    Sides are randomised per item, items are shuffled, and every page of 4 items holds 3
    comparisons and 1 attention check at a random position (see the module docstring).
    Returns a summary (counts and the written paths).
    """
    if not generations:
        raise RebmError("no generations to export")
    pairs = _checked_pairs(pairs, windows_per_dataset)
    systems = {s for p in pairs for s in p} | {GOLD}
    real: list[tuple[float, str, int, int, _Item]] = []
    check_pools: dict[str, list[dict[str, Any]]] = {}
    reused: list[str] = []  # datasets whose checks reuse compared windows
    for dataset, table in generations.items():
        items, check_pools[dataset], reuses = _dataset_items(dataset, _rows(dataset, table, systems), pairs, seed,
                                                             windows_per_dataset)
        real.extend(items)
        if reuses:
            reused.append(dataset)
    real.sort(key=lambda t: t[:4])
    comparisons = [t[4] for t in real]
    sheet, n_pages = _paginate(comparisons, check_pools, seed)
    ids = [f"q{i + 1:05d}" for i in range(len(sheet))]
    pairs_csv, sheet_html = _write_sheet(Path(out_dir), sheet, ids, seed, title)
    counts: dict[str, int] = {}
    for it in comparisons:
        key = f"{it.dataset}: {it.comparison}"
        counts[key] = counts.get(key, 0) + 1
    return {
        "items": len(sheet),
        "comparisons": counts,
        "attention_checks": len(sheet) - len(comparisons),
        "pages": n_pages,
        # "reused" means a rater may see the gold text of a prefix they also judge: pass a
        # smaller windows_per_dataset to hold windows out for the checks.
        "attention_check_windows": {d: "reused" if d in reused else "held out" for d in check_pools},
        "pairs_csv": str(pairs_csv),
        "sheet_html": str(sheet_html),
    }


def _checked_pairs(pairs: Sequence[tuple[str, str]], windows_per_dataset: int | None) -> list[tuple[str, str]]:
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise RebmError("no model pairs to compare")
    for p in pairs:
        if len(p) != 2 or p[0] == p[1] or DECOY in p or any(not s or " vs " in s for s in p):
            raise RebmError(f"model pair {p!r}: expected two different, non-empty system names (not '{DECOY}')")
    if len(set(pairs)) != len(pairs):
        raise RebmError(f"model pairs repeat: {pairs}")
    if windows_per_dataset is not None and windows_per_dataset < 1:
        raise RebmError(f"windows_per_dataset must be >= 1, got {windows_per_dataset}")
    return pairs


def _dataset_items(dataset: str, rows: list[dict[str, Any]], pairs: list[tuple[str, str]], seed: int,
                   windows_per_dataset: int | None) -> tuple[list[tuple[float, str, int, int, _Item]], list, bool]:
    """One dataset's comparisons (each with its sort key), its attention-check pool, and whether
    that pool reuses compared windows (none were held out)."""
    if not rows:
        raise RebmError(f"generations of dataset '{dataset}': no rows")
    pick = _uniforms(seed, ("windows", dataset), [int(r["window_id"]) for r in rows])[:, 0, 0]
    ranked = [rows[i] for i in np.argsort(pick, kind="stable")]
    keep = len(ranked) if windows_per_dataset is None else min(windows_per_dataset, len(ranked))
    compared, held_out = ranked[:keep], ranked[keep:]
    compared_ids = [int(r["window_id"]) for r in compared]
    side = _uniforms(seed, ("side", dataset), compared_ids, len(pairs))[:, :, 0]
    order = _uniforms(seed, ("order", dataset), compared_ids, len(pairs))[:, :, 0]
    items = []
    for w, r in enumerate(compared):
        for j, (m1, m2) in enumerate(pairs):
            a, b = (m2, m1) if side[w, j] < 0.5 else (m1, m2)
            item = _Item(dataset, compared_ids[w], f"{m1} vs {m2}", r["prefix_text"], a, b,
                         r[f"{a}_text"], r[f"{b}_text"], False)
            items.append((float(order[w, j]), dataset, compared_ids[w], j, item))
    return items, held_out or compared, not held_out  # reuse compared windows only if none are left


def _paginate(comparisons: list[_Item], check_pools: dict[str, list[dict[str, Any]]],
              seed: int) -> tuple[list[_Item], int]:
    """One attention check per page of ITEMS_PER_PAGE − 1 comparisons, cycling through each
    dataset's pool; the check's dataset is that of the page's first comparison."""
    per_page = ITEMS_PER_PAGE - 1
    next_check = {d: 0 for d in check_pools}
    sheet: list[_Item] = []
    n_pages = -(-len(comparisons) // per_page)
    for page in range(n_pages):
        chunk = comparisons[page * per_page : (page + 1) * per_page]
        check = _attention_item(chunk[0].dataset, check_pools, next_check, seed, page)
        position = int(_uniforms(seed, ("check-position",), [page])[0, 0, 0] * (len(chunk) + 1))
        sheet.extend(chunk[:position] + [check] + chunk[position:])
    return sheet, n_pages


def _write_sheet(out_dir: Path, sheet: list[_Item], ids: list[str], seed: int, title: str) -> tuple[Path, Path]:
    pairs_csv, sheet_html = out_dir / "pairs.csv", out_dir / "sheet.html"
    _write_pairs_csv(pairs_csv, sheet, ids)
    # The sheet id keys the rater's saved answers in the browser: another sheet must not reuse them.
    sheet_id = humaneval_seed(seed, "sheet",
                              *(f"{it.dataset}/{it.window_id}/{it.system_a}/{it.system_b}" for it in sheet))
    write_text(sheet_html, render_sheet(sheet, ids, title, sheet_id))
    return pairs_csv, sheet_html


def _attention_item(
    dataset: str, pools: dict[str, list[dict[str, Any]]], cursor: dict[str, int], seed: int, page: int
) -> _Item:
    pool = pools[dataset]
    for _ in range(len(pool)):
        row = pool[cursor[dataset] % len(pool)]
        cursor[dataset] += 1
        wid = int(row["window_id"])
        decoy = _decoy(row["gold_text"], seed, dataset, wid)
        if decoy is None:
            continue
        gold_first = _uniforms(seed, ("check-side",), [page])[0, 0, 0] < 0.5
        a, b = (GOLD, DECOY) if gold_first else (DECOY, GOLD)
        texts = {GOLD: row["gold_text"], DECOY: decoy}
        return _Item(dataset, wid, ATTENTION_COMPARISON, row["prefix_text"], a, b, texts[a], texts[b], True)
    raise RebmError(
        f"generations of dataset '{dataset}': no gold continuation with two distinct words to build an attention check"
    )


# --------------------------------------------------------------------------- scoring
def binomial_p_value(successes: int, trials: int) -> float:
    """One-sided binomial test, H0: p = 1/2 vs p > 1/2: P(X >= successes), X ~ Bin(trials, 1/2).

    Exact: Σ_{i>=k} C(n, i) / 2^n in integer arithmetic, one rounding at the end.
    """
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if successes == 0:
        return 1.0
    term = 1  # C(n, n), walked down to C(n, k)
    tail = 0
    for i in range(trials, successes - 1, -1):
        tail += term
        term = term * i // (trials - i + 1)
    return tail / (1 << trials)


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file whose header has every `required` column."""
    if not path.exists():
        raise RebmError(f"{path}: not found ({what})")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        for column in required:
            if column not in header:
                raise RebmError(f"{path}: missing column '{column}' ({what}; header: {header})")
        reader.fieldnames = header
        return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]


@dataclass
class _Pair:
    dataset: str
    comparison: str
    system_a: str
    system_b: str
    is_attention_check: bool


def read_pairs(path: str | Path) -> dict[str, _Pair]:
    """pairs.csv as pair_id → key, validated (errors name the file, line and column)."""
    path = Path(path)
    pairs: dict[str, _Pair] = {}
    columns = ("pair_id", "dataset", "comparison", "system_a", "system_b", "is_attention_check")
    for line, row in _read_csv(path, columns, "the key written by `rebm humaneval export`"):
        flag = row["is_attention_check"].lower()
        if flag not in ("0", "1", "true", "false"):
            raise RebmError(f"{path}: line {line}: column 'is_attention_check' must be 0 or 1, got {flag!r}")
        pid = row["pair_id"]
        if not pid or pid in pairs:
            raise RebmError(f"{path}: line {line}: column 'pair_id' is empty or repeats {pid!r}")
        check = flag in ("1", "true")
        if check and {row["system_a"], row["system_b"]} != {GOLD, DECOY}:
            raise RebmError(f"{path}: line {line}: an attention check must pit '{GOLD}' against '{DECOY}'")
        if not check and " vs " not in row["comparison"]:
            raise RebmError(f"{path}: line {line}: column 'comparison' must read '<model_1> vs <model_2>'")
        pairs[pid] = _Pair(row["dataset"], row["comparison"], row["system_a"], row["system_b"], check)
    return pairs


def read_votes(paths: str | Path | Sequence[str | Path], pairs: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(rater_id, pair_id, choice A|B) per vote from one or more CSV files (e.g. one per rater,
    as the sheet downloads them), validated against the key's pair ids; a rater may vote on a
    pair only once across all files."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise RebmError("no votes file given")
    votes = []
    first_seen: dict[tuple[str, str], str] = {}
    for path in paths:
        for line, row in _read_csv(path, VOTES_COLUMNS, "columns rater_id, pair_id, choice (A or B)"):
            rater, pid, choice = row["rater_id"], row["pair_id"], row["choice"].upper()
            if not rater:
                raise RebmError(f"{path}: line {line}: column 'rater_id' is empty")
            if pid not in pairs:
                raise RebmError(f"{path}: line {line}: column 'pair_id' has {pid!r}, which is not in the pairs file")
            if choice not in ("A", "B"):
                raise RebmError(f"{path}: line {line}: column 'choice' must be A or B, got {row['choice']!r}")
            if (rater, pid) in first_seen:
                raise RebmError(
                    f"{path}: line {line}: rater {rater!r} already voted on {pid!r} at {first_seen[rater, pid]}"
                )
            first_seen[rater, pid] = f"{path}: line {line}"
            votes.append((rater, pid, choice))
    if not votes:
        raise RebmError(f"{', '.join(map(str, paths))}: no votes")
    return votes


@dataclass
class HumanEvalScore:
    """Table 2 plus who was dropped. `table` follows SCORE_SCHEMA."""

    table: pa.Table
    raters: list[str]  # every rater in the votes file
    failed_check: list[str] = field(default_factory=list)  # answered an attention check wrongly
    no_check: list[str] = field(default_factory=list)  # answered no attention check: unverified
    votes_used: int = 0

    @property
    def kept(self) -> list[str]:
        dropped = set(self.failed_check) | set(self.no_check)
        return [r for r in self.raters if r not in dropped]

    def to_dict(self) -> dict[str, Any]:
        return {
            "raters": len(self.raters),
            "raters_kept": len(self.kept),
            "raters_failed_check": self.failed_check,
            "raters_without_check": self.no_check,
            "votes_used": self.votes_used,
            "table": self.table.to_pylist(),
        }

    def markdown(self) -> str:
        lines = [
            f"Raters: {len(self.kept)} kept of {len(self.raters)} "
            f"({len(self.failed_check)} failed an attention check, {len(self.no_check)} answered none); "
            f"{self.votes_used} comparison votes used.",
            "",
            "| Dataset | Model 1 | Model 2 | Model 1 preferred | p-value | items (ties) "
            "| votes for Model 1 | p-value (votes) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.table.to_pylist():
            lines.append(
                f"| {r['dataset']} | {r['model_1']} | {r['model_2']} | {100 * r['rate']:.2f}% | {r['p_value']:.2g} "
                f"| {r['items']} ({r['items_tied']}) "
                f"| {r['votes_preferred']}/{r['votes']} ({100 * r['vote_rate']:.2f}%) "
                f"| {r['vote_p_value']:.2g} |"
            )
        lines += [
            "",
            "Model 1 preferred: share of comparisons whose kept votes favour Model 1 strictly (ties count "
            "against it, Table 2's '<'); p-values: one-sided binomial test, H0 p = 1/2 vs p > 1/2.",
        ]
        return "\n".join(lines) + "\n"


def score_votes(pairs_csv: str | Path, votes_csv: str | Path | Sequence[str | Path]) -> HumanEvalScore:
    """Table 2 from a votes file: drop raters who fail attention checks, then per model pair
    the preference rate of model_1 and its one-sided binomial p-value.

    A rater is dropped if they chose the decoy in any attention check, or answered no
    attention check at all (A.4: responses are dropped "if the turker did not pass the
    check"). For each comparison the kept votes are counted per side; as in Table 2 the rate
    is the share of comparisons (with >= 1 kept vote) where model_1 gets strictly more votes
    than model_2 (dropped votes can leave ties, which count against model_1), tested with
    P(Bin(items, 1/2) >= preferred). The vote-level share and p-value are reported too; they
    coincide with the item-level ones when each comparison has one rater. `votes_csv` may be
    several files (one per rater).
    """
    pairs = read_pairs(pairs_csv)
    votes = read_votes(votes_csv, pairs)
    raters = list(dict.fromkeys(r for r, _, _ in votes))
    checks_answered: dict[str, int] = {r: 0 for r in raters}
    failed: set[str] = set()
    for rater, pid, choice in votes:
        key = pairs[pid]
        if key.is_attention_check:
            checks_answered[rater] += 1
            if (key.system_a if choice == "A" else key.system_b) != GOLD:
                failed.add(rater)
    failed_check = [r for r in raters if r in failed]
    no_check = [r for r in raters if checks_answered[r] == 0 and r not in failed]
    dropped = failed | set(no_check)

    # per item: votes for model_1, votes for model_2
    tallies: dict[str, list[int]] = {}
    used = 0
    for rater, pid, choice in votes:
        key = pairs[pid]
        if key.is_attention_check or rater in dropped:
            continue
        model_1, model_2 = key.comparison.split(" vs ", 1)
        chosen = key.system_a if choice == "A" else key.system_b
        if chosen not in (model_1, model_2):
            raise RebmError(f"{pairs_csv}: pair {pid!r} shows {chosen!r}, not one of {key.comparison!r}")
        tally = tallies.setdefault(pid, [0, 0])
        tally[chosen != model_1] += 1
        used += 1

    groups: dict[tuple[str, str, str], list[list[int]]] = {}
    for pid, tally in tallies.items():
        key = pairs[pid]
        model_1, model_2 = key.comparison.split(" vs ", 1)
        groups.setdefault((key.dataset, model_1, model_2), []).append(tally)
    rows: dict[str, list[Any]] = {f.name: [] for f in SCORE_SCHEMA}
    for (dataset, model_1, model_2), tallies_of_group in sorted(groups.items()):
        items = len(tallies_of_group)
        preferred = sum(a > b for a, b in tallies_of_group)
        tied = sum(a == b for a, b in tallies_of_group)
        n_votes = sum(a + b for a, b in tallies_of_group)
        votes_1 = sum(a for a, _ in tallies_of_group)
        for name, value in (
            ("dataset", dataset), ("model_1", model_1), ("model_2", model_2), ("items", items),
            ("items_preferred", preferred), ("items_tied", tied), ("rate", preferred / items),
            ("p_value", binomial_p_value(preferred, items)), ("votes", n_votes), ("votes_preferred", votes_1),
            ("vote_rate", votes_1 / n_votes), ("vote_p_value", binomial_p_value(votes_1, n_votes)),
        ):
            rows[name].append(value)
    return HumanEvalScore(
        table=pa.Table.from_pydict(rows, schema=SCORE_SCHEMA),
        raters=raters,
        failed_check=failed_check,
        no_check=no_check,
        votes_used=used,
    )

