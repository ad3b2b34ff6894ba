"""Output storage, exactly once: a shard's tables are published whole, then committed.

Layout under `run.output` (a local path or s3://...):

    <output>/<config_hash>/         one output version; a changed config hash starts a new one
        calls/<unit>.parquet        kept calls                      (records.CALLS_SCHEMA)
        candidates/<unit>.parquet   every scored call + `kept`      (records.CANDIDATES_SCHEMA)
        documents/<unit>.parquet    documents with calls inline     (records.DOCUMENTS_SCHEMA)
        quarantine/<unit>.parquet   unusable records                (records.QUARANTINE_SCHEMA)
        _committed/<unit>.json      the commit record: written LAST; the shard is done iff it exists
        manifest.json               inputs, config, model, per-shard status, funnel, timings
        report/                     report.md + PNGs
    <output>/_shard_hashes.json     listing cache: file fingerprint -> content hash (any version)

`<unit>` is the shard id, or "<shard id>-first<N>" for a shard read only up to its first N documents
(a `corpus.limit` run): a partial unit never counts as the complete shard. File names are
deterministic, so a redone shard overwrites its files instead of adding copies. Each object is
written atomically (local: a hidden temporary name, then os.replace; S3: one PUT, visible only when
complete). A killed run leaves at worst table files without a commit record: readers of committed
shards ignore them, the redo overwrites them, and `remove_uncommitted()` deletes them.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from toolformer_ray.errors import UserError
from toolformer_ray.datajob.records import (CALLS_SCHEMA, CANDIDATES_SCHEMA, DOCUMENTS_SCHEMA,
                                            FUNNEL_KEYS, QUARANTINE_SCHEMA, SCHEMA_VERSION)
from toolformer_ray.fsutil import is_local

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "calls": CALLS_SCHEMA,
    "candidates": CANDIDATES_SCHEMA,
    "documents": DOCUMENTS_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
}
COMMITTED = "_committed"
MANIFEST = "manifest.json"
HASH_CACHE = "_shard_hashes.json"


class StorageError(UserError, OSError):
    """An output location that cannot be used (e.g. a file where a directory should be)."""


def unit_id(shard_id: str, max_docs: int | None = None) -> str:
    """The name a shard's outputs are committed under: the shard id, or "<shard id>-first<N>" if
    partial."""
    return shard_id if max_docs is None else f"{shard_id}-first{max_docs}"


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write one object atomically: readers see the old object or the new one, never a part."""
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        # hidden: dataset readers skip it
        tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # one PUT (multipart above 100 MB): the object appears whole or not at all
        fs.pipe_file(path, data)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        # An empty table is written as a schema without row groups: `datasets` fails on a 0-row row
        # group ("BatchSize must be greater than 0"), while it skips a file that has none.
        if table.num_rows:
            writer.write_table(table)
    return buf.getvalue()


def conform(name: str, table: pa.Table | None) -> pa.Table:
    """The table in its schema's column order and types (an empty table if None), or a clear
    error."""
    schema = TABLE_SCHEMAS.get(name)
    if table is None:
        if schema is None:
            raise ValueError(f"table {name!r} is None and has no known schema")
        return schema.empty_table()
    if schema is None:
        return table
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise ValueError(f"table {name!r} does not match its schema: missing {missing}, "
                         f"unexpected {extra}")
    return table.select(schema.names).cast(schema)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class OutputStore:
    """One output version: `<output_uri>/<config_hash>/`."""

    def __init__(self, output_uri: str, config_hash: str, storage_options: dict | None = None):
        if not config_hash or "/" in config_hash:
            raise ValueError(f"bad config hash {config_hash!r}")
        self.output_uri = output_uri.rstrip("/")
        self.config_hash = config_hash
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.output_uri, **self.storage_options)
        self.root = root.rstrip("/")
        self.version_dir = f"{self.root}/{config_hash}"
        if self.fs.isfile(self.root) or self.fs.isfile(self.version_dir):
            raise StorageError(f"output path {self.output_uri} is a file, expected a directory "
                               "or prefix")

    # ---------------------------------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        """Filesystem path (for self.fs) of a file inside the version, e.g. path("calls",
        "x.parquet")."""
        return "/".join([self.version_dir, *parts])

    def uri(self, *parts: str) -> str:
        """The same as a URI for users and other libraries: s3://... or a local path."""
        p = self.path(*parts)
        return p if is_local(self.fs) else self.fs.unstrip_protocol(p)

    def table_path(self, name: str, unit: str) -> str:
        return self.path(name, f"{unit}.parquet")

    def commit_path(self, unit: str) -> str:
        return self.path(COMMITTED, f"{unit}.json")

    # --------------------------------------------------------------------------------- commit state
    def committed_units(self, shard_id: str | None = None) -> dict[str, dict]:
        """unit -> commit record, for every committed unit (complete and partial), or only
        `shard_id`'s."""
        directory = self.path(COMMITTED)
        # s3fs caches listings; another process may have committed
        self.fs.invalidate_cache(directory)
        try:
            paths = self.fs.glob(f"{directory}/{shard_id or ''}*.json")
        except FileNotFoundError:
            return {}
        units = {}
        if paths:
            for path, blob in self.fs.cat(paths).items():
                record = json.loads(blob)
                # "x-rg1*" also matches "x-rg10"
                if shard_id is None or record["shard_id"] == shard_id:
                    units[record["unit"]] = record
        return units

    def committed_shards(self) -> set[str]:
        """Shard ids whose complete outputs are committed (partial units under a limit do not
        count)."""
        return {r["shard_id"] for r in self.committed_units().values() if r["complete"]}

    def readable_units(self, units: dict[str, dict] | None = None) -> dict[str, dict]:
        """The units the dataset consists of: per shard its complete unit, else its largest partial
        one."""
        units = self.committed_units() if units is None else units
        best: dict[str, dict] = {}
        for record in units.values():
            cur = best.get(record["shard_id"])
            if cur is None or _rank(record) > _rank(cur):
                best[record["shard_id"]] = record
        return {r["unit"]: r for r in sorted(best.values(), key=lambda r: r["unit"])}

    def is_done(self, shard_id: str, max_docs: int | None = None,
                units: dict[str, dict] | None = None) -> bool:
        """Whether this shard (or its first `max_docs` documents) need not be processed again: its
        complete unit, or exactly this partial unit, is committed."""
        units = self.committed_units() if units is None else units
        complete = units.get(shard_id)
        if complete is not None and complete["complete"]:
            return True
        return unit_id(shard_id, max_docs) in units

    # ---------------------------------------------------------------------------------------- write
    def write_shard(self, shard_id: str, tables: dict[str, pa.Table], record: dict,
                    max_docs: int | None = None) -> dict:
        """Publish a shard's tables, then its commit record (LAST). Tables of the four known kinds
        that are missing are written empty, with their schema. `record` (counts, funnel {tool:
        {key: n}}, timings {stage: s}, shard info) goes into the commit record. Returns the
        commit record.

        A complete commit supersedes the shard's partial units, which are then deleted (commit
        records first, so no reader ever sees both); likewise a partial commit supersedes smaller
        partial ones."""
        unit = unit_id(shard_id, max_docs)
        if max_docs is not None and self.is_done(shard_id, units=self.committed_units(shard_id)):
            raise ValueError(f"shard {shard_id} is already committed complete; a partial commit "
                             "would hide nothing but waste work")
        names = list(dict.fromkeys([*TABLE_SCHEMAS, *tables]))
        files, rows = {}, {}
        for name in names:
            table = conform(name, tables.get(name))
            put_bytes(self.fs, self.table_path(name, unit), table_bytes(table))
            files[name] = f"{name}/{unit}.parquet"
            rows[name] = table.num_rows
        commit = {
            **record,
            "unit": unit,
            "shard_id": shard_id,
            "complete": max_docs is None,
            "max_docs": max_docs,
            "config_hash": self.config_hash,
            "schema_version": SCHEMA_VERSION,
            "files": files,
            "rows": rows,
            "committed_at": _now(),
        }
        self._commit(unit, json.dumps(commit, indent=1, default=str).encode())
        self._drop_superseded(shard_id, unit)
        return commit

    def _commit(self, unit: str, blob: bytes) -> None:
        put_bytes(self.fs, self.commit_path(unit), blob)

    def _drop_superseded(self, shard_id: str, keep: str) -> None:
        units = self.committed_units(shard_id)
        best = self.readable_units(units)
        for unit, record in units.items():
            if unit != keep and unit not in best:
                self.fs.rm_file(self.commit_path(unit))
                for rel in record["files"].values():
                    if self.fs.exists(self.path(rel)):
                        self.fs.rm_file(self.path(rel))

    def remove_uncommitted(self) -> list[str]:
        """Delete table files that no committed unit references (leftovers of killed runs,
        superseded partial units) and temporary files. Run it only when no other run writes to
        this version."""
        units = self.committed_units().values()
        referenced = {self.path(rel) for r in units for rel in r["files"].values()}
        removed = []
        for name in {*TABLE_SCHEMAS, *(n for r in units for n in r["files"])}:
            directory = self.path(name)
            self.fs.invalidate_cache(directory)
            if not self.fs.isdir(directory):
                continue
            for path in self.fs.ls(directory, detail=False):
                path = path.rstrip("/")
                base = path.rsplit("/", 1)[-1]
                if path not in referenced and (base.endswith(".parquet") or ".tmp-" in base):
                    self.fs.rm_file(path)
                    removed.append(path)
        return removed

    # ----------------------------------------------------------------------------------------- read
    def table_files(self, name: str) -> list[str]:
        """URIs of the committed files of a table (for datasets.load_dataset("parquet",
        data_files=...))."""
        units = self.readable_units().values()
        return [self.uri(r["files"][name]) for r in units if name in r["files"]]

    def read_table(self, name: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        """A table over the committed shards only (uncommitted leftovers are never read); `columns`
        and `filter` (a pyarrow.compute expression) are pushed down to the Parquet reader."""
        units = self.readable_units().values()
        paths = [self.path(r["files"][name]) for r in units if name in r["files"]]
        schema = TABLE_SCHEMAS.get(name)
        if not paths:
            if schema is None:
                raise KeyError(f"no committed table {name!r}")
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        filesystem = PyFileSystem(FSSpecHandler(self.fs))
        dataset = pads.dataset(paths, format="parquet", filesystem=filesystem, schema=schema)
        return dataset.to_table(columns=columns, filter=filter)

    # ----------------------------------------------------------------------------- small JSON files
    def write_json(self, rel: str, data: Any) -> None:
        put_bytes(self.fs, self.path(rel), json.dumps(data, indent=1, default=str).encode())

    def read_json(self, rel: str) -> Any | None:
        path = self.path(rel)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> str:
        put_bytes(self.fs, self.path(rel), data)
        return self.uri(rel)

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, manifest)

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST)

    # Content hashes of input files by fingerprint (path, size, ETag/mtime): shared by all versions.
    def load_hash_cache(self) -> dict[str, str]:
        path = f"{self.root}/{HASH_CACHE}"
        try:
            return json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save_hash_cache(self, cache: dict[str, str]) -> None:
        put_bytes(self.fs, f"{self.root}/{HASH_CACHE}", json.dumps(cache, sort_keys=True).encode())


def _rank(record: dict) -> tuple[int, int]:
    # A complete unit beats any partial one; among partial units, more documents win.
    return (1, 0) if record["complete"] else (0, record.get("max_docs") or 0)


# ----------------------------------------------------------------------------------------- manifest

def sum_funnels(records: list[dict]) -> dict[str, dict[str, int]]:
    """Funnel counts {tool: {key: n}} summed over commit records (FUNNEL_KEYS first, any others
    after)."""
    total: dict[str, dict[str, int]] = {}
    for record in records:
        for tool, counts in (record.get("funnel") or {}).items():
            acc = total.setdefault(tool, {k: 0 for k in FUNNEL_KEYS})
            for key, n in counts.items():
                acc[key] = acc.get(key, 0) + n
    return total


def sum_timings(records: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for record in records:
        for stage, seconds in (record.get("timings") or {}).items():
            total[stage] = total.get(stage, 0.0) + float(seconds)
    return total


def build_manifest(store: OutputStore, *, config: dict, model: dict, inputs: dict,
                   planned: list[dict] | None = None, run: dict | None = None) -> dict:
    """The version's manifest from its commit records (so it also covers shards of earlier runs).

    config   the resolved config (Config.model_dump(mode="json"))
    model    {"name"/"path", "revision", "dtype"}
    inputs   {"uri", "format", "shards": n, "limit"}
    planned  this run's shards: [{"shard_id", "uri", "max_docs", ...}]; those without a commit are
             listed as "pending" (a killed or failed run)
    run      this run's summary ({"started_at", "finished_at", "timings", ...}); appended to the
             history kept from the previous manifest
    """
    units = store.committed_units()
    readable = store.readable_units(units)
    shards: dict[str, dict] = {}
    for record in readable.values():
        shards[record["shard_id"]] = {
            "status": "done" if record["complete"] else "partial",
            "unit": record["unit"], "max_docs": record["max_docs"], "uri": record.get("uri"),
            "rows": record["rows"], "committed_at": record["committed_at"],
        }
    for item in planned or []:
        sid = item["shard_id"]
        if not store.is_done(sid, item.get("max_docs"), units):
            shards[sid] = {"status": "pending", "unit": unit_id(sid, item.get("max_docs")),
                           "max_docs": item.get("max_docs"), "uri": item.get("uri")}
    previous = store.read_manifest() or {}
    runs = list(previous.get("runs", []))
    if run is not None:
        runs.append(run)
    records = list(readable.values())
    totals = {name: sum(r["rows"].get(name, 0) for r in records) for name in TABLE_SCHEMAS}
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": store.config_hash,
        "output": store.uri(),
        "updated_at": _now(),
        "inputs": inputs,
        "model": model,
        "config": config,
        "shards": dict(sorted(shards.items())),
        "counts": {
            "shards_done": sum(s["status"] == "done" for s in shards.values()),
            "shards_partial": sum(s["status"] == "partial" for s in shards.values()),
            "shards_pending": sum(s["status"] == "pending" for s in shards.values()),
            "rows": totals,
        },
        "funnel": sum_funnels(records),
        "timings": sum_timings(records),
        "runs": runs,
    }
