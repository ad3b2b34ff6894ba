"""Calendar: no input; "Today is Monday, January 30, 2023." for the document's date.

The date comes from the document (`Document.date`, filled by the corpus reader from a date field or
the record's URL), or, in inference, from the run (today unless one is given);
`toolformer_ray.dates` says what a date is, for both. The paper drops documents without a date: so
does the pre-filter. The module is not named calendar.py, which would shadow the standard library's
`calendar`.
"""
from __future__ import annotations

import datetime as dt

from toolformer_ray.core.types import Document
from toolformer_ray.dates import parse_date
from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, unquote

# English names, not strftime's %A/%B, which follow the process locale.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def describe_date(date: dt.date) -> str:
    weekday = _WEEKDAYS[date.weekday()]
    return f"Today is {weekday}, {_MONTHS[date.month - 1]} {date.day}, {date.year}."


@register
class Calendar(Tool):
    name = "Calendar"
    version = "1"
    uses_date = True
    takes_input = False

    def _result(self, inp: str, date: str | None) -> tuple[str | None, str | None]:
        if not isinstance(inp, str) or unquote(inp):
            return None, "Calendar takes no input: the call is Calendar()"
        parsed = parse_date(date, strict=True)
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
        return parse_date(doc.date, strict=True) is not None
