"""Merging kept calls into the text (paper, section 2, "Model Finetuning"):

    x* = x_<i, e(c_i, r_i), x_>=i

several calls per document (from all tools), at most one per position: where calls compete for a
position the most useful one (largest L- - L+) wins. Calls go into the ORIGINAL text at the
character position of token i, so the augmented text minus its calls is the original, character for
character. The per-tool cap (paper: 25k kept examples per tool) is filled in document order, so it
is the same whatever the batching or the order in which workers finish.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolformer_ray.api_text import Markers, insert_calls, render
from toolformer_ray.core.filtering import ScoredCall
from toolformer_ray.core.types import Document


@dataclass
class MergedDoc:
    doc: Document
    augmented_text: str
    calls: list[ScoredCall]  # the calls inserted, in text order


def choose_per_position(passing: list[ScoredCall]) -> list[ScoredCall]:
    """At most one call per position: the most useful (ties: tool, then call text, for
    determinism)."""
    best: dict[int, ScoredCall] = {}
    for s in passing:
        cur = best.get(s.cand.token_pos)
        key = (-s.usefulness, s.cand.tool, s.cand.call.input)
        if cur is None or key < (-cur.usefulness, cur.cand.tool, cur.cand.call.input):
            best[s.cand.token_pos] = s
    return [best[p] for p in sorted(best)]


def merge_documents(docs: list[Document], scored: list[ScoredCall], markers: Markers,
                    quota: dict[str, int | None]) -> tuple[list[MergedDoc], dict[str, int]]:
    """Augmented documents (in input order) and how much of each tool's quota was used.

    `quota[tool]` is the number of calls of that tool still allowed (None: no cap).
    """
    by_doc: dict[str, list[ScoredCall]] = {}
    for s in scored:
        if s.passes:
            by_doc.setdefault(s.cand.doc_id, []).append(s)
    remaining = dict(quota)
    used = {tool: 0 for tool in quota}
    merged = []
    for doc in docs:
        inserted = []
        for s in choose_per_position(by_doc.get(doc.doc_id, [])):
            left = remaining.get(s.cand.tool)
            if left is not None and left <= 0:
                continue
            if left is not None:
                remaining[s.cand.tool] = left - 1
            used[s.cand.tool] = used.get(s.cand.tool, 0) + 1
            inserted.append(s)
        text = insert_calls(doc.text,
                            [(s.cand.char_pos, inserted_text(s, markers)) for s in inserted])
        merged.append(MergedDoc(doc=doc, augmented_text=text, calls=inserted))
    return merged, used


def inserted_text(s: ScoredCall, markers: Markers) -> str:
    """e(c, r) as it appears inline, e.g. " [Calculator(400/1400) -> 0.29]"; at the start of the
    text (position 0, possible with a BOS tokenizer) without the marker's leading space:
    "[Calculator(...)] The"."""
    text = render(s.cand.call, markers, result=s.cand.result)
    return text.lstrip() if s.cand.char_pos == 0 else text
