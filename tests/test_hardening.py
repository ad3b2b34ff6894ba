"""Hostile and mistaken input (issue 17): every bad record is quarantined with its reason and loses
nothing else, bounded in memory; every config or command-line mistake is one line and exit 2."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from toolformer_ray import cli
from toolformer_ray.config import ConfigError, CorpusConfig, ToolConfig, load_config
from toolformer_ray.datajob.corpus import (doc_id_for, formats, list_shards, read_shard, split,
                                           split_text)
from toolformer_ray.datajob.corpus import read as corpus_read
from toolformer_ray.models import load_tokenizer, resolve_model_dir
from toolformer_ray.tools.base import Tool
from toolformer_ray.tools.calculator import Calculator
from toolformer_ray.tools.executor import LocalToolExecutor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_dir("tiny"))


def lines_of(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def read(path, tok, **cfg):
    return read_shard(list_shards(str(path))[0], CorpusConfig(**cfg), tok)


# ------------------------------------------------------------------------------------ records (items 2, 6, 12)

def test_record_level_failures_are_quarantined_not_fatal(tmp_path, tok, monkeypatch):
    deep = b'{"text": "deep", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    big_int = b'{"text": "big", "n": ' + b"7" * 5000 + b"}"
    path = tmp_path / "a.jsonl"
    path.write_bytes(lines_of([{"text": "First fine one."}]) + deep + b"\n" + big_int + b"\n"
                     + lines_of([{"text": "Odd date.", "date": "boom"}, {"text": "Last fine one."}]))
    real = corpus_read.iso_date

    def parse_date(value):  # an unforeseen failure on one record's field
        if value == "boom":
            raise OverflowError("unexpected")
        return real(value)

    monkeypatch.setattr(corpus_read, "iso_date", parse_date)
    docs, quarantine = read(path, tok)
    assert [d.text for d in docs] == ["First fine one.", "Last fine one."]
    reasons = {q["source_id"]: q["reason"] for q in quarantine}
    assert reasons["a.jsonl:2"].startswith("bad JSON: RecursionError")
    assert reasons["a.jsonl:3"].startswith("bad JSON: ValueError: Exceeds the limit (4300 digits)")
    assert reasons["a.jsonl:4"] == "record could not be read: OverflowError: unexpected"
    assert {q["raw"] for q in quarantine} == {deep, big_int, json.dumps({"text": "Odd date.", "date": "boom"}).encode()}


def test_decompression_bomb_is_bounded(tmp_path, tok):
    # One 64 MB line from a ~64 KB .gz: streamed, only a prefix, its length and sha256 are kept.
    line = b'{"text": "' + b"a" * (64 * 2**20) + b'"}'
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(line + b"\n" + lines_of([{"text": "After the bomb."}]), compresslevel=1))
    tracemalloc.start()
    try:
        docs, quarantine = read(path, tok)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["After the bomb."]
    (q,) = quarantine
    assert q["raw"] == line[:formats.RAW_PREFIX_BYTES]
    assert q["reason"] == (f"over-long record: {len(line)} bytes, sha256 {hashlib.sha256(line).hexdigest()}; "
                           f"only the first {formats.RAW_PREFIX_BYTES} kept")
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB: the line was held whole"


def test_decompressed_bytes_per_file_are_bounded(tmp_path, tok):
    recs = [{"text": f"Record {i} is here."} for i in range(100)]
    data = lines_of(recs)
    path = tmp_path / "many.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    limit = len(lines_of(recs[:10])) + 5  # ten whole lines and a bit of the eleventh
    docs, quarantine = read(path, tok, max_decompressed_bytes=limit)
    assert [d.text for d in docs] == [r["text"] for r in recs[:10]]
    (q,) = quarantine
    assert q["source_id"] == "many.jsonl.gz:11" and q["raw"] == data[len(lines_of(recs[:10])):limit]
    assert f"max_decompressed_bytes={limit}" in q["reason"]


def test_truncated_gz_keeps_what_was_read(tmp_path, tok):
    recs = [{"text": f"Record {i} says {i * 7919 % 1000}."} for i in range(2000)]
    blob = gzip.compress(lines_of(recs))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    docs, quarantine = read(path, tok)
    n = len(docs)
    assert 100 < n < 2000 and [d.text for d in docs] == [r["text"] for r in recs[:n]]
    (q,) = quarantine  # the cut record, with the reason; nothing after it could be decoded
    assert q["source_id"] == f"cut.jsonl.gz:{n + 1}"
    assert json.dumps(recs[n]).encode().startswith(q["raw"])
    assert q["reason"].startswith("truncated or corrupt compressed file after") and "EOFError" in q["reason"]


def test_utf8_bom_does_not_quarantine_the_first_record(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines_of([{"text": "One."}, {"text": "Two."}]))
    assert [d.text for d in read(path, tok)[0]] == ["One.", "Two."]
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\nSecond.\n")
    docs, quarantine = read(text, tok)
    assert [d.text for d in docs] == ["First paragraph.", "Second."] and quarantine == []


def test_text_paragraph_with_over_long_line(tmp_path, tok):
    path = tmp_path / "t.txt"
    long = b"z" * 5000
    path.write_bytes(b"Short.\n\nStarts here.\n" + long + b"\nends here.\n\nAfter.\n")
    docs, quarantine = read(path, tok, max_record_bytes=1000)
    assert [d.text for d in docs] == ["Short.", "After."]
    (q,) = quarantine
    assert q["source_id"] == "t.txt:3" and q["raw"].startswith(b"Starts here.\n" + b"z" * 100)
    assert q["reason"].startswith(f"over-long record: line 4 alone is {len(long)} bytes, sha256 "
                                  f"{hashlib.sha256(long).hexdigest()}")


def test_hidden_files_are_skipped_with_a_message(tmp_path, caplog):
    for name in ("a.jsonl", "_b.jsonl", ".c.jsonl"):
        (tmp_path / name).write_bytes(lines_of([{"text": f"In {name}."}]))
    with caplog.at_level(logging.WARNING, logger="toolformer_ray.datajob.corpus"):
        shards = list_shards(str(tmp_path))
    assert [s.name for s in shards] == ["a.jsonl"]
    assert "skipping 2 file(s)" in caplog.text and "_b.jsonl" in caplog.text and ".c.jsonl" in caplog.text


def test_same_text_in_two_files_is_one_doc_id_in_each_shard(tmp_path, tok):
    # Documented choice: de-duplication is per shard; across shards both are kept with the same doc_id.
    (tmp_path / "a.jsonl").write_bytes(lines_of([{"id": "a1", "text": "Shared text."}, {"text": "Only A."}]))
    (tmp_path / "b.jsonl").write_bytes(lines_of([{"id": "b1", "text": "Shared  text."}]))
    docs = [d for s in list_shards(str(tmp_path)) for d in read_shard(s, CorpusConfig(), tok)[0]]
    shared = [d for d in docs if d.doc_id == doc_id_for("Shared text.")]
    assert [(d.source_id, d.shard) for d in shared] == [("a1", docs[0].shard), ("b1", docs[-1].shard)]
    assert shared[0].shard != shared[1].shard


# ------------------------------------------------------------------------------------ splitting (item 5)

class CountingTokenizer:
    """Wraps a tokenizer and counts the characters it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tok(text, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["\u6f22\u5b57", "word "], ids=["cjk", "ascii"])
def test_split_is_linear_in_the_text(tok, unit):
    # 1M characters in one sentence-less record: the tokenizer must see each character a bounded number
    # of times (the old cutter re-encoded each piece once per token it dropped: ~200 times per CJK
    # character). No timing here; benchmarks/split_bench.py prints the figure.
    text = (unit * (1_000_000 // len(unit) + 1))[:1_000_000].strip()
    counting = CountingTokenizer(tok)
    pieces = split_text(text, counting, 256)
    assert counting.chars <= 4 * len(text), f"{counting.chars / len(text):.1f} encodes per character"
    assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())
    for p in pieces[:: max(1, len(pieces) // 50)]:
        assert len(tok(p, add_special_tokens=False)["input_ids"]) <= 256


@pytest.mark.timeout(60)  # quadratic, this 1M-character whitespace run takes hours; linear, milliseconds
def test_sentence_gaps_are_linear_in_whitespace_runs():
    text = "Start " + " " * 1_000_000 + " end.\nNext line."
    assert split._sentence_spans(text) == [(0, 1_000_011), (1_000_012, 1_000_022)]


# ------------------------------------------------------------------------------------ tools (item 12)

def test_calculator_rejects_hex_literals():
    calc = Calculator()
    assert calc.run(["0x10", "2 + 0X1f", "3x4", "0 x 10"]) == [None, None, "12", "0"]
    assert "hexadecimal" in calc.diagnose("0x10")


# ------------------------------------------------------------------------------------ config (items 11, 12)

@pytest.mark.parametrize("override, words", [
    ("tools.Calculater.k=3", ["unknown tool 'Calculater'", "known tools: Calculator, Calendar"]),
    ("tools.Calculator.options.bogus=1", ["tools.Calculator.options", "unknown key 'bogus'"]),
    ("tools.Calculator.tau_f=.nan", ["tau_f", "finite"]),
    ("tools.Calculator.timeout_s=.inf", ["timeout_s", "finite"]),
])
def test_config_mistakes_are_rejected(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert all(w in str(e.value) for w in words), str(e.value)


# ------------------------------------------------------------------------------------ command line (item 10)

def run_main(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["toolformer-ray", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["generate", "--bogus"], "No such option: --bogus"),
    (["generate", "--limit", "abc"], "Invalid value for '--limit'"),
    (["index"], "Missing argument 'passages'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["tool", "Calculater", "1+1"], "unknown tool 'Calculater'"),
    (["tool", "Calculator", "1+1", "-s", "tools.Calculator.options.bogus=1"], "unknown key 'bogus'"),
    (["config", "-s", "tools.Calculator.timeout_s=.inf"], "finite"),
], ids=["option", "value", "argument", "command", "tool", "tool-option", "inf"])
def test_usage_errors_are_one_line_exit_2(monkeypatch, capsys, argv, words):
    code, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2 and words in err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_s3_without_credentials_is_one_line_exit_2(tmp_path):
    # A fresh process: s3fs caches clients, and this one must find no credentials anywhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "toolformer_ray.cli", "index", "s3://no-bucket/p.jsonl",
                           str(tmp_path / "idx")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no S3 credentials"), proc.stderr
    assert proc.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------ storage names (item 7)

def test_remote_index_names_cannot_escape_the_cache(s3_endpoint, tmp_path):
    from toolformer_ray.tools.search_index import SearchIndexError, build_index, fetch_index

    passages = tmp_path / "p.jsonl"
    passages.write_text(lines_of([{"id": "1", "title": "T", "text": "Some passage text."}]).decode())
    uri = s3_endpoint.uri("idx")
    build_index(str(passages), uri)
    fs = s3_endpoint.fs()
    meta_key = f"{s3_endpoint.bucket}/idx/meta.json"
    meta = json.loads(fs.cat_file(meta_key))
    cache = tmp_path / "cache" / "indexes"
    for bad in ("x/../../escaped", "../escaped", "/tmp/escaped", 7):
        fs.pipe_file(meta_key, json.dumps({**meta, "build_id": bad}).encode())
        with pytest.raises(SearchIndexError, match="invalid build_id"):
            fetch_index(uri, str(cache))
    assert sorted(p.name for p in tmp_path.rglob("*escaped*")) == []
    fs.pipe_file(meta_key, json.dumps(meta).encode())
    fs.pipe_file(f"{s3_endpoint.bucket}/idx/a/..", b"x")  # a key that is a traversal as a local path
    with pytest.raises(SearchIndexError, match="unsafe file name 'a/..'"):
        fetch_index(uri, str(cache))
    fs.rm_file(f"{s3_endpoint.bucket}/idx/a/..")
    assert (fetch_index(uri, str(cache)) / "meta.json").is_file()


# ------------------------------------------------------------------------------------ --no-ray faults (items 3, 4)

@pytest.mark.slow
def test_no_ray_isolates_failed_shards_and_exits_1(monkeypatch, capsys, tmp_path):
    from toolformer_ray.datajob import stages

    inp = tmp_path / "corpus"
    inp.mkdir()
    for name in ("a", "b", "c"):
        (inp / f"{name}.jsonl").write_bytes(lines_of(
            [{"id": f"{name}{i}", "text": f"Shard {name} line {i}: 3 + {i} = {3 + i}."} for i in range(3)]))
    real_read, real_sample = stages.read_docs, stages.LMStage.sample

    def read(shard, *args):
        if shard.name == "a.jsonl":
            raise OSError("disk went away")
        return real_read(shard, *args)

    def sample(self, docs):
        if any(d.source_id.startswith("b") for d in docs):
            raise RuntimeError("model fell over")
        return real_sample(self, docs)

    monkeypatch.setattr(stages, "read_docs", read)
    monkeypatch.setattr(stages.LMStage, "sample", sample)
    argv = ["generate", "--no-ray", "-i", str(inp), "-s", "model.path=tiny", "-s", "model.dtype=float32",
            "-s", "tools={Calculator: {k: 2, m: 2}}", "-s", "ray.torch_threads=1", "-s", "sampling.max_call_tokens=4"]
    code, err = run_main(monkeypatch, capsys, *argv, "-o", str(tmp_path / "out"))
    assert code == 1, err
    assert "OSError: disk went away" in err and "RuntimeError: model fell over" in err
    assert "2 shard(s) failed" in err
    version = next(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["counts"]["shards_done"] == 1 and len(manifest["runs"][-1]["shards_failed"]) == 2
    # the faults gone, a rerun does exactly the two failed shards and exits 0
    monkeypatch.setattr(stages, "read_docs", real_read)
    monkeypatch.setattr(stages.LMStage, "sample", real_sample)
    code, err = run_main(monkeypatch, capsys, *argv, "-o", str(tmp_path / "out"))
    assert code == 0, err
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["counts"]["shards_done"] == 3 and manifest["runs"][-1]["shards_failed"] == {}


# ------------------------------------------------------------------------------------ hung tools (item 9)

class Spin(Tool):
    """Test tool (not registered): "spin" loops forever in Python, anything else echoes."""
    name = "Spin"

    def run(self, inputs, dates=None):
        for inp in inputs:
            while inp == "spin":
                pass
        return [f"ok:{inp}" for inp in inputs]


def test_local_hung_tool_thread_is_stopped_not_left_spinning():
    ex = LocalToolExecutor({"Spin": ToolConfig(timeout_s=0.2, batch_size=4)}, tool_classes={"Spin": Spin})
    assert ex.run("Spin", ["a", "spin", "b"]) == ["ok:a", None, "ok:b"]
    assert ex.stats()["Spin"]["timeouts"] == 1
    deadline = time.monotonic() + 5
    while any(t.name == "tool-Spin" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "tool-Spin"], "abandoned tool threads still run"
