"""The report's Jinja2 templates (pipeline/reporting/templates): every file is used, a missing
variable is an error, Markdown is not HTML-escaped and the HTML page is."""

from __future__ import annotations

import jinja2
import jinja2.meta
import pytest

from pipeline.reporting import render
from pipeline.reporting import report as lib

ENTRY_POINTS = ("report.md.j2", "report.html.j2")


def reachable(names: tuple[str, ...]) -> set[str]:
    """The templates `names` include or import, followed through their own references."""
    env = render._templates()
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = env.loader.get_source(env, name)[0]
        todo += [n for n in jinja2.meta.find_referenced_templates(env.parse(source)) if n is not None]
    return seen


def test_every_template_file_is_used() -> None:
    files = {p.name for p in lib.TEMPLATES.iterdir()}
    # pyproject.toml ships templates/* as package data: a subfolder would be left out of a wheel
    assert all((lib.TEMPLATES / f).is_file() for f in files), files
    assert all(f.endswith(".j2") for f in files), files
    assert reachable(ENTRY_POINTS) == files


def test_a_missing_variable_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError, match="stage_times"):
        lib.render_template("_stage_times.md.j2")
    with pytest.raises(jinja2.UndefinedError, match="total"):
        lib.render_template("_stage_times.md.j2", stage_times={"rows": [], "recorded": 0, "count": 0})
    with pytest.raises(jinja2.UndefinedError):
        lib.render_template("report.md.j2", title=lib.TITLE)


def test_markdown_is_left_alone_and_html_is_escaped() -> None:
    times = [lib.StageTime("a<b>&c@x", "p", 1.0, "ok")]
    text = "\n".join(lib.stage_time_lines(times))
    assert "| a<b>&c@x | 0:00:01 (1.0 s) | `p` |" in text  # no HTML escaping in Markdown templates
    page = lib.render_template("report.html.j2", title="<t>", body="<p>x</p>")
    assert "<title>&lt;t&gt;</title>" in page and "&lt;p&gt;x&lt;/p&gt;" in page  # plain text is escaped
    page = lib.render_html("# T & <u>\n", {}, title="a \"b\" & 'c'")
    assert "<title>a &quot;b&quot; &amp; &#x27;c&#x27;</title>" in page  # html.escape, as before
    assert "<h1>T &amp; &lt;u&gt;</h1>" in page and page.endswith("</main>\n</body>\n</html>\n")
