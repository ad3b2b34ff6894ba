"""The BM25 index (local and S3), WikiSearch snippets, and QA (retrieve + read) on the tiny model."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from toolformer_ray.cli import app
from toolformer_ray.errors import UserError
from toolformer_ray.tools import build_tool
from toolformer_ray.tools.qa import extract_answer
from toolformer_ray.tools.search_index import build_index, fetch_index, load_index, make_snippet, split_sentences

PASSAGES = [
    {"id": "brown", "title": "Brown Act", "text": "The Ralph M. Brown Act is an act of the California State "
     "Legislature that guarantees the public's right to attend and participate in meetings of local legislative "
     "bodies. It was authored by Assembly member Ralph M. Brown and passed in 1953."},
    {"id": "nejm", "title": "The New England Journal of Medicine", "text": "The New England Journal of Medicine "
     "is a weekly medical journal published by the Massachusetts Medical Society. It is among the most "
     "prestigious peer-reviewed medical journals."},
    {"id": "coke", "title": "Coca-Cola", "text": "Coca-Cola, or Coke, is a carbonated soft drink manufactured by "
     "the Coca-Cola Company. Originally marketed as a temperance drink, it was invented by John Stith "
     "Pemberton in 1886."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a major north-flowing river in northeastern Africa. It "
     "flows into the Mediterranean Sea. The Nile is among the longest rivers in the world."},
    {"id": "turtle", "title": "Turtle", "text": "Turtles are reptiles of the order Testudines, characterized by "
     "a special shell developed mainly from their ribs."},
    {"id": "empty", "title": "Nothing", "text": "   "},
]


@pytest.fixture(scope="module")
def passages_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("passages") / "passages.jsonl"
    lines = [json.dumps(p) for p in PASSAGES] + ["not json", "", json.dumps({"title": "no text"})]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def index_dir(passages_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    stats = build_index(str(passages_file), str(out))
    assert stats["passages"] == 5 and stats["skipped"] == 3
    return out


def test_index_layout_and_search(index_dir):
    assert {p.name for p in index_dir.iterdir()} == {"bm25", "passages.arrow", "meta.json"}
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["passages"] == 5 and len(meta["build_id"]) == 16
    index = load_index(str(index_dir))
    hits = index.search(["Brown Act", "publisher of the New England Journal of Medicine", "the of", "zzzz"], k=2)
    assert hits[0][0].passage_id == "brown"
    assert hits[1][0].passage_id == "nejm"
    assert hits[2] == [] and hits[3] == []  # only stop words / unknown words: nothing
    assert all(h.score > 0 for row in hits for h in row)
    assert load_index(str(index_dir)) is index  # loaded once per process


def test_rebuild_is_deterministic_and_replaces(passages_file, tmp_path):
    a = build_index(str(passages_file), str(tmp_path / "a"))
    b = build_index(str(passages_file), str(tmp_path / "a"))  # rebuild in place
    assert a["build_id"] == b["build_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directories left


def test_build_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_index(str(tmp_path / "missing.jsonl"), str(tmp_path / "out"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no passages"):
        build_index(str(empty), str(tmp_path / "out"))
    with pytest.raises(UserError, match="no search index"):
        fetch_index(str(tmp_path / "nowhere"))


def test_wikisearch_paper_example(index_dir):
    ws = build_tool("WikiSearch", {"index": str(index_dir), "snippet_chars": 200})
    out = ws.run(["Brown Act"])[0]
    # The paper's example result: the passage's first sentence.
    assert out == ("The Ralph M. Brown Act is an act of the California State Legislature that guarantees the "
                   "public's right to attend and participate in meetings of local legislative bodies.")


def test_wikisearch_snippets_are_short_and_relevant(index_dir):
    ws = build_tool("WikiSearch", {"index": str(index_dir), "snippet_chars": 80, "top_k": 2})
    out = ws.run(['"John Stith Pemberton temperance drink, river"'])[0]
    first = out.split(" | ")[0]
    assert first.startswith("Originally marketed") and len(first) <= 80  # the matching sentence, cut
    assert len(out.split(" | ")) == 2
    assert "]" not in out and "\n" not in out


@pytest.mark.parametrize("query, reason", [("", "empty"), ("   ", "empty"), ("the of and", "no passage"),
                                           ("x" * 400, "longer than")])
def test_wikisearch_bad_input(index_dir, query, reason):
    ws = build_tool("WikiSearch", {"index": str(index_dir)})
    assert ws.run([query]) == [None]
    assert reason in ws.diagnose(query)
    assert ws.run([None, "Nile river"])[0] is None


def test_wikisearch_missing_index_is_a_clear_error(tmp_path):
    ws = build_tool("WikiSearch", {"index": str(tmp_path / "none")})
    with pytest.raises(UserError, match="toolformer-ray index"):
        ws.load()


def test_split_sentences():
    assert split_sentences("The Ralph M. Brown Act passed. Dr. Who came in 1953. It rained! Then U.S. troops left.") == [
        "The Ralph M. Brown Act passed.", "Dr. Who came in 1953.", "It rained!", "Then U.S. troops left."]


def test_make_snippet_cuts_at_words():
    text = "A" * 10 + " " + "word " * 100
    s = make_snippet(text, set(), 50)
    assert len(s) <= 50 and s.endswith("...")
    assert make_snippet("", set(), 50) == ""


def test_index_on_s3(passages_file, s3_endpoint, tmp_path):
    uri = s3_endpoint.uri("indexes", "wiki")
    stats = build_index(str(passages_file), uri)
    fs = s3_endpoint.fs()
    assert fs.exists(f"{s3_endpoint.bucket}/indexes/wiki/meta.json")
    assert fs.exists(f"{s3_endpoint.bucket}/indexes/wiki/passages.arrow")
    cache = str(tmp_path / "cache")
    local = fetch_index(uri, cache)
    assert local.name == f"index-{stats['build_id']}" and (local / "bm25").is_dir()
    assert fetch_index(uri, cache) == local  # cached by build id: not downloaded again
    ws = build_tool("WikiSearch", {"index": uri, "cache_dir": cache})
    assert ws.run(["Brown Act"])[0].startswith("The Ralph M. Brown Act")


def test_cli_index(passages_file, tmp_path):
    res = CliRunner().invoke(app, ["index", str(passages_file), str(tmp_path / "cli-idx")])
    assert res.exit_code == 0, res.output
    assert "indexed 5 passages" in res.output and "3 records without text skipped" in res.output


# -- QA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("generated, answer", [
    (" Massachusetts Medical Society\n\nQuestion: ...", "Massachusetts Medical Society"),
    (" 1886. It was invented", "1886"),
    (" The answer is: Paris, France", "Paris"),
    (" Answer: the Mediterranean Sea; it flows north", "the Mediterranean Sea"),
    ("\n", None),
    (" one two three four five six seven eight nine ten", "one two three four five six seven eight"),
])
def test_extract_answer(generated, answer):
    assert extract_answer(generated, 8) == answer


@pytest.fixture(scope="module")
def qa_tool(index_dir):
    qa = build_tool("QA", {"index": str(index_dir), "model": "tiny", "max_new_tokens": 6})
    qa.load()
    return qa


def test_qa_retrieves_then_reads(qa_tool):
    prompt = qa_tool.reader_prompts(["Who publishes The New England Journal of Medicine?"])[0]
    assert "Massachusetts Medical Society" in prompt  # the retrieved passage is the reader's context
    assert prompt.rstrip().endswith("Question: Who publishes The New England Journal of Medicine?\nAnswer:")
    out = qa_tool.run(["Who publishes The New England Journal of Medicine?", "Where does the Nile flow into?"])
    for answer in out:  # a random tiny reader: only the shape of the answer is known
        assert answer is None or (0 < len(answer.split()) <= 8 and "\n" not in answer)
    # Deterministic (greedy) and batch-independent.
    assert qa_tool.run(["Where does the Nile flow into?"])[0] == out[1]


@pytest.mark.parametrize("question, reason", [("", "empty"), ("the of", "no passage"), ("?" * 400, "longer than")])
def test_qa_bad_input(qa_tool, question, reason):
    assert qa_tool.run([question]) == [None]
    assert reason in qa_tool.diagnose(question)
