"""Calendar: no input; "Today is Monday, January 30, 2023." for the document's date.

The date comes from the document (`Document.date`, filled by the corpus reader from a date field or the
record's URL: `date_from_url` below), or, in inference, from the run (today unless one is given). The
paper drops documents without a date: so does the pre-filter. The module is not named calendar.py, which
would shadow the standard library's `calendar`.
"""
from __future__ import annotations

import datetime as dt
import re

from toolformer_ray.core.types import Document
from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, unquote

# English names, not strftime's %A/%B, which follow the process locale.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_MIN_YEAR, _MAX_YEAR = 1000, 2999  # a "date" outside this is a parsing accident, not a document date


def parse_date(value: str | dt.date | None) -> dt.date | None:
    """An ISO date ("2023-01-30", "2023-01-30T12:00:00Z", "20230130") -> date; None when it is not one."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return value if _MIN_YEAR <= value.year <= _MAX_YEAR else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ][0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?", text)
    if not m:
        return None
    try:
        date = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None
    return date if _MIN_YEAR <= date.year <= _MAX_YEAR else None


# /2023/01/30/, /2023-01-30-, _20230130_ ... in a URL's path (news sites, blogs).
_URL_DATE_RE = re.compile(r"(?<!\d)((?:19|20)\d{2})([/_-]?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])(?!\d)")


def date_from_url(url: str | None) -> str | None:
    """The date written in a URL's path (e.g. https://example.com/2023/01/30/story), ISO; else None."""
    if not url or not isinstance(url, str):
        return None
    path = re.sub(r"^[a-z]+://[^/]*", "", url.strip(), flags=re.IGNORECASE)
    for m in _URL_DATE_RE.finditer(path):
        date = parse_date(f"{m.group(1)}-{m.group(3)}-{m.group(4)}")
        if date is not None:
            return date.isoformat()
    return None


def describe_date(date: dt.date) -> str:
    return f"Today is {_WEEKDAYS[date.weekday()]}, {_MONTHS[date.month - 1]} {date.day}, {date.year}."


@register
class Calendar(Tool):
    name = "Calendar"
    version = "1"
    uses_date = True
    takes_input = False

    def _result(self, inp: str, date: str | None) -> tuple[str | None, str | None]:
        if not isinstance(inp, str) or unquote(inp):
            return None, "Calendar takes no input: the call is Calendar()"
        parsed = parse_date(date)
        if parsed is None:
            return None, "no date: give the document's date (ISO yyyy-mm-dd)" if not date else \
                f"not an ISO date: {date!r}"
        return describe_date(parsed), None

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        dates = list(dates) if dates is not None else [None] * len(inputs)
        if len(dates) != len(inputs):
            return [None] * len(inputs)
        return [self._result(inp, date)[0] for inp, date in zip(inputs, dates)]

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        return self._result(inp, date)[1]

    def prefilter(self, doc: Document) -> bool:
        return parse_date(doc.date) is not None
