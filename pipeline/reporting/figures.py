"""The report's figures, drawn with matplotlib (Agg) as PNG bytes: Figure 1 (per-position gain
over BASE LM, Eq. 5), Figure 2 left (the range against the number of samples) and right (unique
n-grams), Figure 3 (log-likelihood densities under the base LM and under the joint model)."""

from __future__ import annotations

import io
import math
from typing import Any

from pipeline.core.variants import ENERGY_VARIANTS, display_name
from pipeline.reporting.inputs import DatasetResults, ReportInputs

SOURCE_COLOURS = {"real": "tab:red", "base": "black", "joint": "tab:green"}  # as in the paper's Figure 3
SOURCE_NAMES = {"real": "real text", "base": "BASE LM samples", "joint": "joint-model samples"}


def figure_names(dataset: str) -> dict[str, str]:
    return {k: f"{k}_{dataset}.png" for k in ("fig1", "fig2_left", "fig2_right", "fig3")}


def _new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labels, title, legend and grid of a one-panel figure, as PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _energies_in(rows: list[dict[str, Any]], suffix: str) -> list[str]:
    found = {k.removesuffix(suffix) for row in rows[:1] for k in row if k.endswith(suffix)}
    return [e for e in ENERGY_VARIANTS if e in found] + sorted(found - set(ENERGY_VARIANTS))


def _energy_colour(variant: str) -> str:
    colours = {"unit": "tab:blue", "bit": "tab:orange", "bit_star": "tab:purple", "bit_large": "tab:red"}
    return colours.get(variant, "tab:gray")


def figure1(d: DatasetResults) -> bytes:
    """Per-position perplexity gain over BASE LM (Eq. 5), shaded between the bounds; the exact
    last position (and the estimate on the same windows) marked when evaluate computed it."""
    import numpy as np

    fig, (ax,) = _new_figure()
    x = np.array([r["position"] for r in d.positions], float)
    base = np.array([r["base_ppl"] for r in d.positions], float)
    for e in _energies_in(d.positions, "_gain_low"):
        low = np.array([r[f"{e}_gain_low"] for r in d.positions], float)
        high = np.array([r[f"{e}_gain_high"] for r in d.positions], float)
        colour = _energy_colour(e)
        ax.fill_between(x, low, high, color=colour, alpha=0.25, linewidth=0)
        ax.plot(x, high, color=colour, linewidth=1, label=f"{display_name(e)} (gain range)")
        ax.plot(x, low, color=colour, linewidth=1)
        if d.positions and f"{e}_converged" in d.positions[0]:
            # Positions whose LM-sample expectations failed the log Z rule: the range there is not evidence.
            open_ = np.array([not r[f"{e}_converged"] for r in d.positions])
            if open_.any():
                ax.plot(x[open_], ((low + high) / 2)[open_], marker="x", color="grey", linestyle="none",
                        label=f"{display_name(e)}: not converged at this position")
        last = d.evaluation.get("positions", {}).get(e, {}).get("last_position", {})
        if "exact_ppl" in last:
            ref = last["base_ppl_on_exact_windows"]
            at = x[-1] + 0.35
            est = (ref - last["estimated_ppl_high_on_exact_windows"], ref - last["estimated_ppl_low_on_exact_windows"])
            ax.errorbar([at], [sum(est) / 2], yerr=[[sum(est) / 2 - est[0]], [est[1] - sum(est) / 2]],
                        fmt="none", ecolor=colour, capsize=4, linewidth=2)
            ax.plot([at], [ref - last["exact_ppl"]], marker="*", markersize=12, color=colour, linestyle="none",
                    markeredgecolor="black",
                    label=f"{display_name(e)} exact, last position ({last.get('exact_windows', '?')} windows)")
    ax.axhline(0, color="black", linewidth=0.8)
    finite = base[np.isfinite(base)]
    # symlog: with few samples per position the bounds are heavy-tailed (U_n especially); the
    # linear part spans about a tenth of the BASE LM's perplexity, rounded to a power of ten.
    scale = 0.1 * float(np.median(finite)) if finite.size else 1.0
    ax.set_yscale("symlog", linthresh=10.0 ** round(math.log10(scale)) if scale > 0 else 1.0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "position t of the window (continuation tokens only)",
                   "BASE LM ppl − joint ppl at t (symlog)",
                   f"Figure 1 — {d.name}: perplexity gain over BASE LM per position")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def figure2_left(d: DatasetResults) -> bytes:
    """The joint-model perplexity range against the number of LM samples per prefix (log x), out
    to the largest n evaluated; an energy evaluated with fewer samples stops at its own n."""
    fig, (ax,) = _new_figure()
    samples = [r["samples"] for r in d.ppl_vs_samples]
    for e in _energies_in(d.ppl_vs_samples, "_ppl_low"):
        # Rows beyond this energy's n_eval hold empty cells ("" or nan): skip them.
        rows = [r for r in d.ppl_vs_samples if _finite(r[f"{e}_ppl_low"]) and _finite(r[f"{e}_ppl_high"])]
        n = [r["samples"] for r in rows]
        low = [r[f"{e}_ppl_low"] for r in rows]
        high = [r[f"{e}_ppl_high"] for r in rows]
        colour = _energy_colour(e)
        ax.fill_between(n, low, high, color=colour, alpha=0.25, linewidth=0)
        ax.plot(n, high, color=colour, marker="v", markersize=4, linewidth=1, label=f"{display_name(e)} upper (U_n)")
        ax.plot(n, low, color=colour, marker="^", markersize=4, linewidth=1, label=f"{display_name(e)} lower (T_n)")
    base = d.evaluation.get("perplexity", {}).get("base", {}).get("ppl")
    if base is not None:
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"BASE LM ({base:.2f})")
    ax.set_xscale("log", base=2)
    if samples:
        ax.set_xticks(samples, [str(s) for s in samples])
        ax.minorticks_off()
    return _finish(fig, ax, "LM samples per prefix (n)", "test perplexity",
                   f"Figure 2 (left) — {d.name}: joint perplexity range vs samples")


def figure2_right(d: DatasetResults) -> bytes:
    """Percentage of unique n-grams in real text, BASE LM samples and joint samples."""
    fig, (ax,) = _new_figure()
    ns = [r["n"] for r in d.unique_ngrams]
    sources = [s for s in ("real", "base", "joint") if d.unique_ngrams and s in d.unique_ngrams[0]]
    width = 0.8 / max(1, len(sources))
    for i, s in enumerate(sources):
        xs = [n + (i - (len(sources) - 1) / 2) * width for n in ns]
        ax.bar(xs, [r[s] for r in d.unique_ngrams], width=width, color=SOURCE_COLOURS[s], label=SOURCE_NAMES[s],
               alpha=0.85)
    values = [r[s] for r in d.unique_ngrams for s in sources]
    if values:
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values)) + 2)
    ax.set_xticks(ns, [f"{n}-grams" for n in ns])
    ax.set_ylabel("unique n-grams (%)")
    ax.set_title(f"Figure 2 (right) — {d.name}: unique n-grams per continuation", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(sources))
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def figure3(d: DatasetResults) -> bytes:
    """Densities of sequence log-likelihoods of real/base/joint continuations under the base LM
    (left) and under the joint model (right), means dashed, gaps to real text in the legend."""
    fig, axes = _new_figure(width=10, height=4, ncols=2)
    titles = {"base_lm": "scored by BASE LM", "joint": "scored by the joint model (up to log Z)"}
    for ax, scorer in zip(axes, ("base_lm", "joint"), strict=True):
        rows = d.density[scorer]
        stats = d.generation.get("loglik_density", {}).get(scorer, {})
        x = [r["loglik"] for r in rows]
        for s in ("real", "base", "joint"):
            if not rows or s not in rows[0]:
                continue
            mean = stats.get("sources", {}).get(s, {}).get("mean")
            gap = stats.get("mean_gap", {}).get(s)
            label = SOURCE_NAMES[s] + (f", gap to real {gap:.2f}" if gap is not None else "")
            ax.plot(x, [r[s] for r in rows], color=SOURCE_COLOURS[s], linewidth=1.5, drawstyle="steps-mid", label=label)
            if mean is not None:
                ax.axvline(mean, color=SOURCE_COLOURS[s], linestyle="--", linewidth=1)
        gaps = stats.get("mean_gap", {})
        suffix = ""
        if {"base", "joint"} <= set(gaps):
            suffix = f"\nmean gap real−base {gaps['base']:.2f}, real−joint {gaps['joint']:.2f}"
        ax.set_title(f"{titles[scorer]}{suffix}", fontsize=9)
        ax.set_xlabel("sequence log-likelihood of the continuation")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Figure 3 — {d.name}: log-likelihood densities", fontsize=10)
    return _png(fig)


def make_figures(inputs: ReportInputs) -> dict[str, bytes]:
    """Every figure of every dataset as PNG bytes, keyed by file name (see figure_names).
    Figure 1 is left out for a dataset evaluated without per-position estimates."""
    figures = {}
    for d in inputs.datasets:
        names = figure_names(d.name)
        if d.positions:
            figures[names["fig1"]] = figure1(d)
        figures[names["fig2_left"]] = figure2_left(d)
        figures[names["fig2_right"]] = figure2_right(d)
        figures[names["fig3"]] = figure3(d)
    return figures
