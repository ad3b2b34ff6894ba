"""Dateset (paper, section 4.2.5): generated questions whose answers depend on today's date, which
the model can only know by calling the Calendar tool.

For each example a "current date" is drawn, then a template and its numbers; the answer is computed
from the dates. The templates follow the kinds the paper lists: how many days ago / until a date,
what day of the week / day of the month / month / year it was or will be N days from today, what day
of the week a given date falls on, and relative days (yesterday, tomorrow, ...). The question never
contains the current date; it is given to the Calendar tool as "today" (Example.date). Deterministic
for a seed.
"""
from __future__ import annotations

import datetime as dt
import json
import random

import fsspec

from toolformer_ray.evaluation.examples import Example

_UNITS = ("day of the week", "day of the month", "month", "year")
_RELATIVE = {"the day before yesterday": -2, "yesterday": -1, "today": 0, "tomorrow": 1,
             "the day after tomorrow": 2}


def _fmt(d: dt.date) -> str:
    return f"{d:%B} {d.day}, {d.year}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _unit_answers(d: dt.date, unit: str) -> list[str]:
    if unit == "day of the week":
        return [f"{d:%A}"]
    if unit == "day of the month":
        return [str(d.day), _ordinal(d.day)]
    if unit == "month":
        return [f"{d:%B}"]
    return [str(d.year)]


def _one(rng: random.Random, today: dt.date) -> tuple[str, list[str], str]:
    kind = rng.randrange(6)
    n = rng.randint(2, 400)
    if kind == 0:
        past = today - dt.timedelta(days=n)
        return f"How many days ago was {_fmt(past)}?", [str(n)], "days_ago"
    if kind == 1:
        future = today + dt.timedelta(days=n)
        return f"How many days are there until {_fmt(future)}?", [str(n)], "days_until"
    if kind == 2:
        unit = rng.choice(_UNITS)
        answers = _unit_answers(today - dt.timedelta(days=n), unit)
        return f"What {unit} was it {n} days ago?", answers, "unit_ago"
    if kind == 3:
        unit = rng.choice(_UNITS)
        answers = _unit_answers(today + dt.timedelta(days=n), unit)
        return f"What {unit} will it be in {n} days?", answers, "unit_in"
    if kind == 4:
        sign = rng.choice((-1, 1))
        d = today + dt.timedelta(days=sign * n)
        verb = "was" if sign < 0 else "will"
        q = (f"What day of the week was it on {_fmt(d)}?" if verb == "was"
             else f"What day of the week will it be on {_fmt(d)}?")
        return q, [f"{d:%A}"], "weekday_of_date"
    rel, offset = rng.choice(list(_RELATIVE.items()))
    unit = rng.choice(_UNITS)
    verb = "was it" if offset < 0 else ("is it" if offset == 0 else "will it be")
    answers = _unit_answers(today + dt.timedelta(days=offset), unit)
    return f"What {unit} {verb} {rel}?", answers, "relative_day"


def generate_dateset(n: int, seed: int = 0, start: str = "2015-01-01",
                     end: str = "2025-12-31") -> list[Example]:
    """`n` Dateset questions with current dates drawn uniformly from [start, end]."""
    rng = random.Random(seed)
    lo = dt.date.fromisoformat(start)
    hi = dt.date.fromisoformat(end)
    if hi < lo:
        raise ValueError("end date before start date")
    out = []
    for i in range(n):
        today = lo + dt.timedelta(days=rng.randint(0, (hi - lo).days))
        question, answers, template = _one(rng, today)
        out.append(Example(f"dateset-{seed}-{i}", question, answers, date=today.isoformat(),
                           meta={"template": template}))
    return out


def write_dateset(path: str, n: int, seed: int = 0) -> int:
    """Write a Dateset as jsonl (question, today, answer, template): readable by the temporal
    reader."""
    examples = generate_dateset(n, seed)
    with fsspec.open(path, "wt", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"id": ex.id, "question": ex.question, "today": ex.date,
                                "answer": ex.answers,
                                "template": ex.meta["template"]}) + "\n")
    return len(examples)
