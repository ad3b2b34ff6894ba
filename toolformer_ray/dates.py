"""The one date parser: what counts as a document's date, for the corpus reader and the Calendar
tool."""
from __future__ import annotations

import datetime as dt
import re

MIN_YEAR, MAX_YEAR = 1000, 2999  # a "date" outside this is a parsing accident, not a document date

# "2023-01-30", "2023-1-3", "20230130", optionally followed by a time ("T12:00:00Z", " 12:00").
_ISO = re.compile(r"\s*(\d{4})(-?)(\d{1,2})\2(\d{1,2})(?:[T ][0-9:.]*(?:Z|[+-]\d{2}:?\d{2})?)?\s*")
# /2023/01/30/, /2023-01-30-, _20230130_ ... in a URL's path (news sites, blogs).
_URL_HOST = re.compile(r"^[a-z][a-z0-9+.-]*://[^/]*", re.IGNORECASE)
_URL_DATE = re.compile(
    r"(?<!\d)((?:19|20)\d{2})([/_-]?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])(?!\d)")


def make_date(year: int, month: int, day: int) -> dt.date | None:
    try:
        date = dt.date(year, month, day)
    except ValueError:
        return None
    return date if MIN_YEAR <= date.year <= MAX_YEAR else None


def parse_date(value, strict: bool = False) -> dt.date | None:
    """An ISO date (a string as above, a date or a datetime) -> date; None when it is not one.
    strict: two-digit month and day, as ISO writes them (the Calendar tool, which reads the date a
    Document holds, already normalised); the corpus reader takes "2023-1-3" too."""
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return value if MIN_YEAR <= value.year <= MAX_YEAR else None
    if not isinstance(value, str):
        return None
    m = _ISO.fullmatch(value)
    if not m or ((strict or not m.group(2)) and (len(m.group(3)) != 2 or len(m.group(4)) != 2)):
        return None  # without separators only yyyymmdd is unambiguous
    return make_date(int(m.group(1)), int(m.group(3)), int(m.group(4)))


def iso_date(value) -> str | None:
    """parse_date as an ISO string (what `Document.date` holds)."""
    date = parse_date(value)
    return date.isoformat() if date else None


def date_from_url(url) -> str | None:
    """The first valid date in a URL's path (e.g. https://example.com/2023/01/30/story), ISO; else
    None."""
    if not isinstance(url, str):
        return None
    path = _URL_HOST.sub("", url.strip())  # a date-like host name is not the document's date
    for m in _URL_DATE.finditer(path):
        if (date := make_date(int(m.group(1)), int(m.group(3)), int(m.group(4)))) is not None:
            return date.isoformat()
    return None
