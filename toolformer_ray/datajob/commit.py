"""Committing one shard: its kept calls merged into its documents, its four tables and its commit
record published (storage.OutputStore.write_shard: tables first, the commit record last)."""
from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa

from toolformer_ray.api_text import Markers
from toolformer_ray.config import Config
from toolformer_ray.core.merge import inserted_text
from toolformer_ray.datajob.keep import keep
from toolformer_ray.datajob.records import (CALLS_SCHEMA, CANDIDATES_SCHEMA, DOCUMENTS_SCHEMA,
                                            QUARANTINE_SCHEMA, SCHEMA_VERSION, call_row,
                                            document_row)
from toolformer_ray.datajob.scheduler import ShardWork
from toolformer_ray.version import code_version


def commit_shard(cfg: Config, w: ShardWork, store, model: dict, config_hash: str,
                 quota: dict) -> int:
    """Keep the shard's calls, publish its tables and take what it kept from `quota` (tool -> calls
    still allowed, None: no cap). Returns the number of calls kept."""
    t = time.perf_counter()
    markers = Markers.from_config(cfg.markers)
    kept = keep(w.docs, w.scored, markers, quota, cfg.enabled_tools())
    for tool, n in kept.used.items():
        if quota.get(tool) is not None:
            quota[tool] -= n
    shard_id = w.plan.shard.shard_id
    common = {"model": model["path"], "model_revision": model["revision"], "dtype": model["dtype"],
              "config_hash": config_hash, "schema_version": SCHEMA_VERSION,
              "code_version": code_version()}
    source = {d.doc_id: d.source_id for d in w.docs}
    candidate_rows = [{**call_row(s, shard_id, source.get(s.cand.doc_id, ""),
                                  inserted_text(s, markers), common), "kept": kept.is_kept(s)}
                      for s in w.scored]
    call_rows = [call_row(s, shard_id, m.doc.source_id, inserted_text(s, markers), common)
                 for m in kept.merged for s in m.calls]
    doc_rows = [document_row(m, shard_id) for m in kept.merged]
    for tool, counts in kept.funnel.items():
        f = w.funnel.setdefault(tool, Counter())
        for key, n in counts.items():
            f[key] = n  # set, not added: these count this decision, whole
    funnel = {tool: dict(c) for tool, c in w.funnel.items()}
    w.timings["merge"] += time.perf_counter() - t
    tables = {
        "calls": pa.Table.from_pylist(call_rows, CALLS_SCHEMA),
        "candidates": pa.Table.from_pylist(candidate_rows, CANDIDATES_SCHEMA),
        "documents": pa.Table.from_pylist(doc_rows, DOCUMENTS_SCHEMA),
        "quarantine": pa.Table.from_pylist(w.quarantine, QUARANTINE_SCHEMA),
    }
    # (the write cannot be timed inside the record it writes: the driver sums it into the run's
    # info)
    record = {**w.plan.shard.to_dict(), "code_version": common["code_version"],
              "funnel": funnel, "documents": len(w.docs), "p_api_hist": w.p_api_hist,
              "timings": {k: round(v, 3) for k, v in w.timings.items()}}
    t = time.perf_counter()
    store.write_shard(shard_id, tables, record, max_docs=w.plan.max_docs)
    w.timings["write"] += time.perf_counter() - t
    return len(call_rows)
