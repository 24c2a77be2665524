"""Helpers shared by the report's sections: Markdown escaping of free text, number and duration
cells, and the registry order of model variants."""

from __future__ import annotations

import re
from typing import Any

from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def md_escape(text: str) -> str:
    """Text as literal Markdown on one line (generated text can hold *, _, <, |, &, line breaks or
    control characters: breaks become ⏎, control characters U+FFFD, Markdown syntax is escaped)."""
    one_line = re.sub(r" {2,}", " ", " ⏎ ".join(line.strip() for line in str(text).splitlines()).replace("\t", " "))
    return _MD_SPECIAL.sub(r"\\\1", _CONTROL.sub("\ufffd", one_line))


def fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def ordered(variants) -> list[str]:
    variants = list(variants)
    known = (*LM_VARIANTS, *ENERGY_VARIANTS)
    return [v for v in known if v in variants] + sorted(set(variants) - set(known))
