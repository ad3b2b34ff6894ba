"""Run report: funnel with recomputed kept counts, histograms, examples, timings; local and S3."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from toolformer_ray.report import kept_at, pick_examples, report_from_store, utilities, write_report
from toolformer_ray.datajob.records import CANDIDATES_SCHEMA, DOCUMENTS_SCHEMA, SCHEMA_VERSION
from toolformer_ray.storage import OutputStore, build_manifest

TAU_F = {"Calculator": 0.5, "Calendar": 1.0}
DOC_TEXT = "The shop sold 400 of its 1400 items, i.e. 29% of them | on Monday."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def candidate(tool, utility, *, doc_id="d1", char_pos=48, min_is_no_result=False, loss_plus=1.0,
              kept=None,
              p_api=0.3, call="400/1400", result="0.29"):
    # L- = min(no call, call without result) = loss_plus + utility; the other one is larger.
    low = None if utility is None else loss_plus + utility
    high = None if low is None else low + 0.7
    no_call, no_result = (high, low) if min_is_no_result else (low, high)
    inserted = f" [{tool}({call}) -> {result}]"
    return {"doc_id": doc_id, "source_id": "s", "shard": "sh", "tool": tool, "call": call,
            "result": result,
            "char_pos": char_pos, "token_pos": 9, "p_api": p_api,
            "prefix_plus": inserted.strip() + "\n",
            "prefix_no_result": f"[{tool}({call}) ->]\n", "inserted_text": inserted,
            "loss_plus": loss_plus,
            "loss_no_call": no_call, "loss_call_no_result": no_result, "tau_f": TAU_F[tool],
            "model": "tiny",
            "model_revision": "r", "dtype": "float32", "config_hash": "h",
            "schema_version": SCHEMA_VERSION,
            "kept": kept if kept is not None else (utility is not None and utility >= TAU_F[tool])}


def candidates_table() -> pa.Table:
    rows = [candidate("Calculator", u, min_is_no_result=i % 2 == 1, p_api=0.1 * (i + 1))
            for i, u in enumerate([3.0, 1.5, 0.7, 0.2, -1.0])]
    rows.append(candidate("Calculator", None))  # a call that was never scored
    rows += [candidate("Calendar", u, doc_id="d2", char_pos=0, call="", result="Today is Monday.")
             for u in [2.5, 0.4]]
    return pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)


FUNNEL = {"Calculator": {"docs_seen": 10, "docs_prefiltered": 4, "calls_sampled": 6,
                         "kept_tau_f": 3},
          "Calendar": {"docs_seen": 10, "docs_prefiltered": 10, "calls_sampled": 2,
                       "kept_tau_f": 1}}


def documents_table() -> pa.Table:
    return pa.Table.from_pylist([
        {"doc_id": "d1", "source_id": "s", "shard": "sh", "text": DOC_TEXT,
         "augmented_text": DOC_TEXT,
         "n_calls": 1, "date": None, "meta": "{}"},
        {"doc_id": "d2", "source_id": "s", "shard": "sh", "text": "Monday came.",
         "augmented_text": "",
         "n_calls": 1, "date": "2023-01-30", "meta": "{}"}], schema=DOCUMENTS_SCHEMA)


def table_row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_utilities_and_kept_counts():
    cands = candidates_table()
    u = utilities(cands)
    assert np.allclose(u[:5], [3.0, 1.5, 0.7, 0.2, -1.0]) and math.isnan(u[5])
    assert kept_at(cands, [0.5, 1.0, 2.0]) == {"Calculator": {0.5: 3, 1.0: 2, 2.0: 1},
                                                "Calendar": {0.5: 1, 1.0: 1, 2.0: 1}}


def test_examples_span_the_kept_range():
    examples = pick_examples(candidates_table(), TAU_F, per_tool=2)
    assert [round(e["utility"], 6) for e in examples["Calculator"]] == [3.0, 0.7]  # best and nearest tau_f
    assert [round(e["utility"], 6) for e in examples["Calendar"]] == [2.5]
    # Without a `kept` column value, the tool's tau_f decides.
    cands = candidates_table()
    cands = cands.set_column(cands.schema.get_field_index("kept"), "kept",
                             pa.nulls(cands.num_rows, pa.bool_()))
    assert len(pick_examples(cands, TAU_F, per_tool=10)["Calculator"]) == 3


def test_write_report_local(tmp_path):
    path = write_report(str(tmp_path), candidates_table(), FUNNEL,
                        {"read": 1.0, "sample": 3.0, "wall": 5.0},
                        TAU_F, [0.5, 1.0, 2.0], documents=documents_table(),
                        tau_s_by_tool={"Calculator": 0.0, "Calendar": 0.05})
    assert path == str(tmp_path / "report" / "report.md")
    md = (tmp_path / "report" / "report.md").read_text()
    for png in ("p_api.png", "utility.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({png})" in md

    assert table_row(md, "step") == ["Calculator", "Calendar", "total"]
    assert table_row(md, "documents seen") == ["10", "10", "20"]
    assert table_row(md, "passed the pre-filter") == ["4", "10", "14"]
    assert table_row(md, "positions with p_api > tau_s") == ["–", "–", "–"]
    assert table_row(md, "L- - L+ >= 0.5 (recomputed)") == ["3", "1", "4"]
    assert table_row(md, "L- - L+ >= 1 (recomputed)") == ["2", "1", "3"]
    assert table_row(md, "L- - L+ >= 2 (recomputed)") == ["1", "1", "2"]
    assert table_row(md, "kept at the tool's tau_f") == ["3", "1", "4"]
    assert table_row(md, "sample") == ["3", "75.0%"] and table_row(md, "wall") == ["5", ""]

    # Examples show the call inside its context, taken from the document's text.
    assert "The shop sold 400 of its 1400 items, i.e. 29% of [Calculator(400/1400) -> 0.29] them | on" in md
    assert "call `Calculator(400/1400)` → result `0.29`" in md
    assert "call `Calendar()` → result `Today is Monday.`" in md
    assert "8 scored calls, 4 kept" in md


def test_report_of_nothing(tmp_path):
    empty = CANDIDATES_SCHEMA.empty_table()
    write_report(str(tmp_path), empty, {}, {}, {}, [0.5, 1.0])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "_no kept calls_" in md and "_no timings recorded_" in md
    assert (tmp_path / "report" / "utility.png").read_bytes().startswith(PNG_MAGIC)


def test_fence_survives_tildes(tmp_path):
    cands = pa.Table.from_pylist([candidate("Calculator", 2.0, char_pos=2)],
                                 schema=CANDIDATES_SCHEMA)
    docs = pa.Table.from_pylist([{"doc_id": "d1", "source_id": "s", "shard": "sh",
                                  "text": "ab ~~~~ cd",
                                  "augmented_text": "", "n_calls": 0, "date": None, "meta": "{}"}],
                                schema=DOCUMENTS_SCHEMA)
    write_report(str(tmp_path), cands, {}, {}, TAU_F, [1.0], documents=docs)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "  ~~~~~text\n  ab [Calculator(400/1400) -> 0.29] ~~~~ cd\n  ~~~~~" in md


@pytest.mark.parametrize("where", ["local", "s3"])
def test_report_from_store(where, tmp_path, request):
    if where == "local":
        store = OutputStore(str(tmp_path / "out"), "h")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = OutputStore(endpoint.uri("runs"), "h", endpoint.storage_options)
    cands = candidates_table()
    store.write_shard("sh", {"candidates": cands, "documents": documents_table()},
                      {"funnel": FUNNEL, "timings": {"sample": 2.0}})
    store.write_manifest(build_manifest(store, config={}, model={}, inputs={}))
    uri = report_from_store(store, TAU_F, [0.5, 1.0, 2.0], timings={"wall": 3.0})
    assert uri == store.uri("report", "report.md")
    md = store.fs.cat_file(store.path("report", "report.md")).decode()
    assert table_row(md, "documents seen") == ["10", "10", "20"]
    assert table_row(md, "sample") == ["2", "100.0%"]
    assert "[Calculator(400/1400) -> 0.29] them" in md  # context read back from the documents table
    assert store.fs.cat_file(store.path("report", "p_api.png")).startswith(PNG_MAGIC)
