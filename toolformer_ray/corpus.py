"""Corpus input: a file, directory or s3:// prefix -> shards -> documents (+ quarantine rows).

A shard is a whole file, or one row group of a large Parquet file. Its `shard_id` is a hash of the file's
bytes (plus the row-group index), so a nightly run recognises the shards it has done by content, not by
name or file time; a file rewritten with the same bytes is the same shard.

Formats (by extension, or all files as `corpus.format`; .gz/.bz2/.xz/.zst compression is inferred):
  jsonl    .jsonl .ndjson .json   one JSON object per line; blank lines are skipped
  parquet  .parquet .pq           one record per row
  text     .txt .text             one record per paragraph (lines up to a blank line); source id
                                  "<file>:<first line>". Paragraphs, not whole files: a book-sized file
                                  would otherwise be one record over `max_record_chars`.

Records that cannot be used go to the quarantine table with the reason and their raw bytes (bad JSON, not
an object, no/empty/non-string text, invalid UTF-8, over-long, a bad id, duplicate text within the shard,
any unforeseen error on that record); nothing is dropped silently and nothing is fatal. Input is streamed
and bounded: a record over `max_record_bytes` keeps only a prefix plus its length and sha256, a compressed
file is read up to `max_decompressed_bytes`, and a truncated archive keeps the records before the cut. Each record's text is split into documents of at most
`max_doc_tokens` tokens, at sentence boundaries where possible, at token boundaries inside a longer sentence.
"""
from __future__ import annotations

import base64
import bisect
import datetime as dt
import hashlib
import io
import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from toolformer_ray.core.types import Document
from toolformer_ray.errors import UserError
from toolformer_ray.storage import unit_id

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
SHARD_ID_CHARS = 24  # hex digits of sha256 (96 bits)
DOC_ID_CHARS = 32  # 128 bits: no collision in any corpus we will see


class CorpusError(UserError, ValueError):
    """Bad corpus input (missing path, unknown format, a file that changed while the job ran)."""


@dataclass(frozen=True)
class Shard:
    shard_id: str  # content hash of the file (+ "-rg<i>" for a row-group shard)
    uri: str  # the file (local path or s3://...)
    fmt: str  # "jsonl" | "parquet" | "text"
    name: str  # path relative to the listed input: used in "<file>:<line>" source ids
    size: int  # bytes of the file
    content_hash: str  # sha256 of the whole file, checked again when the shard is read
    row_group: int | None = None  # Parquet row group, or None for the whole file
    row_offset: int = 0  # rows of the file before this row group (row numbers in source ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Shard":
        return cls(**data)


@dataclass(frozen=True)
class ShardPlan:
    """A shard to process, whole (`max_docs` None) or only its first `max_docs` documents (under a limit).

    A partial shard must not be committed as complete: storage commits it under `unit_id`."""
    shard: Shard
    max_docs: int | None = None

    @property
    def complete(self) -> bool:
        return self.max_docs is None

    @property
    def unit_id(self) -> str:
        return unit_id(self.shard.shard_id, self.max_docs)

    def to_dict(self) -> dict:
        """For the manifest's `planned` list: the shard's fields, `max_docs` and `unit`."""
        return {**self.shard.to_dict(), "max_docs": self.max_docs, "unit": self.unit_id}


# ----------------------------------------------------------------------------------------------- listing

def _detect_format(path: str, fmt: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if fmt != "auto":
        return fmt
    return next((f for ext, f in _EXTENSIONS.items() if name.endswith(ext)), None)


def _hidden(rel: str) -> bool:
    # _SUCCESS, _committed/, .part files, .DS_Store: not data, by the usual convention (Spark, pyarrow).
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _fingerprint(path: str, info: dict) -> str:
    # What identifies a file version without reading it: key for the optional hash cache.
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{path}|{info.get('size')}|{version}"


def _sha256_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(uris: list[str], storage_options: dict | None = None) -> list[str]:
    """sha256 of each file, in order (serially, in this process: `list_shards`' default hasher)."""
    out = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        out.append(_sha256_file(fs, path))
    return out


def list_shards(uri: str, fmt: str = "auto", storage_options: dict | None = None,
                parquet_split_bytes: int = 128 * 2**20, hash_cache: dict[str, str] | None = None,
                hasher=None) -> list[Shard]:
    """The shards of a file, a directory (recursive) or an s3:// prefix, in path order.

    Hidden files and files whose names start with "_" are skipped; in a directory, files of unknown
    extension are skipped with a warning (a single named file must have a known format). Files with
    identical bytes are one shard (the first path wins). `hash_cache` (fingerprint -> sha256, updated in
    place) lets a nightly run avoid re-reading files it has hashed before; without it every file is read.
    `hasher(uris) -> digests` hashes the files not in the cache, all in one call, so a cluster can
    read them in parallel tasks (generate does) instead of one by one here; default: `hash_files`.
    """
    if fmt not in ("auto", "jsonl", "parquet", "text"):
        raise CorpusError(f"unknown corpus format {fmt!r} (auto, jsonl, parquet or text)")
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/") or root
    if not fs.exists(root):
        raise CorpusError(f"corpus input not found: {uri}")
    keep_protocol = "://" in uri

    if fs.isdir(root):
        infos = fs.find(root, detail=True)
        entries, hidden = [], []
        for path in sorted(infos):
            if infos[path].get("type") == "directory":
                continue
            rel = path[len(root):].lstrip("/")
            if _hidden(rel):
                hidden.append(rel)
                continue
            file_fmt = _detect_format(path, fmt)
            if file_fmt is None:
                log.warning("corpus: skipping %s (unknown extension; set corpus.format to read it)", path)
                continue
            entries.append((path, rel, file_fmt, infos[path]))
        if hidden:  # said once, so a data file that happens to start with "_" or "." is not a mystery
            log.warning("corpus: skipping %d file(s) whose path has a part starting with '.' or '_' "
                        "(not data by convention): %s", len(hidden),
                        ", ".join(hidden[:5]) + (", ..." if len(hidden) > 5 else ""))
        if not entries:
            raise CorpusError(f"no corpus files (.jsonl, .parquet, .txt, optionally compressed) under {uri}")
    else:
        file_fmt = _detect_format(root, fmt)
        if file_fmt is None:
            raise CorpusError(f"cannot tell the format of {uri} from its extension; set corpus.format")
        entries = [(root, root.rsplit("/", 1)[-1], file_fmt, fs.info(root))]

    cached: dict[str, str] = {}
    todo = []
    for path, rel, file_fmt, info in entries:
        file_uri = fs.unstrip_protocol(path) if keep_protocol else path
        key = _fingerprint(file_uri, info)
        if hash_cache is not None and key in hash_cache:
            cached[key] = hash_cache[key]
        else:
            todo.append((key, file_uri))
    if todo:
        hasher = hasher or partial(hash_files, storage_options=storage_options)
        digests = hasher([u for _, u in todo])
        for (key, _), digest in zip(todo, digests, strict=True):
            cached[key] = digest
            if hash_cache is not None:
                hash_cache[key] = digest

    shards: list[Shard] = []
    seen: dict[str, str] = {}
    for path, rel, file_fmt, info in entries:
        file_uri = fs.unstrip_protocol(path) if keep_protocol else path
        digest = cached[_fingerprint(file_uri, info)]
        if digest in seen:
            log.warning("corpus: %s has the same bytes as %s; read once", file_uri, seen[digest])
            continue
        seen[digest] = file_uri
        base_id = digest[:SHARD_ID_CHARS]
        size = int(info.get("size") or 0)
        if file_fmt == "parquet" and infer_compression(path) is not None:
            raise CorpusError(f"{file_uri}: Parquet files are compressed inside; an outer {path.rsplit('.', 1)[-1]} "
                              "is not supported")
        if file_fmt == "parquet" and size > parquet_split_bytes:
            try:
                with fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
            except (pa.ArrowException, OSError):
                meta = None  # unreadable: one whole-file shard, which read_shard quarantines
            if meta is not None and meta.num_row_groups > 1:
                offset = 0
                for i in range(meta.num_row_groups):
                    shards.append(Shard(f"{base_id}-rg{i}", file_uri, file_fmt, rel, size, digest, i, offset))
                    offset += meta.row_group(i).num_rows
                continue
        shards.append(Shard(base_id, file_uri, file_fmt, rel, size, digest))
    return shards


def plan_shards(shards: list[Shard], corpus_cfg, tokenizer, limit: int | None = None,
                storage_options: dict | None = None) -> list[ShardPlan]:
    """Which shards to process: all of them, or under `limit` the first `limit` documents over the shards
    in order. The shards this reads to count documents are read again by the workers; a limit is for
    quick runs, so that costs little. The last shard touched is partial unless the limit ends exactly at
    its end."""
    if limit is None:
        return [ShardPlan(s) for s in shards]
    plans, remaining = [], limit
    for shard in shards:
        if remaining <= 0:
            break
        docs, _ = read_shard(shard, corpus_cfg, tokenizer, max_docs=remaining + 1, storage_options=storage_options)
        if len(docs) <= remaining:
            plans.append(ShardPlan(shard))
            remaining -= len(docs)
        else:
            plans.append(ShardPlan(shard, remaining))
            remaining = 0
    return plans


# ----------------------------------------------------------------------------------------------- records

@dataclass
class _Record:
    locator: str  # "<file>:<line>" or "<file>:<row>"
    raw: bytes  # the record's bytes for the quarantine table (whole, or a prefix beyond the raw bound)
    fields: dict | None  # parsed record, or None when `error` says why not
    error: str | None = None


RAW_PREFIX_BYTES = 65536  # what quarantine keeps of a record or file over the raw bound
_BOM = b"\xef\xbb\xbf"


class _Raw:
    """A record's bytes as they stream in: whole up to `limit`, beyond it only the first RAW_PREFIX_BYTES,
    the length and the sha256, so a hostile multi-GB line costs neither memory nor a huge quarantine row."""

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
        return f"{self.length} bytes, sha256 {self.sha.hexdigest()}; only the first {len(self.buf)} kept"


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "base64:" + base64.b64encode(bytes(value)).decode()
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    return str(value)


def _read_bytes(shard: Shard, storage_options: dict | None) -> bytes:
    """The file's bytes as stored (still compressed), checked against the hash the shard was listed with."""
    fs, path = fsspec.core.url_to_fs(shard.uri, **(storage_options or {}))
    with fs.open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != shard.content_hash:
        raise CorpusError(f"{shard.uri} changed since it was listed (its bytes no longer hash to shard "
                          f"{shard.shard_id}); list the input again")
    return data


class _Decoded:
    """The file's decompressed bytes in chunks, at most `max_bytes` of them (a decompression bomb stops
    there). A truncated or corrupt archive ends early: `error` then says why and `total` how far it got."""

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
            self.error = (f"truncated or corrupt compressed file after {self.total} decompressed bytes: "
                          f"{type(e).__name__}: {e}")


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


def _unreadable(shard: Shard, data: bytes, max_raw: int, what: str, err: Exception | str) -> _Record:
    # A file that cannot be decoded at all is one quarantine row (its bytes, or a prefix), not a crash.
    raw = _Raw(max_raw)
    raw.add(data)
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    note = f" ({raw.note()})" if raw.over else ""
    return _Record(shard.name, bytes(raw.buf), None, f"unreadable {what}: {reason}{note}")


def _cut_off(shard: Shard, decoded: _Decoded, line_no: int, partial: _Raw | None) -> _Record:
    """The quarantine row for where a truncated/bombed archive stopped: the cut record's bytes, if any."""
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
            yield _Record(locator, line, None, f"record is a JSON {type(obj).__name__}, expected an object")
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
        # Row-group shards read only their byte ranges; the footer's row count guards against a changed file.
        fs, path = fsspec.core.url_to_fs(shard.uri, **(storage_options or {}))
        with fs.open(path, "rb") as f:
            if fs.size(path) != shard.size:
                raise CorpusError(f"{shard.uri} changed since it was listed; list the input again")
            table = pq.ParquetFile(f).read_row_group(shard.row_group)
    # Strings are read as bytes and decoded here, so one row of invalid UTF-8 is quarantined, not fatal.
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
                raw = json.dumps(row, default=_json_default, ensure_ascii=False).encode("utf-8", "surrogatepass")
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
        # Nothing decoded at all (not an archive, or cut in its header): the file is one quarantine row.
        yield _unreadable(shard, raw, max_raw, "compressed file", decoded.error)
        return
    if first is not None:
        yield first
        yield from records


def max_record_bytes(corpus_cfg) -> int:
    """Raw-size guard: a record's text is at most max_record_chars characters, i.e. <= 4 bytes each, plus
    room for the other fields; anything bigger is not parsed at all (corpus.max_record_bytes overrides)."""
    if corpus_cfg.max_record_bytes is not None:
        return corpus_cfg.max_record_bytes
    return 4 * corpus_cfg.max_record_chars + 65536


# ------------------------------------------------------------------------------------ fields -> documents

_ISO_DATE = re.compile(r"(?<!\d)(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?!\d)")


def _valid_date(match: re.Match) -> str | None:
    try:
        return dt.date(int(match[1]), int(match[2]), int(match[3])).isoformat()
    except ValueError:
        return None


def parse_date(value: Any) -> str | None:
    """ISO yyyy-mm-dd from a date field value (an ISO string, possibly with a time, or a date object)."""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        m = re.match(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)", value)
        return _valid_date(m) if m else None
    return None


def date_from_url(url: Any) -> str | None:
    """The first valid date in a URL path, like /2023/01/30/ or 2023-01-30."""
    if not isinstance(url, str):
        return None
    for m in _ISO_DATE.finditer(url):
        if (date := _valid_date(m)) is not None:
            return date
    return None


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
            return None, locator, f"field {id_field!r} is {type(rid).__name__}, expected a string or integer"
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
    """(text, source_id, meta, date, pieces) of a parsed record, or (_Rejected(reason), source_id, ...)."""
    is_text = shard.fmt == "text"  # a paragraph: no id, date or other fields
    text, source_id, error = _check_fields(
        rec.fields, rec.locator, text_field, None if is_text else corpus_cfg.id_field, corpus_cfg.max_record_chars)
    if error is not None:
        return _Rejected(error), source_id, None, None, None
    meta, date = {}, None
    if not is_text:
        try:
            meta = _meta(rec.fields, corpus_cfg, text_field)
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return _Rejected("a field is not valid Unicode (lone surrogate escape)"), source_id, None, None, None
        if corpus_cfg.date_field:
            date = parse_date(rec.fields.get(corpus_cfg.date_field))
        if date is None and corpus_cfg.url_field:
            date = date_from_url(rec.fields.get(corpus_cfg.url_field))
    return text, source_id, meta, date, split_text(text, tokenizer, corpus_cfg.max_doc_tokens)


def read_shard(shard: Shard, corpus_cfg, tokenizer, max_docs: int | None = None,
               storage_options: dict | None = None) -> tuple[list[Document], list[dict]]:
    """The shard's documents (in record order; at most `max_docs`) and its quarantine rows
    (schema.QUARANTINE_SCHEMA) for the records read. A document whose text already occurred in the shard
    is quarantined as a duplicate (same doc_id), so doc_id is unique within a shard. Across shards it is
    not: the same text in two files is a document of each shard, with the same doc_id (a shard's rows
    depend only on its own bytes, so shards can be done, skipped and resumed independently; consumers that
    need one row per text de-duplicate on doc_id). Any failure on one record quarantines that record."""
    docs: list[Document] = []
    quarantine: list[dict] = []
    first_source: dict[str, str] = {}
    text_field = "text" if shard.fmt == "text" else corpus_cfg.text_field

    def reject(source_id: str, reason: str, raw: bytes) -> None:
        quarantine.append({"shard": shard.shard_id, "source_id": source_id, "reason": reason, "raw": raw})

    for rec in _records(shard, corpus_cfg, storage_options):
        if max_docs is not None and len(docs) >= max_docs:
            break
        if rec.error is not None:
            reject(rec.locator, rec.error, rec.raw)
            continue
        try:
            text, source_id, meta, date, pieces = _document_fields(rec, shard, corpus_cfg, text_field, tokenizer)
        except Exception as e:  # noqa: BLE001 - one odd record must not sink its shard
            reject(rec.locator, f"record could not be read: {type(e).__name__}: {_first_line(e)}", rec.raw)
            continue
        if isinstance(text, _Rejected):
            reject(source_id, text.reason, rec.raw)
            continue
        for piece in pieces:
            if max_docs is not None and len(docs) >= max_docs:
                break
            doc_id = doc_id_for(piece)
            if doc_id in first_source:
                reject(source_id, f"duplicate text: document {doc_id} already read from {first_source[doc_id]}",
                       piece.encode("utf-8"))
                continue
            first_source[doc_id] = source_id
            docs.append(Document(doc_id=doc_id, text=piece, source_id=source_id, shard=shard.shard_id,
                                 date=date, meta=meta))
    return docs, quarantine


# --------------------------------------------------------------------------------------- splitting

# Gaps between sentences: whitespace after . ! ? … (optionally closed by a quote or bracket), after a CJK
# full stop, or at a line break. Gaps are whitespace only, so no visible text is lost at a cut. (Not
# "\s*\n": tried at every position of a long run of spaces, that is quadratic; the whitespace before a line
# break is stripped from the span instead.)
_SENTENCE_GAP = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|(?<=[。！？])\s*|\n\s*")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, prev = [], 0
    for m in _SENTENCE_GAP.finditer(text):
        spans.append((prev, m.start()))
        prev = m.end()
    spans.append((prev, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _strip_span(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def split_text(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Cut `text` into pieces of at most `max_tokens` tokens (counted without special tokens): whole
    sentences packed greedily, a sentence longer than the limit cut at token boundaries. Pieces are
    stripped of outer whitespace; only whitespace is lost at the cuts. Every piece is counted exactly
    (estimates from the whole text's token offsets only choose where to cut)."""
    text = text.strip()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return [text] if text else []
    starts = [s for s, _ in enc["offset_mapping"]]

    def estimate(a: int, b: int) -> int:  # tokens of the whole text that start inside [a, b)
        return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

    spans = _sentence_spans(text)
    pieces: list[str] = []
    i = 0
    while i < len(spans):
        j = i
        while j + 1 < len(spans) and estimate(spans[i][0], spans[j + 1][1]) <= max_tokens:
            j += 1
        while True:
            a, b = spans[i][0], spans[j][1]
            if _n_tokens(tokenizer, text[a:b]) <= max_tokens:
                pieces.append(text[a:b])
                break
            if j > i:
                j -= 1
                continue
            pieces.extend(_split_tokens(text, a, b, starts, tokenizer, max_tokens))
            break
        i = j + 1
    return pieces


def _split_tokens(text: str, a: int, b: int, starts: list[int], tokenizer, max_tokens: int) -> list[str]:
    """Cut text[a:b] (one over-long sentence) at token starts into pieces of at most max_tokens tokens."""
    # Distinct token start positions inside the span: a character split into several byte tokens has
    # one start, and a cut can only fall between characters.
    cuts = sorted({s for s in starts[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)] if s > a})
    pieces: list[str] = []
    pos = a
    while pos < b:
        k = bisect.bisect_right(cuts, pos)  # first cut after pos
        # The most cuts whose span holds at most max_tokens of the whole text's tokens: a character of
        # several byte tokens is one cut, so counting cuts alone would overshoot and shrink one at a time
        # (re-encoding the piece each time: ~max_tokens encodes per character for CJK).
        lo = bisect.bisect_left(starts, pos)
        n = max(1, bisect.bisect_right(cuts, starts[lo + max_tokens]) - k if lo + max_tokens < len(starts)
                else len(cuts) - k + 1)
        while True:
            end = cuts[k + n - 1] if k + n - 1 < len(cuts) else b
            pa_, pb_ = _strip_span(text, pos, end)
            excess = _n_tokens(tokenizer, text[pa_:pb_]) - max_tokens if pa_ < pb_ else 0
            if excess <= 0 or n == 1:
                break
            n = max(1, min(n - 1, n - excess))  # each cut holds at least one token: drop the excess at once
        if pa_ < pb_:
            pieces.append(text[pa_:pb_])
        pos = end
    return pieces
