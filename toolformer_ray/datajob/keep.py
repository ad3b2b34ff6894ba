"""Which calls are kept: the one place that decides it, and counts the funnel of that decision.

    1. tau_f             a call passes iff L- - L+ >= tau_f of its tool
                         (core.filtering.ScoredCall.passes)
    2. one per position  where passing calls compete for a position the most useful one wins
                         (core.merge.choose_per_position)
    3. per-tool cap      each tool keeps at most `quota[tool]` more calls, filled in document order
                         (core.merge.merge_documents applies 1-3 and inserts the kept calls)

Shards are kept in input order (the scheduler commits them so), so the cap fills the same way
whatever order the workers finish in.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolformer_ray.api_text import Markers
from toolformer_ray.core.filtering import ScoredCall
from toolformer_ray.core.merge import MergedDoc, merge_documents
from toolformer_ray.core.types import Document


@dataclass
class Kept:
    merged: list[MergedDoc]  # every document, in input order, with its kept calls inline
    used: dict[str, int]  # tool -> calls kept (what this shard takes from the tool's quota)
    funnel: dict[str, dict[str, int]]  # tool -> the last four counters of records.FUNNEL_KEYS
    kept_ids: set[int]  # id() of every kept ScoredCall (the candidates table's `kept` column)

    def is_kept(self, s: ScoredCall) -> bool:
        return id(s) in self.kept_ids


def keep(docs: list[Document], scored: list[ScoredCall], markers: Markers,
         quota: dict[str, int | None], tools) -> Kept:
    """The kept calls of one shard (tau_f -> one per position -> per-tool cap) and its funnel counts
    for every tool in `tools`. Every scored call has a result (calls without one are not scored)."""
    merged, used = merge_documents(docs, scored, markers, quota)
    funnel = {}
    for tool in tools:
        mine = [s for s in scored if s.cand.tool == tool]
        funnel[tool] = {"calls_with_result": len(mine), "calls_scored": len(mine),
                        "kept_tau_f": sum(1 for s in mine if s.passes),
                        "kept_after_cap": used.get(tool, 0)}
    kept_ids = {id(s) for m in merged for s in m.calls}
    return Kept(merged=merged, used=used, funnel=funnel, kept_ids=kept_ids)
