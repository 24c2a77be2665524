"""The human-evaluation sheet as HTML (see `pipeline.generation.humaneval`): a self-contained page
rendered from templates/sheet.html.j2, with sheet.css and sheet.js inlined."""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

ITEMS_PER_PAGE = 4  # A.4: "Every page asks for 4 comparisons", one of them an attention check


@functools.cache
def _templates() -> jinja2.Environment:
    """The sheet's template folder (sheet.html.j2 inlines sheet.css and sheet.js)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(("html", "html.j2")),
    )


def _esc(text: str) -> Markup:
    """html.escape, marked safe for the template: the sheet's escaping stays html.escape's
    (&quot; &#x27;), not markupsafe's (&#34; &#39;), whatever autoescaping would do."""
    return Markup(html.escape(text))


def render_sheet(items: Sequence[Any], ids: Sequence[str], title: str, sheet_id: int = 0) -> str:
    """The self-contained HTML sheet (templates/sheet.html.j2): inline CSS and JS, no external
    assets, no system names."""
    pages = [
        {
            "number": page + 1,
            "entries": [
                {
                    "id": _esc(ids[k]),
                    "prefix": _esc(items[k].prefix),
                    "choices": [
                        {"side": side, "text": _esc(text.strip())}
                        for side, text in (("A", items[k].text_a), ("B", items[k].text_b))
                    ],
                }
                for k in range(page * ITEMS_PER_PAGE, min((page + 1) * ITEMS_PER_PAGE, len(items)))
            ],
        }
        for page in range(-(-len(items) // ITEMS_PER_PAGE))
    ]
    return _templates().get_template("sheet.html.j2").render(
        title=_esc(title), sheet_id=f"{sheet_id:016x}", pages=pages
    )
