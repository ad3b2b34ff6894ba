"""Output storage: layout, exactly-once commits (also across a real SIGKILL), partial units, versions,
manifest; on a local path and on the S3 endpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from toolformer_ray import fsutil, storage
from toolformer_ray.datajob.records import (CALLS_SCHEMA, DOCUMENTS_SCHEMA, QUARANTINE_SCHEMA,
                                            SCHEMA_VERSION)
from toolformer_ray.storage import OutputStore, build_manifest, conform, put_bytes

HASH = "cafe0123456789ab"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(output uri, storage options, env for subprocesses) on a local path or the S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "out"), None, {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return endpoint.uri("runs"), endpoint.storage_options, endpoint.env


def call_rows(shard: str, n: int) -> list[dict]:
    return [{
        "doc_id": f"{shard}-d{i}", "source_id": f"s{i}", "shard": shard, "tool": "Calculator", "call": "1+1",
        "result": "2", "char_pos": i, "token_pos": i, "p_api": 0.5, "prefix_plus": "[Calculator(1+1) -> 2]\n",
        "prefix_no_result": "[Calculator(1+1) ->]\n", "inserted_text": " [Calculator(1+1) -> 2]",
        "loss_plus": 1.0, "loss_no_call": 2.5, "loss_call_no_result": 2.0, "tau_f": 0.5, "model": "tiny",
        "model_revision": "abc", "dtype": "float32", "config_hash": HASH, "schema_version": SCHEMA_VERSION,
        "code_version": "0.1.0+src.test",
    } for i in range(n)]


def shard_tables(shard: str, n_calls: int, n_docs: int = 2) -> dict[str, pa.Table]:
    docs = [{"doc_id": f"{shard}-d{i}", "source_id": f"s{i}", "shard": shard, "text": "t", "augmented_text": "t",
             "n_calls": 0, "date": None, "meta": "{}"} for i in range(n_docs)]
    # Columns in another order than the schema: the store puts them in schema order.
    calls = pa.Table.from_pylist(call_rows(shard, n_calls), schema=CALLS_SCHEMA)
    calls = calls.select(list(reversed(calls.column_names)))
    return {"calls": calls, "documents": pa.Table.from_pylist(docs, schema=DOCUMENTS_SCHEMA)}


def record(n_docs: int = 2) -> dict:
    return {"funnel": {"Calculator": {"docs_seen": n_docs, "kept_tau_f": 1}}, "timings": {"sample": 1.5}}


def listing(store: OutputStore, name: str) -> list[str]:
    store.fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(name), detail=False))


def dir_dataset(store: OutputStore, name: str) -> pa.Table:
    """What a user gets from pyarrow.dataset.dataset(<version>/<name>)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    if fsutil.is_local(store.fs):
        return pads.dataset(store.path(name), format="parquet").to_table()
    return pads.dataset(store.path(name), format="parquet", filesystem=PyFileSystem(FSSpecHandler(store.fs))).to_table()


# ----------------------------------------------------------------------------------------------- basics

def test_write_read_and_layout(output):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    assert store.committed_shards() == set()
    assert store.read_table("calls").schema == CALLS_SCHEMA and store.read_table("calls").num_rows == 0

    commit = store.write_shard("shardA", shard_tables("shardA", 3), {**record(), "uri": "in/a.jsonl"})
    store.write_shard("shardB", shard_tables("shardB", 0), record())
    assert store.committed_shards() == {"shardA", "shardB"}
    assert commit["rows"] == {"calls": 3, "candidates": 0, "documents": 2, "quarantine": 0}
    assert commit["files"]["calls"] == "calls/shardA.parquet" and commit["uri"] == "in/a.jsonl"

    for name in ("calls", "candidates", "documents", "quarantine"):
        assert listing(store, name) == ["shardA.parquet", "shardB.parquet"]
    assert listing(store, "_committed") == ["shardA.json", "shardB.json"]

    calls = store.read_table("calls")
    assert calls.schema == CALLS_SCHEMA and calls.num_rows == 3
    assert calls.to_pylist() == call_rows("shardA", 3)
    assert store.read_table("quarantine").schema == QUARANTINE_SCHEMA
    assert dir_dataset(store, "calls").num_rows == 3  # empty files carry the schema too
    assert dir_dataset(store, "documents").num_rows == 4

    # A second store on the same output and hash sees the same commits (a later run appends).
    again = OutputStore(uri, HASH, options)
    assert again.committed_shards() == {"shardA", "shardB"}
    # A changed config hash is a separate version.
    other = OutputStore(uri, "0000000000000000", options)
    assert other.committed_shards() == set() and other.read_table("calls").num_rows == 0


def test_loads_with_datasets(output, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # models.py sets HF_HUB_OFFLINE=1 (no hub, ever); `datasets` reads that as "no remote files" and would
    # refuse s3:// too. A user outside this process, or with HF_DATASETS_OFFLINE=0, is not affected.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    store.write_shard("shardA", shard_tables("shardA", 3), record())
    store.write_shard("shardB", shard_tables("shardB", 0), record())
    ds = datasets.load_dataset("parquet", data_files=store.table_files("calls"), split="train",
                               storage_options=options, cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 3 and ds[0]["tool"] == "Calculator"


def test_bad_tables_are_rejected(tmp_path):
    store = OutputStore(str(tmp_path), HASH)
    with pytest.raises(ValueError, match="missing"):
        store.write_shard("s", {"calls": pa.table({"doc_id": ["x"]})}, {})
    assert store.committed_shards() == set()
    with pytest.raises(ValueError):
        conform("calls", pa.table({**{f.name: pa.nulls(1, f.type) for f in CALLS_SCHEMA}, "extra": [1]}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError):
        OutputStore(str(tmp_path / "file"), HASH)


def test_local_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    fs = OutputStore(str(tmp_path), HASH).fs
    target = str(tmp_path / "x" / "obj.bin")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError):
        put_bytes(fs, target, b"data")
    assert os.listdir(tmp_path / "x") == []


# ------------------------------------------------------------------------------------------ exactly once

def test_crash_between_tables_and_commit_then_redo(output, monkeypatch):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    store.write_shard("done", shard_tables("done", 1), record())

    def killed(self, unit, blob):
        raise KeyboardInterrupt("killed before the commit record")
    monkeypatch.setattr(OutputStore, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_shard("crash", shard_tables("crash", 2), record())
    monkeypatch.undo()

    # The tables are there but the shard is not done, and committed readers do not see it.
    assert "crash.parquet" in listing(store, "calls")
    assert store.committed_shards() == {"done"}
    assert store.read_table("calls").num_rows == 1
    assert not store.is_done("crash")

    store.write_shard("crash", shard_tables("crash", 2), record())  # the redo
    assert listing(store, "calls") == ["crash.parquet", "done.parquet"]
    assert store.read_table("calls").num_rows == 3
    assert dir_dataset(store, "calls").num_rows == 3  # exactly one copy, also for a plain directory reader


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import pyarrow as pa
    from toolformer_ray.storage import OutputStore
    from toolformer_ray.datajob.records import CALLS_SCHEMA
    uri, options, rows = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

    def die(self, unit, blob):  # the process dies for real between the last table and the commit record
        os.kill(os.getpid(), signal.SIGKILL)
    OutputStore._commit = die
    store = OutputStore(uri, "%s", options or None)
    store.write_shard("victim", {"calls": pa.Table.from_pylist(rows, schema=CALLS_SCHEMA)}, {})
""" % HASH)


def test_sigkill_before_commit_then_resume(output):
    uri, options, env = output
    rows = call_rows("victim", 4)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, uri, json.dumps(options), json.dumps(rows)],
                          env={**os.environ, **env}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    store = OutputStore(uri, HASH, options)
    assert "victim.parquet" in listing(store, "calls")  # written before the kill
    assert store.committed_shards() == set() and store.read_table("calls").num_rows == 0

    store.write_shard("victim", {"calls": pa.Table.from_pylist(rows, schema=CALLS_SCHEMA)}, record())
    assert store.committed_shards() == {"victim"}
    assert listing(store, "calls") == ["victim.parquet"]
    assert dir_dataset(store, "calls").to_pylist() == rows


def test_remove_uncommitted(output, monkeypatch):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    store.write_shard("kept", shard_tables("kept", 1), record())
    monkeypatch.setattr(OutputStore, "_commit", lambda self, unit, blob: None)  # a run that died
    store.write_shard("orphan", shard_tables("orphan", 1), record())
    monkeypatch.undo()
    put_bytes(store.fs, store.path("calls", ".x.parquet.tmp-123"), b"partial")
    removed = store.remove_uncommitted()
    assert sorted(r.rsplit("/", 1)[-1] for r in removed) == [".x.parquet.tmp-123"] + ["orphan.parquet"] * 4
    for name in ("calls", "candidates", "documents", "quarantine"):
        assert listing(store, name) == ["kept.parquet"]
    assert store.read_table("calls").num_rows == 1


# ---------------------------------------------------------------------------------------- partial units

def test_partial_units_under_a_limit(output):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    store.write_shard("s", shard_tables("s", 1, n_docs=5), record(5), max_docs=5)
    assert store.committed_shards() == set()  # a partial shard is never complete
    assert store.is_done("s", 5) and not store.is_done("s", 10) and not store.is_done("s")
    assert store.read_table("documents").num_rows == 5  # but its rows are readable

    store.write_shard("s", shard_tables("s", 2, n_docs=10), record(10), max_docs=10)
    assert listing(store, "documents") == ["s-first10.parquet"]  # the smaller partial is superseded
    assert store.read_table("documents").num_rows == 10

    store.write_shard("s", shard_tables("s", 3, n_docs=12), record(12))
    assert store.committed_shards() == {"s"} and store.is_done("s", 5)
    assert listing(store, "documents") == ["s.parquet"] and listing(store, "_committed") == ["s.json"]
    assert dir_dataset(store, "documents").num_rows == 12
    with pytest.raises(ValueError, match="already committed"):
        store.write_shard("s", shard_tables("s", 1), record(), max_docs=5)


def test_units_of_one_shard(tmp_path):
    store = OutputStore(str(tmp_path), HASH)
    for sid in ("x-rg1", "x-rg10"):
        store.write_shard(sid, {}, {}, max_docs=3)
    store.write_shard("x-rg1", {}, {})
    assert set(store.committed_units("x-rg1")) == {"x-rg1"}  # not x-rg10's units, which share the prefix
    assert set(store.committed_units()) == {"x-rg1", "x-rg10-first3"}


def test_readers_prefer_complete_if_cleanup_was_interrupted(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path), HASH)
    store.write_shard("s", shard_tables("s", 1, n_docs=5), record(5), max_docs=5)
    monkeypatch.setattr(OutputStore, "_drop_superseded", lambda self, shard_id, keep: None)  # killed after commit
    store.write_shard("s", shard_tables("s", 3, n_docs=12), record(12))
    monkeypatch.undo()
    assert list(store.readable_units()) == ["s"]
    assert store.read_table("documents").num_rows == 12
    store.remove_uncommitted()  # superseded partial files stay referenced until cleanup drops the record
    store._drop_superseded("s", "s")
    assert listing(store, "documents") == ["s.parquet"]


# ------------------------------------------------------------------------------------------------ manifest

def test_manifest(output):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    assert store.read_manifest() is None
    store.write_shard("a", shard_tables("a", 2), {**record(2), "uri": "in/a"})
    store.write_shard("b", shard_tables("b", 1, n_docs=3), {**record(3), "uri": "in/b"}, max_docs=3)
    planned = [{"shard_id": "a", "uri": "in/a"}, {"shard_id": "b", "uri": "in/b", "max_docs": 3},
               {"shard_id": "c", "uri": "in/c"}]
    manifest = build_manifest(store, config={"x": 1}, model={"path": "tiny", "revision": "r"},
                              inputs={"uri": "in"}, planned=planned, run={"run": 1})
    store.write_manifest(manifest)
    assert {k: v["status"] for k, v in manifest["shards"].items()} == {"a": "done", "b": "partial", "c": "pending"}
    assert manifest["counts"]["rows"]["calls"] == 3 and manifest["counts"]["shards_pending"] == 1
    assert manifest["funnel"]["Calculator"]["docs_seen"] == 5 and manifest["funnel"]["Calculator"]["kept_tau_f"] == 2
    assert manifest["funnel"]["Calculator"]["calls_sampled"] == 0  # every funnel key is present
    assert manifest["timings"] == {"sample": 3.0}
    assert store.read_manifest() == json.loads(json.dumps(manifest, default=str))

    store.write_shard("c", shard_tables("c", 0), record(1))
    second = build_manifest(store, config={"x": 1}, model={}, inputs={}, planned=planned[2:], run={"run": 2})
    assert second["runs"] == [{"run": 1}, {"run": 2}]  # the history of runs on this version
    assert second["shards"]["c"]["status"] == "done" and set(second["shards"]) == {"a", "b", "c"}


def test_hash_cache_roundtrip(output):
    uri, options, _ = output
    store = OutputStore(uri, HASH, options)
    assert store.load_hash_cache() == {}
    store.save_hash_cache({"f|1|x": "abc"})
    assert OutputStore(uri, "other", options).load_hash_cache() == {"f|1|x": "abc"}  # shared by versions
