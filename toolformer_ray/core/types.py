"""Plain records passed between the stages of the method."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    doc_id: str  # stable content hash of the text
    text: str
    source_id: str = ""  # the corpus record it came from
    shard: str = ""
    date: str | None = None  # ISO yyyy-mm-dd, from a date field or the URL (Calendar needs it)
    meta: dict = field(default_factory=dict)  # the record's other fields
