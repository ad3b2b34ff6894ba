"""What the readers, the Dateset generator and the task protocol share: one example, a task's data
and the error a bad data file raises. A leaf: it imports nothing else of the evaluation package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import fsspec

from toolformer_ray.errors import UserError


class DataError(UserError, ValueError):
    """An evaluation file that is missing or in no known format: reported as one line."""


@dataclass
class Example:
    id: str
    question: str  # what fills {question} in the task's prompt
    answers: list[str]  # gold answers as text
    number: float | None = None  # math: the gold number
    date: str | None = None  # ISO date the Calendar tool reports as today (Dateset), else None
    meta: dict = field(default_factory=dict)


@dataclass
class TaskData:
    examples: list[Example]
    format: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def read_text(path: str) -> str:
    """A whole evaluation file as text (local or any fsspec URI); a missing or unreadable one is a
    DataError."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"evaluation data not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"evaluation data must be a file, not a directory: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
