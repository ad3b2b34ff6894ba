"""Corpus input: listing shards by content, reading jsonl / Parquet / text, quarantine, splitting, limits."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolformer_ray.config import CorpusConfig
from toolformer_ray.datajob.corpus import (CorpusError, ShardPlan, doc_id_for, formats, listing,
                                           list_shards, plan_shards, read_shard, split_text)
from toolformer_ray.dates import date_from_url
from toolformer_ray.dates import iso_date as parse_date
from toolformer_ray.models import load_tokenizer, resolve_model_dir


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_dir("tiny"))


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"id": f"r{i}", "text": f"Record number {i} says {i} + {i} = {2 * i}.", "date": "2021-03-04"}
           for i in range(5)]


# ------------------------------------------------------------------------------------------------ listing

def test_list_directory_by_format_and_content(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(RECORDS[2]) + "\n")
    pq.write_table(pa.Table.from_pylist(RECORDS[3:]), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("One paragraph.\n\nAnother one.\n")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "e_copy.jsonl")  # same bytes: one shard

    shards = list_shards(str(tmp_path))
    assert [(s.name, s.fmt) for s in shards] == [
        ("a.jsonl", "jsonl"), ("c.parquet", "parquet"), ("d.txt", "text"), ("sub/b.jsonl.gz", "jsonl")]
    assert len({s.shard_id for s in shards}) == 4

    # The id follows the bytes, not the name or the time: a renamed file keeps it, an edit changes it.
    a_id = shards[0].shard_id
    (tmp_path / "a.jsonl").rename(tmp_path / "z_renamed.jsonl")
    renamed = {s.name: s.shard_id for s in list_shards(str(tmp_path))}
    assert a_id in renamed.values()
    write_jsonl(tmp_path / "z_renamed.jsonl", RECORDS[:1])
    edited = {s.name: s.shard_id for s in list_shards(str(tmp_path))}
    assert edited["z_renamed.jsonl"] != a_id and edited["e_copy.jsonl"] == a_id


def test_list_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        list_shards(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("x\n")
    with pytest.raises(CorpusError, match="format"):
        list_shards(str(tmp_path / "data.csv"))
    with pytest.raises(CorpusError, match="no corpus files"):
        list_shards(str(tmp_path))
    assert list_shards(str(tmp_path / "data.csv"), fmt="text")[0].fmt == "text"


def test_hash_cache_skips_rereading(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    cache: dict[str, str] = {}
    first = list_shards(str(tmp_path), hash_cache=cache)
    assert len(cache) == 1

    def fail(*args):
        raise AssertionError("file read again despite the cache")
    monkeypatch.setattr(listing, "sha256_file", fail)
    assert list_shards(str(tmp_path), hash_cache=cache) == first


def test_changed_file_after_listing_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    shard = list_shards(str(path))[0]
    write_jsonl(path, RECORDS[:2])
    with pytest.raises(CorpusError, match="changed since it was listed"):
        read_shard(shard, CorpusConfig(), tok)


# ------------------------------------------------------------------------------------------------ records

def test_jsonl_documents_fields(tmp_path, tok):
    recs = [
        {"id": "a", "text": "Alpha text.", "date": "2021-03-04T10:00:00Z", "source": "x"},
        {"id": 7, "text": "Beta text.", "url": "https://news.example/2023/01/30/story.html"},
        {"text": "Gamma text.", "date": "not a date"},
    ]
    shard = list_shards(str(write_jsonl(tmp_path / "a.jsonl", recs)))[0]
    docs, quarantine = read_shard(shard, CorpusConfig(), tok)
    assert quarantine == []
    assert [(d.source_id, d.date, d.text) for d in docs] == [
        ("a", "2021-03-04", "Alpha text."), ("7", "2023-01-30", "Beta text."), ("a.jsonl:3", None, "Gamma text.")]
    assert docs[0].meta == {"date": "2021-03-04T10:00:00Z", "source": "x"}
    assert all(d.shard == shard.shard_id and d.doc_id == doc_id_for(d.text) for d in docs)


def test_malformed_jsonl_records_are_quarantined(tmp_path, tok):
    lines = [
        json.dumps({"id": "good1", "text": "A fine record."}).encode(),   # 1
        b"{not json",                                                     # 2 bad JSON
        json.dumps({"id": "notext", "body": "x"}).encode(),               # 3 no text
        b"",                                                              # 4 blank: skipped
        json.dumps({"id": "empty", "text": "   "}).encode(),              # 5 empty text
        b'{"id": "utf", "text": "caf\xc3\xa9 \xff\xfe"}',                 # 6 invalid UTF-8
        json.dumps({"id": "long", "text": "x" * 500}).encode(),           # 7 over-long
        b"[1, 2, 3]",                                                     # 8 not an object
        b'"just a string"',                                               # 9 not an object
        json.dumps({"id": "num", "text": 42}).encode(),                   # 10 wrong type
        json.dumps({"id": {"a": 1}, "text": "bad id"}).encode(),          # 11 wrong id type
        b'{"id": "sur", "text": "lone \\ud800 surrogate"}',               # 12 lone surrogate
        b"   \r",                                                         # 13 blank: skipped
        json.dumps({"id": "nulltext", "text": None}).encode(),            # 14 null text
        json.dumps({"id": "good2", "text": "Another fine record."}).encode(),  # 15
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    shard = list_shards(str(path))[0]
    docs, quarantine = read_shard(shard, CorpusConfig(max_record_chars=100), tok)

    assert [d.source_id for d in docs] == ["good1", "good2"]
    reasons = {q["source_id"]: q["reason"] for q in quarantine}
    assert reasons == {
        "bad.jsonl:2": reasons["bad.jsonl:2"],
        "notext": "no 'text' field",
        "empty": "empty text",
        "bad.jsonl:6": "invalid UTF-8 at byte 29",
        "long": reasons["long"],
        "bad.jsonl:8": "record is a JSON list, expected an object",
        "bad.jsonl:9": "record is a JSON str, expected an object",
        "num": "field 'text' is int, expected a string",
        "bad.jsonl:11": "field 'id' is dict, expected a string or integer",
        "sur": "text is not valid Unicode (lone surrogate escape)",
        "nulltext": "field 'text' is null",
    }
    assert reasons["bad.jsonl:2"].startswith("bad JSON")
    assert reasons["long"].startswith("over-long record: text has 500 characters")
    # Nothing is lost: each quarantine row holds the record's exact bytes.
    raw_by_line = {i + 1: line for i, line in enumerate(lines)}
    assert {q["raw"] for q in quarantine} == {raw_by_line[i] for i in (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14)}
    assert all(q["shard"] == shard.shard_id for q in quarantine)


def test_over_long_raw_line_is_not_parsed(tmp_path, tok):
    path = tmp_path / "big.jsonl"
    big = json.dumps({"id": "big", "text": "y" * 70000, "pad": "z" * 20})
    path.write_text(big + "\n")
    docs, quarantine = read_shard(list_shards(str(path))[0], CorpusConfig(max_record_chars=10), tok)
    assert docs == [] and quarantine[0]["reason"].startswith("over-long record:")
    # Beyond the raw bound only a prefix is kept, with the record's length and sha256 in the reason.
    assert quarantine[0]["raw"] == big.encode()[:formats.RAW_PREFIX_BYTES]
    assert f"{len(big)} bytes, sha256 {hashlib.sha256(big.encode()).hexdigest()}" in quarantine[0]["reason"]


def test_duplicate_text_is_quarantined_not_repeated(tmp_path, tok):
    recs = [{"id": "a", "text": "Same  words\nhere."}, {"id": "b", "text": "Same words here."},
            {"id": "c", "text": "Other words."}]
    docs, quarantine = read_shard(list_shards(str(write_jsonl(tmp_path / "d.jsonl", recs)))[0], CorpusConfig(), tok)
    assert [d.source_id for d in docs] == ["a", "c"]
    assert quarantine[0]["source_id"] == "b" and "duplicate text" in quarantine[0]["reason"]
    assert quarantine[0]["raw"] == b"Same words here."


def test_parquet_rows_and_bad_utf8(tmp_path, tok):
    # A string column holding invalid UTF-8 (writers do not always check): built without validation.
    good = [b"First row text.", b"\xff\xfe broken", b"Third row text."]
    offsets = pa.array([0, 15, 24, 39], type=pa.int32()).buffers()[1]
    data = pa.py_buffer(b"".join(good))
    text = pa.Array.from_buffers(pa.string(), 3, [None, offsets, data])
    table = pa.table({"text": text, "n": pa.array([1, 2, 3]),
                      "day": pa.array([None, None, None], type=pa.date32())})
    pq.write_table(table, tmp_path / "t.parquet")
    docs, quarantine = read_shard(list_shards(str(tmp_path / "t.parquet"))[0], CorpusConfig(), tok)
    assert [(d.source_id, d.text) for d in docs] == [("t.parquet:0", "First row text."),
                                                     ("t.parquet:2", "Third row text.")]
    assert docs[0].meta == {"n": 1, "day": None}
    assert quarantine[0]["source_id"] == "t.parquet:1"
    assert quarantine[0]["reason"] == "invalid UTF-8 in field 'text' at byte 0"


def test_parquet_binary_text_and_dates(tmp_path, tok):
    import datetime as dt
    table = pa.table({"id": ["p", "q"], "text": pa.array([b"Bytes text.", b"\xc3"], type=pa.binary()),
                      "date": pa.array([dt.date(2022, 5, 6), dt.date(2022, 5, 7)])})
    pq.write_table(table, tmp_path / "b.parquet")
    docs, quarantine = read_shard(list_shards(str(tmp_path / "b.parquet"))[0], CorpusConfig(), tok)
    assert [(d.source_id, d.text, d.date, d.meta) for d in docs] == [("p", "Bytes text.", "2022-05-06",
                                                                    {"date": "2022-05-06"})]
    assert quarantine[0]["source_id"] == "q" and "invalid UTF-8" in quarantine[0]["reason"]


def test_parquet_row_group_shards(tmp_path, tok):
    rows = [{"text": f"Row {i} of the file."} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rg.parquet", row_group_size=4)
    whole = list_shards(str(tmp_path / "rg.parquet"))
    split = list_shards(str(tmp_path / "rg.parquet"), parquet_split_bytes=1)
    assert len(whole) == 1 and [s.row_group for s in split] == [0, 1, 2]
    assert [s.shard_id for s in split] == [f"{whole[0].shard_id}-rg{i}" for i in range(3)]
    docs = [d for s in split for d in read_shard(s, CorpusConfig(), tok)[0]]
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert [d.source_id for d in docs] == [f"rg.parquet:{i}" for i in range(9)]


def test_text_paragraphs(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_bytes(b"First paragraph,\nsecond line.\r\n\r\n\n  \nSecond \xff paragraph.\n\nThird one.")
    docs, quarantine = read_shard(list_shards(str(path))[0], CorpusConfig(), tok)
    assert [(d.source_id, d.text) for d in docs] == [("t.txt:1", "First paragraph,\nsecond line."),
                                                     ("t.txt:8", "Third one.")]
    assert [(q["source_id"], q["reason"], q["raw"]) for q in quarantine] == [
        ("t.txt:6", "invalid UTF-8 at byte 7", b"Second \xff paragraph.")]


def test_unreadable_files_are_one_quarantine_row(tmp_path, tok):
    good = gzip.compress(b'{"text": "Fine."}\n' * 50)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[:8])  # cut inside the gzip header: nothing decodes
    (tmp_path / "fake.parquet").write_bytes(b"this is not parquet")
    shards = list_shards(str(tmp_path), parquet_split_bytes=1)
    rows = []
    for shard in shards:
        docs, quarantine = read_shard(shard, CorpusConfig(), tok)
        assert docs == []
        rows += quarantine
    assert [(q["source_id"], q["raw"]) for q in rows] == [("cut.jsonl.gz", good[:8]),
                                                          ("fake.parquet", b"this is not parquet")]
    assert rows[0]["reason"].startswith("unreadable compressed file: truncated or corrupt compressed file")
    assert rows[1]["reason"].startswith("unreadable Parquet file:")


# ---------------------------------------------------------------------------------------------- splitting

def test_split_at_sentences(tok):
    sentences = [f"Sentence number {i} talks about the weather in town {i}." for i in range(40)]
    text = " ".join(sentences)
    pieces = split_text(text, tok, 40)
    assert len(pieces) > 1
    assert all(n_tokens(tok, p) <= 40 for p in pieces)
    assert " ".join(pieces) == text
    # Each cut falls between sentences.
    assert all(p.endswith(".") for p in pieces)


def test_split_long_sentence_at_tokens(tok):
    text = "word " * 300 + "end"
    pieces = split_text(text, tok, 16)
    assert all(0 < n_tokens(tok, p) <= 16 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    cjk = "日本語のテキストは空白がありません" * 20
    pieces = split_text(cjk, tok, 12)
    assert all(n_tokens(tok, p) <= 12 for p in pieces) and "".join(pieces) == cjk


def test_short_text_is_one_piece(tok):
    assert split_text("  Short text.\n", tok, 64) == ["Short text."]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.text(alphabet=st.sampled_from(list("abcé日 .!?\n0123456789")), min_size=1, max_size=12),
                      min_size=1, max_size=60),
       max_tokens=st.integers(9, 40))
def test_split_property(tok, words, max_tokens):
    text = " ".join(words)
    pieces = split_text(text, tok, max_tokens)
    assert all(n_tokens(tok, p) <= max_tokens for p in pieces)
    assert all(p == p.strip() and p for p in pieces)
    # Only whitespace is lost at the cuts.
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_records_split_into_documents(tmp_path, tok):
    text = " ".join(f"This is sentence {i} of a long record." for i in range(30))
    shard = list_shards(str(write_jsonl(tmp_path / "l.jsonl", [{"id": "L", "text": text}])))[0]
    docs, _ = read_shard(shard, CorpusConfig(max_doc_tokens=32), tok)
    assert len(docs) > 1 and {d.source_id for d in docs} == {"L"}
    assert " ".join(d.text for d in docs) == text
    assert all(n_tokens(tok, d.text) <= 32 for d in docs)


# ---------------------------------------------------------------------------------------- ids and dates

def test_doc_id_normalisation():
    assert doc_id_for("Caf\u00e9  au\nlait ") == doc_id_for("Cafe\u0301 au lait")  # NFC + whitespace
    assert doc_id_for("a b") != doc_id_for("a c")
    assert len(doc_id_for("x")) == 32


def test_dates():
    assert parse_date("2023-01-30") == "2023-01-30"
    assert parse_date("2023-1-3T00:00") == "2023-01-03"
    assert parse_date("2023-02-30") is None and parse_date("yesterday") is None and parse_date(20230130) is None
    assert date_from_url("https://x.org/2023/01/30/title") == "2023-01-30"
    assert date_from_url("https://x.org/9999/99/99/a/2020-12-31.html") == "2020-12-31"
    assert date_from_url("https://x.org/id/12345678") is None and date_from_url(None) is None


# ------------------------------------------------------------------------------------------------- limits

def test_plan_with_limit(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
    shards = list_shards(str(tmp_path))
    cfg = CorpusConfig()
    assert plan_shards(shards, cfg, tok) == [ShardPlan(s) for s in shards]
    assert plan_shards(shards, cfg, tok, limit=3) == [ShardPlan(shards[0])]  # ends exactly at a shard end
    plans = plan_shards(shards, cfg, tok, limit=4)
    assert plans == [ShardPlan(shards[0]), ShardPlan(shards[1], 1)]
    assert plans[1].unit_id == f"{shards[1].shard_id}-first1" and not plans[1].complete
    assert plans[1].to_dict()["max_docs"] == 1 and plans[1].to_dict()["uri"] == shards[1].uri
    docs, _ = read_shard(shards[1], cfg, tok, max_docs=plans[1].max_docs)
    assert [d.source_id for d in docs] == ["r3"]
    assert plan_shards(shards, cfg, tok, limit=100) == [ShardPlan(s) for s in shards]


# --------------------------------------------------------------------------------------------------- S3

def test_s3_listing_and_reading(s3_endpoint, tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    pq.write_table(pa.Table.from_pylist(RECORDS[3:]), tmp_path / "b.parquet")
    fs = s3_endpoint.fs()
    for name in ("a.jsonl", "b.parquet"):
        fs.put_file(str(tmp_path / name), f"{s3_endpoint.bucket}/corpus/{name}")
    fs.pipe_file(f"{s3_endpoint.bucket}/corpus/c.jsonl.gz", gzip.compress(b'{"text": "Zipped."}\n{bad\n'))

    shards = list_shards(s3_endpoint.uri("corpus"), storage_options=s3_endpoint.storage_options)
    assert [s.uri for s in shards] == [s3_endpoint.uri("corpus", n) for n in ("a.jsonl", "b.parquet", "c.jsonl.gz")]
    local = {s.name: s.shard_id for s in list_shards(str(tmp_path))}
    assert {s.name: s.shard_id for s in shards[:2]} == local  # same bytes, same ids, wherever they live

    read = [read_shard(s, CorpusConfig(), tok, storage_options=s3_endpoint.storage_options) for s in shards]
    assert [d.source_id for docs, _ in read for d in docs] == ["r0", "r1", "r2", "r3", "r4", "c.jsonl.gz:1"]
    assert [q["source_id"] for _, qs in read for q in qs] == ["c.jsonl.gz:2"]
    # The environment (AWS_ENDPOINT_URL) alone is enough too.
    assert list_shards(s3_endpoint.uri("corpus", "a.jsonl")) == [shards[0]]
