"""The report of a finished run (stage `report`): reports/report.md and a self-contained report.html.

What it shows, for every dataset under `datasets:` in params.yaml:

* Table 1: test perplexity of every LM (exact) and joint model (the [T_n, U_n] range of Eq. 4,
  with whether its log Z estimate converged), the datasets side by side; the reference points
  beside it (bootstrap intervals of the ratio to BASE LM, the self-normalised perplexity) and
  the last-position check of Figure 1 (estimate vs exact);
* the paper's claims, each checked on these numbers (pipeline.reporting.claims);
* Figure 1 (per-position gain over BASE LM, Eq. 5), Figure 2 left (the range against the
  number of samples) and right (unique n-grams), Figure 3 (log-likelihood densities under the
  base LM and under the joint model), drawn with matplotlib (Agg) as PNG;
* the §4.3 sample statistics (and, when results/<ds>/generation/baseline_metrics.json exists,
  how they moved from that earlier run), example generations in the layout of Tables 5–6,
  Table 2 when a votes file exists (else how to make one), every stage's wall time and the
  provenance (the working tree is dirty only for code and params, not for pipeline outputs).

Three steps, each pure apart from reading files, each in its own module of pipeline/reporting:
`collect` (inputs.py, provenance.py) gathers the stages' outputs into a `ReportInputs`,
`make_figures` (figures.py) draws the PNGs, `render_markdown` / `render_html` (render.py) write
the page from the sections' context (table1.py: Table 1, the only place its rows are built;
sections.py: the rest; cells.py: escaping and number cells). The HTML is the Markdown converted
by markdown-it-py, with the PNGs inlined as base64 data URIs and inline CSS: one file, no
external resource. This module is the entry point: `collect` and `build`.

The document text lives in Jinja2 templates next to this module, in templates/: report.md.j2
is the Markdown skeleton (headings, fixed paragraphs, figure captions, the order of sections),
filled from the _*.md.j2 partials (one per larger section, _macros.md.j2 the table and figure
blocks), and report.html.j2 is the HTML page with its CSS. The modules above compute what they show
(numbers, table rows as ready Markdown cells, figures) and passes it as plain values; the
templates escape free text with the `md` filter (md_escape), report.html.j2 is autoescaped, and
a variable a template names but is not given is an error (StrictUndefined).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.reporting.cells import md_escape
from pipeline.reporting.figures import figure_names, make_figures
from pipeline.reporting.inputs import (
    DatasetResults,
    HumanEval,
    ReportInputs,
    StageTime,
    collect,
    collect_stage_times,
    read_tsv,
    stage_files,
)
from pipeline.reporting.provenance import Provenance, collect_provenance
from pipeline.reporting.render import (
    TEMPLATES,
    TITLE,
    provenance_lines,
    render_html,
    render_markdown,
    render_template,
    stage_time_lines,
)

__all__ = [
    "TEMPLATES", "TITLE", "DatasetResults", "HumanEval", "Provenance", "Report", "ReportInputs", "StageTime",
    "build", "collect", "collect_provenance", "collect_stage_times", "figure_names", "make_figures", "md_escape",
    "provenance_lines", "read_tsv", "render_html", "render_markdown", "render_template", "stage_files",
    "stage_time_lines",
]


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes


def build(inputs: ReportInputs) -> Report:
    figures = make_figures(inputs)
    markdown = render_markdown(inputs, figures)
    return Report(markdown=markdown, html=render_html(markdown, figures), figures=figures)
