"""Listing the corpus input: a file, directory or s3:// prefix -> shards, known by content.

A shard is a whole file, or one row group of a large Parquet file. Its `shard_id` is a hash of the
file's bytes (plus the row-group index), so a nightly run recognises the shards it has done by
content, not by name or file time; a file rewritten with the same bytes is the same shard.

Formats (by extension, or all files as `corpus.format`; .gz/.bz2/.xz/.zst compression is inferred):
  jsonl    .jsonl .ndjson .json   one JSON object per line; blank lines are skipped
  parquet  .parquet .pq           one record per row
  text     .txt .text             one record per paragraph (formats.py)
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from toolformer_ray.errors import UserError
from toolformer_ray.fsutil import sha256_file
from toolformer_ray.storage import unit_id

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
SHARD_ID_CHARS = 24  # hex digits of sha256 (96 bits)


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
    """A shard to process, whole (`max_docs` None) or only its first `max_docs` documents (under a
    limit).

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
    # _SUCCESS, _committed/, .part files, .DS_Store: not data, by the usual convention (Spark,
    # pyarrow).
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _fingerprint(path: str, info: dict) -> str:
    # What identifies a file version without reading it: key for the optional hash cache.
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{path}|{info.get('size')}|{version}"


def hash_files(uris: list[str], storage_options: dict | None = None) -> list[str]:
    """sha256 of each file, in order (serially, in this process: `list_shards`' default hasher)."""
    out = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        out.append(sha256_file(path, fs).hexdigest())
    return out


def list_shards(uri: str, fmt: str = "auto", storage_options: dict | None = None,
                parquet_split_bytes: int = 128 * 2**20, hash_cache: dict[str, str] | None = None,
                hasher=None) -> list[Shard]:
    """The shards of a file, a directory (recursive) or an s3:// prefix, in path order.

    Hidden files and files whose names start with "_" are skipped; in a directory, files of unknown
    extension are skipped with a warning (a single named file must have a known format). Files with
    identical bytes are one shard (the first path wins). `hash_cache` (fingerprint -> sha256,
    updated in place) lets a nightly run avoid re-reading files it has hashed before; without it
    every file is read. `hasher(uris) -> digests` hashes the files not in the cache, all in one
    call, so a cluster can read them in parallel tasks (generate does) instead of one by one here;
    default: `hash_files`.
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
                log.warning("corpus: skipping %s (unknown extension; set corpus.format to read it)",
                            path)
                continue
            entries.append((path, rel, file_fmt, infos[path]))
        # said once, so a data file that happens to start with "_" or "." is not a mystery
        if hidden:
            log.warning("corpus: skipping %d file(s) whose path has a part starting with '.' or "
                        "'_' (not data by convention): %s", len(hidden),
                        ", ".join(hidden[:5]) + (", ..." if len(hidden) > 5 else ""))
        if not entries:
            raise CorpusError(f"no corpus files (.jsonl, .parquet, .txt, optionally compressed) "
                              f"under {uri}")
    else:
        file_fmt = _detect_format(root, fmt)
        if file_fmt is None:
            raise CorpusError(f"cannot tell the format of {uri} from its extension; "
                              "set corpus.format")
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
            outer = path.rsplit('.', 1)[-1]
            raise CorpusError(f"{file_uri}: Parquet files are compressed inside; an outer {outer} "
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
                    shards.append(Shard(f"{base_id}-rg{i}", file_uri, file_fmt, rel, size, digest,
                                        i, offset))
                    offset += meta.row_group(i).num_rows
                continue
        shards.append(Shard(base_id, file_uri, file_fmt, rel, size, digest))
    return shards
