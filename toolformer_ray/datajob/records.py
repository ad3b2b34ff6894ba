"""The data job's output contract in one place: the rows of its records and their Arrow schemas
(DESIGN.md, "Output contract of the data job").

calls       one row per kept call (the contract's table)
candidates  one row per scored call, kept or not (same columns + `kept`), for the report and audits
documents   one row per document: original text, augmented text with the kept calls inline
quarantine  one row per corpus record that could not be used, with the reason and the raw bytes

The records themselves (Document, Candidate, ScoredCall, MergedDoc) are the method's and stay in
core/.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa

# core imports torch (~4 s); storage, report and jobs read these schemas without it
if TYPE_CHECKING:
    from toolformer_ray.core.filtering import ScoredCall
    from toolformer_ray.core.merge import MergedDoc

SCHEMA_VERSION = 1

CALL_FIELDS = [
    ("doc_id", pa.string()),
    ("source_id", pa.string()),
    ("shard", pa.string()),
    ("tool", pa.string()),
    ("call", pa.string()),  # the call's input text, e.g. "400/1400"
    ("result", pa.string()),  # the tool's result; null = no result
    ("char_pos", pa.int64()),  # where the call goes in the document's own text
    ("token_pos", pa.int64()),  # the same position in the document's own tokens (i)
    ("p_api", pa.float64()),  # p_i = p(API-start | P_tool(x), x_<i)
    ("prefix_plus", pa.string()),  # exact prefix string scored for L+ (e(c, r) + separator)
    # exact prefix string scored for L-(call, no result) (e(c, empty) + separator)
    ("prefix_no_result", pa.string()),
    ("inserted_text", pa.string()),  # exact text inserted into the document, e(c, r)
    ("loss_plus", pa.float64()),  # L_i(e(c, r))
    ("loss_no_call", pa.float64()),  # L_i(empty)
    ("loss_call_no_result", pa.float64()),  # L_i(e(c, empty))
    ("tau_f", pa.float64()),
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("dtype", pa.string()),
    ("config_hash", pa.string()),
    ("schema_version", pa.int32()),
    # toolformer_ray.version.code_version() of the run that wrote the row
    ("code_version", pa.string()),
]
CALLS_SCHEMA = pa.schema(CALL_FIELDS)
CANDIDATES_SCHEMA = pa.schema(CALL_FIELDS + [("kept", pa.bool_())])

DOCUMENTS_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("source_id", pa.string()),
    ("shard", pa.string()),
    ("text", pa.string()),
    ("augmented_text", pa.string()),
    ("n_calls", pa.int64()),
    ("date", pa.string()),
    ("meta", pa.string()),  # the record's other fields, as JSON
])

QUARANTINE_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("source_id", pa.string()),  # record id, or "<file>:<line>" when it has none
    ("reason", pa.string()),
    ("raw", pa.binary()),  # the record's bytes, whole (invalid UTF-8 included): nothing is lost
])

# Funnel counters per tool (the paper's Table 2 plus the steps in between); summed over shards.
FUNNEL_KEYS = [
    "docs_seen", "docs_prefiltered", "positions_above_tau_s", "positions_sampled", "calls_sampled",
    "calls_well_formed", "calls_distinct", "calls_with_result", "calls_scored", "kept_tau_f",
    "kept_after_cap",
]


def call_row(s: ScoredCall, shard_id: str, source_id: str, inserted_text: str,
             common: dict) -> dict:
    """A scored call as a CALLS_SCHEMA row. `inserted_text`: e(c, r) as inserted (core.merge);
    `common`: the run's columns (model ... code_version)."""
    c = s.cand
    return {"doc_id": c.doc_id, "source_id": source_id, "shard": shard_id, "tool": c.tool,
            "call": c.call.input, "result": c.result, "char_pos": c.char_pos,
            "token_pos": c.token_pos, "p_api": c.p_api, "prefix_plus": s.prefix_plus,
            "prefix_no_result": s.prefix_no_result, "inserted_text": inserted_text,
            "loss_plus": s.loss_plus, "loss_no_call": s.loss_no_call,
            "loss_call_no_result": s.loss_call_no_result, "tau_f": s.tau_f, **common}


def document_row(m: MergedDoc, shard_id: str) -> dict:
    """A merged document as a DOCUMENTS_SCHEMA row."""
    return {"doc_id": m.doc.doc_id, "source_id": m.doc.source_id, "shard": shard_id,
            "text": m.doc.text, "augmented_text": m.augmented_text, "n_calls": len(m.calls),
            "date": m.doc.date, "meta": json.dumps(m.doc.meta, ensure_ascii=False, sort_keys=True)}


def quarantine_row(shard_id: str, source_id: str, reason: str, raw: bytes) -> dict:
    """An unusable corpus record as a QUARANTINE_SCHEMA row."""
    return {"shard": shard_id, "source_id": source_id, "reason": reason, "raw": raw}
