"""Arrow schemas of the data job's output tables (DESIGN.md, "Output contract of the data job").

calls       one row per kept call (the contract's table)
candidates  one row per scored call, kept or not (same columns + `kept`), for the report and audits
documents   one row per document: original text, augmented text with the kept calls inline
quarantine  one row per corpus record that could not be used, with the reason and the raw bytes
"""
from __future__ import annotations

import pyarrow as pa

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
    ("prefix_no_result", pa.string()),  # exact prefix string scored for L-(call, no result) (e(c, empty) + separator)
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
    ("code_version", pa.string()),  # toolformer_ray.version.code_version() of the run that wrote the row
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
