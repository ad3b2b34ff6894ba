"""Corpus records as they are stored: bytes -> records, or quarantine reasons.

Records that cannot be used go to the quarantine table with the reason and their raw bytes (bad
JSON, not an object, invalid UTF-8, over-long, any unforeseen error on that record); nothing is
dropped silently and nothing is fatal. Input is streamed and bounded: a record over
`max_record_bytes` keeps only a prefix plus its length and sha256, a compressed file is read up to
`max_decompressed_bytes`, and a truncated archive keeps the records before the cut. Text files give
one record per paragraph (lines up to a blank line), source id "<file>:<first line>": a book-sized
file would otherwise be one over-long record.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from toolformer_ray.datajob.corpus.listing import CorpusError, Shard


@dataclass
class _Record:
    locator: str  # "<file>:<line>" or "<file>:<row>"
    # the record's bytes for the quarantine table (whole, or a prefix beyond the raw bound)
    raw: bytes
    fields: dict | None  # parsed record, or None when `error` says why not
    error: str | None = None


RAW_PREFIX_BYTES = 65536  # what quarantine keeps of a record or file over the raw bound
_BOM = b"\xef\xbb\xbf"


class _Raw:
    """A record's bytes as they stream in: whole up to `limit`, beyond it only the first
    RAW_PREFIX_BYTES, the length and the sha256, so a hostile multi-GB line costs neither memory nor
    a huge quarantine row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buf = bytearray()
        self.length = 0
        self.sha = None  # set once over the limit

    def add(self, data) -> None:
        data = memoryview(data)
        self.length += len(data)
        if self.sha is None:
            room = self.limit + 1 - len(self.buf)
            self.buf += data[:room]
            if len(self.buf) <= self.limit:
                return
            self.sha = hashlib.sha256(self.buf)
            self.sha.update(data[room:])
            del self.buf[RAW_PREFIX_BYTES:]
        else:
            self.sha.update(data)

    @property
    def over(self) -> bool:
        return self.sha is not None

    def note(self) -> str:
        return (f"{self.length} bytes, sha256 {self.sha.hexdigest()}; "
                f"only the first {len(self.buf)} kept")


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "base64:" + base64.b64encode(bytes(value)).decode()
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    return str(value)


def _read_bytes(shard: Shard, storage_options: dict | None) -> bytes:
    """The file's bytes as stored (still compressed), checked against the hash the shard was listed
    with."""
    fs, path = fsspec.core.url_to_fs(shard.uri, **(storage_options or {}))
    with fs.open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != shard.content_hash:
        raise CorpusError(f"{shard.uri} changed since it was listed (its bytes no longer hash to "
                          f"shard {shard.shard_id}); list the input again")
    return data


class _Decoded:
    """The file's decompressed bytes in chunks, at most `max_bytes` of them (a decompression bomb
    stops there). A truncated or corrupt archive ends early: `error` then says why and `total`
    how far it got."""

    def __init__(self, data: bytes, uri: str, max_bytes: int):
        self.data, self.uri, self.max_bytes = data, uri, max_bytes
        self.error: str | None = None
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        compression = infer_compression(self.uri)
        if not compression:
            self.total = len(self.data)
            yield self.data
            return
        try:
            with fsspec.compression.compr[compression](io.BytesIO(self.data)) as f:
                # read1: one decoder step at a time, so a cut archive still yields all it decoded
                # (read(n) loses the partial chunk in which the error is raised).
                read = getattr(f, "read1", f.read)
                while chunk := read(1 << 20):
                    if self.total + len(chunk) > self.max_bytes:
                        yield chunk[:self.max_bytes - self.total]
                        self.total = self.max_bytes
                        self.error = (f"decompresses to more than corpus.max_decompressed_bytes="
                                      f"{self.max_bytes}; the rest of the file is not read")
                        return
                    self.total += len(chunk)
                    yield chunk
        except Exception as e:  # noqa: BLE001 - any decoder's error: the archive is cut or corrupt here
            self.error = (f"truncated or corrupt compressed file after {self.total} decompressed "
                          f"bytes: {type(e).__name__}: {e}")


def _lines(chunks, max_raw: int) -> Iterator[tuple[int, _Raw, bool]]:
    """(line number, the line's bytes without "\\n", whether a "\\n" ended it) over streamed chunks.
    A UTF-8 byte-order mark at the start of the file is dropped (editors on Windows write one)."""
    line_no, cur, first = 1, _Raw(max_raw), True
    for chunk in chunks:
        start = 0
        if first:
            first = False
            start = 3 if chunk[:3] == _BOM else 0
        mv = memoryview(chunk)
        while (nl := chunk.find(b"\n", start)) >= 0:
            cur.add(mv[start:nl])
            yield line_no, cur, True
            line_no, cur, start = line_no + 1, _Raw(max_raw), nl + 1
        cur.add(mv[start:])
    if cur.length:
        yield line_no, cur, False


def _unreadable(shard: Shard, data: bytes, max_raw: int, what: str,
                err: Exception | str) -> _Record:
    # A file that cannot be decoded at all is one quarantine row (its bytes, or a prefix), not a
    # crash.
    raw = _Raw(max_raw)
    raw.add(data)
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    note = f" ({raw.note()})" if raw.over else ""
    return _Record(shard.name, bytes(raw.buf), None, f"unreadable {what}: {reason}{note}")


def _cut_off(shard: Shard, decoded: _Decoded, line_no: int, partial: _Raw | None) -> _Record:
    """The quarantine row for where a truncated/bombed archive stopped: the cut record's bytes, if
    any."""
    raw = b"" if partial is None else bytes(partial.buf)
    return _Record(f"{shard.name}:{line_no}", raw, None, decoded.error)


def _jsonl_records(decoded: _Decoded, shard: Shard, max_raw: int) -> Iterator[_Record]:
    line_no = 0
    for line_no, raw, ended in _lines(decoded, max_raw):
        locator = f"{shard.name}:{line_no}"
        if raw.over:
            yield _Record(locator, bytes(raw.buf), None, f"over-long record: {raw.note()}")
            continue
        if not ended and decoded.error:
            yield _cut_off(shard, decoded, line_no, raw)
            return
        line = bytes(raw.buf).rstrip(b"\r")
        if not line.strip():
            continue  # blank lines carry no record
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _Record(locator, line, None, f"invalid UTF-8 at byte {e.start}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield _Record(locator, line, None, f"bad JSON: {e.msg} at column {e.colno}")
            continue
        except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting too deep
            yield _Record(locator, line, None, f"bad JSON: {type(e).__name__}: {_first_line(e)}")
            continue
        if not isinstance(obj, dict):
            kind = type(obj).__name__
            yield _Record(locator, line, None, f"record is a JSON {kind}, expected an object")
            continue
        yield _Record(locator, line, obj)
    if decoded.error:
        yield _cut_off(shard, decoded, line_no + 1, None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _text_records(decoded: _Decoded, shard: Shard, max_raw: int) -> Iterator[_Record]:
    para: _Raw | None = None  # the paragraph being read
    long_line = None  # (line number, note) of an over-long line in it: its bytes are not all kept
    start = line_no = 0

    def emit() -> _Record:
        locator = f"{shard.name}:{start}"
        if long_line is not None:
            return _Record(locator, bytes(para.buf[:RAW_PREFIX_BYTES]), None,
                           f"over-long record: line {long_line[0]} alone is {long_line[1]}")
        if para.over:
            return _Record(locator, bytes(para.buf), None, f"over-long record: {para.note()}")
        raw = bytes(para.buf)
        try:
            return _Record(locator, raw, {"text": raw.decode("utf-8")})
        except UnicodeDecodeError as e:
            return _Record(locator, raw, None, f"invalid UTF-8 at byte {e.start}")

    for line_no, raw, ended in _lines(decoded, max_raw):
        line = bytes(raw.buf).rstrip(b"\r")
        if not ended and decoded.error:
            if para is not None:  # the paragraph the archive cut: quarantined with the reason
                para.add(b"\n")
                para.add(line)
                raw = para
            yield _cut_off(shard, decoded, start if para is not None else line_no, raw)
            return
        if raw.over or line.strip():
            if para is None:
                para, start, long_line = _Raw(max_raw), line_no, None
            else:
                para.add(b"\n")
            para.add(line)
            if raw.over and long_line is None:
                long_line = (line_no, raw.note())
        elif para is not None:
            yield emit()
            para = None
    if para is not None:
        yield emit()
    if decoded.error:
        yield _cut_off(shard, decoded, line_no + 1, None)


def _parquet_records(shard: Shard, storage_options: dict | None, max_raw: int) -> Iterator[_Record]:
    if shard.row_group is None:
        data = _read_bytes(shard, storage_options)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            yield _unreadable(shard, data, max_raw, "Parquet file", e)
            return
    else:
        # Row-group shards read only their byte ranges; the footer's row count guards against a
        # changed file.
        fs, path = fsspec.core.url_to_fs(shard.uri, **(storage_options or {}))
        with fs.open(path, "rb") as f:
            if fs.size(path) != shard.size:
                raise CorpusError(f"{shard.uri} changed since it was listed; list the input again")
            table = pq.ParquetFile(f).read_row_group(shard.row_group)
    # Strings are read as bytes and decoded here, so one row of invalid UTF-8 is quarantined, not
    # fatal.
    string_cols = [name for name, typ in zip(table.column_names, table.schema.types)
                   if pa.types.is_string(typ) or pa.types.is_large_string(typ)]
    for name in string_cols:
        i = table.column_names.index(name)
        table = table.set_column(i, name, table.column(name).cast(pa.large_binary()))
    row_no = shard.row_offset
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            locator = f"{shard.name}:{row_no}"
            row_no += 1
            error = None
            for name in string_cols:
                if row[name] is None:
                    continue
                try:
                    row[name] = row[name].decode("utf-8")
                except UnicodeDecodeError as e:
                    error = error or f"invalid UTF-8 in field {name!r} at byte {e.start}"
            try:
                text = json.dumps(row, default=_json_default, ensure_ascii=False)
                raw = text.encode("utf-8", "surrogatepass")
            except (ValueError, RecursionError) as e:  # a value nested too deep to write out
                raw, error = b"", error or f"unwritable row: {type(e).__name__}: {_first_line(e)}"
            yield _Record(locator, raw, None if error else row, error)


def _records(shard: Shard, corpus_cfg, storage_options: dict | None) -> Iterator[_Record]:
    max_raw = max_record_bytes(corpus_cfg)
    if shard.fmt == "parquet":
        yield from _parquet_records(shard, storage_options, max_raw)
        return
    if shard.fmt not in ("jsonl", "text"):
        raise CorpusError(f"unknown shard format {shard.fmt!r}")
    raw = _read_bytes(shard, storage_options)
    decoded = _Decoded(raw, shard.uri, corpus_cfg.max_decompressed_bytes)
    records = (_jsonl_records if shard.fmt == "jsonl" else _text_records)(decoded, shard, max_raw)
    first = next(records, None)
    if first is not None and decoded.error and decoded.total == 0:
        # Nothing decoded at all (not an archive, or cut in its header): the file is one quarantine
        # row.
        yield _unreadable(shard, raw, max_raw, "compressed file", decoded.error)
        return
    if first is not None:
        yield first
        yield from records


def max_record_bytes(corpus_cfg) -> int:
    """Raw-size guard: a record's text is at most max_record_chars characters, i.e. <= 4 bytes each,
    plus room for the other fields; anything bigger is not parsed at all (corpus.max_record_bytes
    overrides)."""
    if corpus_cfg.max_record_bytes is not None:
        return corpus_cfg.max_record_bytes
    return 4 * corpus_cfg.max_record_chars + 65536

