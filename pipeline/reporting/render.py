"""Rendering the report: the one Jinja2 environment of templates/ (*.md.j2 as plain text with the
`md` filter, *.html.j2 autoescaped, StrictUndefined), report.md from the sections' context, and
report.html as that Markdown through markdown-it-py with the figures inlined as data URIs."""

from __future__ import annotations

import base64
import functools
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pipeline.reporting.cells import md_escape
from pipeline.reporting.claims import NOT_CONVERGED
from pipeline.reporting.inputs import ReportInputs, StageTime
from pipeline.reporting.provenance import Provenance
from pipeline.reporting.sections import (
    before_after,
    claims_table,
    examples,
    figure1_caption,
    figure_captions,
    provenance_context,
    sample_stats,
    stage_times,
    stepwise,
)
from pipeline.reporting.spread import spread_section
from pipeline.reporting.table1 import headline, last_position, reference, table1

FIGURES_DIR = "figures"  # image links in report.md are relative to reports/
TITLE = "Residual energy-based models for text generation: reproduction report"
TEMPLATES = Path(__file__).parent / "templates"
DIRTY_FILES_SHOWN = 5


@functools.cache
def _templates() -> jinja2.Environment:
    """templates/: *.md.j2 as plain text (the `md` filter escapes), *.html.j2 autoescaped; a
    variable a template names but is not given is an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["md"] = md_escape
    env.globals.update(figures_dir=FIGURES_DIR, not_converged=NOT_CONVERGED, dirty_files_shown=DIRTY_FILES_SHOWN)
    return env


def render_template(name: str, **context: Any) -> str:
    return _templates().get_template(name).render(**context)


def _lines(block: str) -> list[str]:
    """A rendered block (ending with its blank line) as lines, the last one "" as before."""
    return block.split("\n")[:-1]


def stage_time_lines(times: Sequence[StageTime]) -> list[str]:
    return _lines(render_template("_stage_times.md.j2", stage_times=stage_times(times)))


def provenance_lines(p: Provenance) -> list[str]:
    return _lines(render_template("_provenance.md.j2", **provenance_context(p)))


def render_markdown(inputs: ReportInputs, figures: dict[str, bytes]) -> str:
    """The report as Markdown (templates/report.md.j2); figures are linked as figures/<name>
    (relative to reports/)."""
    ds = inputs.datasets
    human = inputs.human_eval
    text = render_template(
        "report.md.j2", title=TITLE, datasets=ds,
        headline=headline(ds), table1=table1(ds), reference=reference(ds),
        spread=spread_section(inputs.seed_spread, {d.name: d.evaluation for d in ds}),
        last_position=last_position(ds), claims=claims_table(ds),
        figure1=[figure1_caption(d, figures) for d in ds],
        figure2=(later := [figure_captions(d) for d in ds]), figure3=later,
        sample_stats=sample_stats(ds), before_after=before_after(ds),
        human=human, human_table=None if human.markdown is None else human.markdown.rstrip("\n"),
        examples=[examples(d) for d in ds], stepwise=[stepwise(d) for d in ds],
        stage_times=stage_times(inputs.stage_times),
        **provenance_context(inputs.provenance),
    )
    return text.rstrip("\n") + "\n"


def render_html(markdown: str, figures: dict[str, bytes], title: str = TITLE) -> str:
    """One self-contained page (templates/report.html.j2, inline CSS): the Markdown through
    markdown-it-py (CommonMark + tables, raw HTML off), every figures/<name> image replaced by
    its PNG as a base64 data URI."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    prefix = f"{FIGURES_DIR}/"
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            name = src.removeprefix(prefix)
            if not src.startswith(prefix) or name not in figures:
                raise ValueError(f"report image {src!r} is not one of the figures made")
            child.attrSet("src", "data:image/png;base64," + base64.b64encode(figures[name]).decode("ascii"))
    body = md.renderer.render(tokens, md.options, {})
    # body is markdown-it's HTML; the title is escaped by html.escape (quotes as &quot; / &#x27;).
    return render_template("report.html.j2", title=Markup(html.escape(title)), body=Markup(body))
