"""Each evaluation format's reader, on a few real lines of each (tests/fixtures/eval/), plus the
Dateset."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from toolformer_ray.evaluation.dateset import generate_dateset, write_dateset
from toolformer_ray.evaluation.readers import DataError, lama_prompt, read_task

FIX = Path(__file__).parent / "fixtures" / "eval"


def read(task, name, **kw):
    return read_task(task, str(FIX / name), **kw)


# -- math ---------------------------------------------------------------------------------------------------
def test_mawps_single_equation():
    d = read("math", "mawps_single.json")
    assert d.format == "mawps" and len(d.examples) == 3
    assert d.examples[0].question.startswith("Bryan took a look at his books as well.")
    assert [e.number for e in d.examples] == [504.0, 98.0, 13000.0]  # "98" is a string; 25,000 in the text
    assert d.examples[0].id == "3238"


def test_mwptoolkit_json():
    d = read("math", "mwptoolkit_mawps.json")
    assert d.format == "mwptoolkit" and [e.number for e in d.examples] == [504, 432, 98]


def test_gsm8k_answer_after_hashes():
    d = read("math", "gsm8k.jsonl")
    assert d.format == "gsm8k" and [e.number for e in d.examples] == [18, 3]
    assert "Janet\u2019s ducks" in d.examples[0].question


def test_svamp_body_and_question_joined():
    d = read("math", "svamp.json")
    assert [e.number for e in d.examples] == [51, 1]
    assert d.examples[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars "
                                      "on each pack. How much do you have to pay to buy each pack?")
    assert d.examples[0].id == "chal-1"


def test_asdiv_xml_and_json():
    d = read("math", "asdiv.xml")
    assert d.format == "asdiv-xml"
    assert [(e.id, e.number) for e in d.examples] == [("nluds-0001", 9), ("nluds-0002", 15)]
    assert d.examples[0].question == ("Seven red apples and two green apples are in the basket. "
                                      "How many apples are in the basket?")
    assert d.skipped == {"answer is not a single number": 1}  # the "3:2" ratio
    j = read("math", "asdiv.jsonl")
    assert [e.number for e in j.examples] == [9, -3]


# -- LAMA ---------------------------------------------------------------------------------------------------
def test_lama_prompt_only_when_mask_is_last():
    assert lama_prompt("Newton played as [MASK] during Super Bowl 50.") is None
    assert lama_prompt("The capital of Canada is [MASK] .") == "The capital of Canada is"
    assert lama_prompt("born in [MASK].") == "born in"
    assert lama_prompt("[MASK] .") is None
    assert lama_prompt("two [MASK] [MASK]") is None


def test_lama_squad():
    d = read("lama", "lama_squad.jsonl")
    assert [(e.question, e.answers) for e in d.examples] == [
        ("The TGIF comedy Family Matters for the 1997-98 season was originally aired by", ["CBS"])]
    assert d.skipped == {"[MASK] is not the last word": 2}


def test_lama_google_re():
    d = read("lama", "lama_google_re.jsonl")
    assert d.examples[0].question == "Federico Falco is an Argentinian writer born in"
    assert d.examples[0].answers == ["1977"]
    assert d.examples[0].meta["relation"] == "/people/person/date_of_birth"


def test_lama_trex_evidences():
    d = read("lama", "lama_trex.jsonl")
    assert [(e.question, e.answers[0]) for e in d.examples] == [
        ("The capital of Canada is", "Ottawa"), ("Victor Hugo died in", "Paris")]  # 2nd evidence used
    assert d.examples[0].meta["relation"] == "P36"
    assert d.skipped == {"[MASK] is not the last word": 1}


# -- QA -----------------------------------------------------------------------------------------------------
def test_dpr_tsv_nq_and_trivia_with_csv_quoting():
    nq = read("qa", "nq.dpr.tsv")
    assert nq.format == "dpr-tsv" and len(nq.examples) == 3
    assert nq.examples[1].answers == ["581 ( second edition )"]
    tr = read("qa", "trivia.dpr.tsv")
    assert tr.examples[0].answers[0] == "\U0001f681"
    assert "Boxing" in tr.examples[1].answers and "Gentleman's sport" in tr.examples[1].answers


def test_webquestions_both_formats():
    d = read("qa", "webquestions.json")
    assert d.format == "webquestions" and d.examples[0].answers == ["Jazmyn Bieber", "Jaxon Bieber"]
    assert "Jozef Isra\u00ebls" in d.examples[2].answers
    o = read("qa", "webquestions_original.json")
    assert o.examples[0].answers == ["Jazmyn Bieber", "Jaxon Bieber"]
    assert o.examples[1].answers == ["Padm\u00e9 Amidala"]


def test_qa_jsonl():
    d = read("qa", "nq_open.jsonl")
    assert [e.answers for e in d.examples] == [["the Saint Lawrence River"], ["Linda Davis"]]


# -- temporal
# -----------------------------------------------------------------------------------------------
def test_situatedqa_uses_the_edited_question():
    d = read("temporal", "situatedqa.jsonl")
    assert d.examples[0].question == "when did england last get to the semi final of a world cup as of 2021"
    assert d.examples[0].answers == ["2018"]  # duplicates removed
    assert d.examples[0].date is None  # a year is not a date for Calendar
    assert d.examples[2].answers == ["1990"]


def test_dateset_answers_follow_from_the_date():
    exs = generate_dateset(300, seed=3)
    assert exs == generate_dateset(300, seed=3)  # deterministic
    assert len({e.meta["template"] for e in exs}) == 6
    for e in exs:
        today = dt.date.fromisoformat(e.date)
        assert e.date not in e.question and str(today.year) not in e.question.split("?")[0].split(",")[0]
        if e.meta["template"] == "days_ago":
            past = dt.datetime.strptime(e.question[len("How many days ago was "):-1],
                                        "%B %d, %Y").date()
            assert e.answers == [str((today - past).days)]
        if e.question == "What day of the week is it today?":
            assert e.answers == [f"{today:%A}"]
        if e.question.startswith("What year will it be in "):
            n = int(e.question.split()[-2])
            assert e.answers == [str((today + dt.timedelta(days=n)).year)]


def test_dateset_spec_and_file_round_trip(tmp_path):
    d = read_task("temporal", "dateset:7:1")
    assert len(d.examples) == 7 and d.format == "dateset"
    path = tmp_path / "dateset.jsonl"
    assert write_dateset(str(path), 7, seed=1) == 7
    back = read_task("temporal", str(path))
    assert [(e.question, e.answers, e.date) for e in back.examples] == [
        (e.question, e.answers, e.date) for e in d.examples]
    with pytest.raises(DataError, match="dateset"):
        read_task("temporal", "dateset:many")


# -- errors and limits
# --------------------------------------------------------------------------------------
def test_limit():
    assert len(read("math", "mawps_single.json", limit=2).examples) == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_task("math", str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="unknown task"):
        read_task("poetry", str(FIX / "gsm8k.jsonl"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_task("math", str(bad))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="no math records"):
        read_task("math", str(other))
    with pytest.raises(DataError, match="not valid JSON"):
        read_task("qa", str(tmp_path / "bad.json"))
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("just a line without answers\n")
    with pytest.raises(DataError, match="DPR TSV"):
        read_task("qa", str(tsv))
    xml = tmp_path / "bad.xml"
    xml.write_text("<Problem><Body>")
    with pytest.raises(DataError, match="not valid XML"):
        read_task("math", str(xml))


def test_templama_cloze():
    from toolformer_ray.config import EvalConfig
    from toolformer_ray.evaluation.tasks import prompt_for

    d = read("temporal", "templama.jsonl")
    assert [(e.question, e.answers) for e in d.examples] == [("Cristiano Ronaldo plays for", ["Juventus F.C."])]
    assert d.skipped == {"_X_ is not the last word": 1}
    assert prompt_for("temporal", d.examples[0], EvalConfig()) == "Cristiano Ronaldo plays for"
