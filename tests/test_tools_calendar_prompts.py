"""Calendar (the paper's example, dates from fields and URLs, bad input), the five few-shot prompts, the
registry, and the `tool` CLI command on the tools that need no index or model."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from toolformer_ray.api_text import Markers, find_calls, parse_call_body, strip_calls
from toolformer_ray.cli import app
from toolformer_ray.core.types import Document
from toolformer_ray.tools import REGISTRY, _discover, build_tool, tool_class
from toolformer_ray.tools.base import clean_result, unquote
from toolformer_ray.dates import date_from_url, parse_date
from toolformer_ray.tools.calendar_tool import describe_date

CAL = build_tool("Calendar")


def test_calendar_paper_example_and_other_dates():
    assert CAL.run([""], ["2023-01-30"]) == ["Today is Monday, January 30, 2023."]
    assert CAL.run(["", "", ""], ["2020-02-29", "1999-12-31T23:59:59Z", "20240101"]) == [
        "Today is Saturday, February 29, 2020.", "Today is Friday, December 31, 1999.",
        "Today is Monday, January 1, 2024."]
    assert CAL.uses_date and not CAL.takes_input


@pytest.mark.parametrize("inp, date, reason", [
    ("", None, "no date"),
    ("", "", "no date"),
    ("", "2023-02-30", "not an ISO date"),
    ("", "yesterday", "not an ISO date"),
    ("", "0001-01-01", "not an ISO date"),
    ("", "2023-1-5", "not an ISO date"),
    ("tomorrow", "2023-01-30", "takes no input"),
])
def test_calendar_bad_input(inp, date, reason):
    assert CAL.run([inp], [date]) == [None]
    assert reason in CAL.diagnose(inp, date)


def test_calendar_batch_without_dates_and_mismatched_lengths():
    assert CAL.run(["", ""]) == [None, None]
    assert CAL.run(["", ""], ["2023-01-30"]) == [None, None]
    assert CAL.run(['""'], ["2023-01-30"]) == ["Today is Monday, January 30, 2023."]  # Calendar("")


def test_calendar_prefilter_needs_a_date():
    assert CAL.prefilter(Document("a", "text", date="2021-06-01"))
    assert not CAL.prefilter(Document("a", "text", date=None))
    assert not CAL.prefilter(Document("a", "text", date="June 2021"))


@pytest.mark.parametrize("url, expected", [
    ("https://example.com/2023/01/30/story.html", "2023-01-30"),
    ("http://news.example.org/world/2019-11-05-election-results", "2019-11-05"),
    ("https://blog.example.com/posts/20210704_fireworks", "2021-07-04"),
    ("https://example.com/2023/13/45/not-a-date", None),
    ("https://example.com/about", None),
    ("https://2023-01-30.example.com/", None),  # the host is not the path
    ("", None),
    (None, None),
])
def test_date_from_url(url, expected):
    assert date_from_url(url) == expected


def test_parse_and_describe_date():
    d = parse_date("2023-01-30")
    assert describe_date(d) == "Today is Monday, January 30, 2023."
    assert parse_date(None) is None and parse_date(20230130) is None


# -- prompts ---------------------------------------------------------------------------------------

TOOLS = ["Calculator", "Calendar", "WikiSearch", "QA", "MT"]
_discover()  # import every tool module, whatever was imported before
REGISTERED = sorted(REGISTRY)


def test_registry_has_the_five_tools():
    assert set(TOOLS) <= set(REGISTERED)
    with pytest.raises(KeyError):
        tool_class("Nope")


@pytest.mark.parametrize("name", REGISTERED)  # every registered tool, including ones added later
def test_prompt_shape_and_examples(name):
    """Each example's Output is its Input with well-formed calls of this tool inserted (no results)."""
    prompt = build_tool(name).prompt()
    assert prompt.endswith("Input: {text}\nOutput: ")
    assert prompt.count("{text}") == 1 and prompt.count("{") == 1 and prompt.count("}") == 1
    assert f"[{name}(" in prompt.split("\n", 1)[0]  # the instruction shows the call syntax
    pairs = re.findall(r"^Input: (.*)\nOutput: (.*)$", prompt, flags=re.MULTILINE)
    pairs = [(i, o) for i, o in pairs if i != "{text}"]
    assert len(pairs) >= 4
    markers = Markers()
    n_calls = 0
    for inp, out in pairs:
        calls = find_calls(out, markers)
        assert calls, out
        for fc in calls:
            assert fc.call.tool == name and fc.result is None and not fc.has_result_marker
            if name == "Calendar":
                assert fc.call.input == ""
            else:
                assert fc.call.input
        n_calls += len(calls)
        assert strip_calls(out, markers) == inp
    assert n_calls >= len(pairs)


def test_calculator_prompt_calls_compute_the_text_values():
    prompt = build_tool("Calculator").prompt()
    calc = build_tool("Calculator")
    for fc in find_calls(prompt, Markers()):
        if fc.call.tool == "Calculator" and fc.call.input != "expression":
            assert calc.run([fc.call.input])[0] is not None, fc.call.input


def test_prompt_examples_are_the_papers_in_spirit():
    assert "[Calculator(400 / 1400)]" in build_tool("Calculator").prompt()
    assert parse_call_body("Calendar()").input == ""


# -- shared helpers ----------------------------------------------------------------------------------

def test_unquote_and_clean_result():
    assert unquote('  "Who is X?" ') == "Who is X?"
    assert unquote("“Brown Act”") == "Brown Act"
    assert unquote('"unbalanced') == '"unbalanced'
    assert clean_result("a [b]\n c ") == "a (b) c"
    assert clean_result("   ") is None and clean_result(None) is None
    assert len(clean_result("word " * 1000)) <= 1000


# -- CLI -------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_tool_prints_result_or_reason():
    res = runner.invoke(app, ["tool", "Calculator", "400 / 1400"])
    assert res.exit_code == 0 and res.output.strip() == "0.29"
    res = runner.invoke(app, ["tool", "Calculator", "1 / 0"])
    assert res.exit_code == 1 and "no result: division by zero" in res.output
    res = runner.invoke(app, ["tool", "Calendar", "--date", "2023-01-30"])
    assert res.output.strip() == "Today is Monday, January 30, 2023."
    res = runner.invoke(app, ["tool", "Calendar"])  # today's date by default
    assert res.exit_code == 0 and res.output.startswith("Today is ")


def test_cli_tool_errors_are_one_line():
    res = runner.invoke(app, ["tool", "Nope", "x"])
    assert res.exit_code != 0 and "unknown tool" in str(res.exception or res.output)
    res = runner.invoke(app, ["tool", "MT", "je ne sais quoi"])
    assert res.exit_code != 0 and "MT needs" in str(res.exception or res.output)
