"""Shard -> documents (+ quarantine rows): record fields checked, dated, split, de-duplicated by
text."""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass

from toolformer_ray.core.types import Document
from toolformer_ray.datajob.corpus.formats import _first_line, _json_default, _Record, _records
from toolformer_ray.datajob.corpus.listing import Shard, ShardPlan
from toolformer_ray.datajob.corpus.split import split_text
from toolformer_ray.datajob.records import quarantine_row
from toolformer_ray.dates import date_from_url, iso_date

DOC_ID_CHARS = 32  # 128 bits: no collision in any corpus we will see


def plan_shards(shards: list[Shard], corpus_cfg, tokenizer, limit: int | None = None,
                storage_options: dict | None = None) -> list[ShardPlan]:
    """Which shards to process: all of them, or under `limit` the first `limit` documents over the
    shards in order. The shards this reads to count documents are read again by the workers; a limit
    is for quick runs, so that costs little. The last shard touched is partial unless the limit ends
    exactly at its end."""
    if limit is None:
        return [ShardPlan(s) for s in shards]
    plans, remaining = [], limit
    for shard in shards:
        if remaining <= 0:
            break
        docs, _ = read_shard(shard, corpus_cfg, tokenizer, max_docs=remaining + 1,
                             storage_options=storage_options)
        if len(docs) <= remaining:
            plans.append(ShardPlan(shard))
            remaining -= len(docs)
        else:
            plans.append(ShardPlan(shard, remaining))
            remaining = 0
    return plans


def normalize_text(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, ends stripped: what `doc_id` hashes."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def doc_id_for(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:DOC_ID_CHARS]


def _check_fields(fields: dict, locator: str, text_field: str, id_field: str | None,
                  max_chars: int) -> tuple[str | None, str, str | None]:
    """(text, source_id, error) for one parsed record."""
    source_id = locator
    if id_field:
        rid = fields.get(id_field)
        if isinstance(rid, bool) or (rid is not None and not isinstance(rid, (str, int))):
            kind = type(rid).__name__
            return None, locator, f"field {id_field!r} is {kind}, expected a string or integer"
        if rid is not None and str(rid).strip():
            source_id = str(rid)
    if text_field not in fields:
        return None, source_id, f"no {text_field!r} field"
    text = fields[text_field]
    if isinstance(text, (bytes, bytearray)):  # a binary Parquet column
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, source_id, f"invalid UTF-8 in field {text_field!r} at byte {e.start}"
    if text is None:
        return None, source_id, f"field {text_field!r} is null"
    if not isinstance(text, str):
        return None, source_id, f"field {text_field!r} is {type(text).__name__}, expected a string"
    if not text.strip():
        return None, source_id, "empty text"
    if len(text) > max_chars:
        return None, source_id, (f"over-long record: text has {len(text)} characters, more than "
                                 f"corpus.max_record_chars={max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, source_id, "text is not valid Unicode (lone surrogate escape)"
    return text, source_id, None


def _meta(fields: dict, corpus_cfg, text_field: str) -> dict:
    drop = {text_field, corpus_cfg.id_field}
    meta = {k: v for k, v in fields.items() if k not in drop}
    # JSON-safe (dates, bytes from Parquet) so the documents table can store it as JSON.
    return json.loads(json.dumps(meta, default=_json_default, ensure_ascii=False))


@dataclass
class _Rejected:
    reason: str


def _document_fields(rec: _Record, shard: Shard, corpus_cfg, text_field: str, tokenizer):
    """(text, source_id, meta, date, pieces) of a parsed record, or (_Rejected(reason), source_id,
    ...)."""
    is_text = shard.fmt == "text"  # a paragraph: no id, date or other fields
    text, source_id, error = _check_fields(
        rec.fields, rec.locator, text_field, None if is_text else corpus_cfg.id_field,
        corpus_cfg.max_record_chars)
    if error is not None:
        return _Rejected(error), source_id, None, None, None
    meta, date = {}, None
    if not is_text:
        try:
            meta = _meta(rec.fields, corpus_cfg, text_field)
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            reason = _Rejected("a field is not valid Unicode (lone surrogate escape)")
            return reason, source_id, None, None, None
        if corpus_cfg.date_field:
            date = iso_date(rec.fields.get(corpus_cfg.date_field))
        if date is None and corpus_cfg.url_field:
            date = date_from_url(rec.fields.get(corpus_cfg.url_field))
    return text, source_id, meta, date, split_text(text, tokenizer, corpus_cfg.max_doc_tokens)


def read_shard(shard: Shard, corpus_cfg, tokenizer, max_docs: int | None = None,
               storage_options: dict | None = None) -> tuple[list[Document], list[dict]]:
    """The shard's documents (in record order; at most `max_docs`) and its quarantine rows
    (records.QUARANTINE_SCHEMA) for the records read. A document whose text already occurred in the
    shard is quarantined as a duplicate (same doc_id), so doc_id is unique within a shard. Across
    shards it is not: the same text in two files is a document of each shard, with the same doc_id
    (a shard's rows depend only on its own bytes, so shards can be done, skipped and resumed
    independently; consumers that need one row per text de-duplicate on doc_id). Any failure on one
    record quarantines that record."""
    docs: list[Document] = []
    quarantine: list[dict] = []
    first_source: dict[str, str] = {}
    text_field = "text" if shard.fmt == "text" else corpus_cfg.text_field

    def reject(source_id: str, reason: str, raw: bytes) -> None:
        quarantine.append(quarantine_row(shard.shard_id, source_id, reason, raw))

    for rec in _records(shard, corpus_cfg, storage_options):
        if max_docs is not None and len(docs) >= max_docs:
            break
        if rec.error is not None:
            reject(rec.locator, rec.error, rec.raw)
            continue
        try:
            text, source_id, meta, date, pieces = _document_fields(rec, shard, corpus_cfg,
                                                                   text_field, tokenizer)
        except Exception as e:  # noqa: BLE001 - one odd record must not sink its shard
            reject(rec.locator, f"record could not be read: {type(e).__name__}: {_first_line(e)}",
                   rec.raw)
            continue
        if isinstance(text, _Rejected):
            reject(source_id, text.reason, rec.raw)
            continue
        for piece in pieces:
            if max_docs is not None and len(docs) >= max_docs:
                break
            doc_id = doc_id_for(piece)
            if doc_id in first_source:
                reject(source_id, f"duplicate text: document {doc_id} already read from "
                                  f"{first_source[doc_id]}", piece.encode("utf-8"))
                continue
            first_source[doc_id] = source_id
            docs.append(Document(doc_id=doc_id, text=piece, source_id=source_id,
                                 shard=shard.shard_id, date=date, meta=meta))
    return docs, quarantine
