"""Readers for the standard formats of the evaluation sets. Each returns `TaskData`: the examples
plus the count of records that could not be used, by reason (never a crash on one odd record).

math      MAWPS single-equation JSON (`sQuestion` / `lSolutions`), MWPToolkit JSON (`original_text`
          / `ans`: MAWPS, ASDiv-A, SVAMP as packaged there), GSM8K jsonl (`question` / `answer`
          ending "#### N"), SVAMP JSON (`Body` / `Question` / `Answer`), ASDiv XML
          (<Problem><Body/><Question/><Answer/>) and its JSON variants (Body/Question/Answer in any
          case).
lama      LAMA jsonl (SQuAD, Google-RE, T-REx): `masked_sentences` (or `masked_sentence`, or T-REx
          `evidences[].masked_sentence`) and `obj_label`. Only statements whose [MASK] is the last
          word (punctuation may follow) are kept, as in the paper, and the prompt is the text before
          the mask.
qa        WebQuestions JSON (`qText`/`answers`, or the original `utterance`/`targetValue`), the DPR
          TSV format (`question<TAB>['answer', ...]`: NQ, TriviaQA) and jsonl (`question` +
          `answers`/`answer`).
temporal  SituatedQA-style jsonl (`question` or `edited_question`, `answer`, optional `date`),
          TempLAMA jsonl (`query` "... _X_.", `answer` [{name}], `date`; kept when _X_ is last, the
          statement is the prompt) and the generated Dateset (see dateset.py; also readable back
          from its jsonl).
Paths may be local or any fsspec URI (s3://...).
"""
from __future__ import annotations

import ast
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter

from toolformer_ray.evaluation.dateset import generate_dateset
from toolformer_ray.evaluation.examples import DataError, Example, TaskData, read_text
from toolformer_ray.evaluation.metrics import parse_answer_number


def _json_records(text: str, path: str) -> list:
    """A JSON array, a JSON object holding one array, or JSON lines."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == 1:  # maybe one pretty-printed JSON object
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: neither JSON nor JSON lines: {e}") from None
                lists = ([v for v in data.values() if isinstance(v, list)]
                         if isinstance(data, dict) else [])
                if len(lists) == 1:
                    return lists[0]
                raise DataError(f"{path}: a JSON object without one list of records") from None
            raise DataError(f"{path}, line {n}: not valid JSON") from None
    return records


def _get(rec: dict, *keys: str):
    """The first present key, case-insensitively."""
    lower = {k.lower(): v for k, v in rec.items()} if isinstance(rec, dict) else {}
    for k in keys:
        if k.lower() in lower and lower[k.lower()] is not None:
            return lower[k.lower()]
    return None


# -- math
# -----------------------------------------------------------------------------------------------
def _join_body_question(body: str, question: str) -> str:
    body = body.strip()
    question = question.strip()
    if body and body[-1] not in ".?!,;:":
        body += "."  # SVAMP bodies often lack the final full stop
    return f"{body} {question}".strip()


def _math_from_record(rec: dict) -> tuple[str | None, object, str]:
    """(question, raw answer, format) for one JSON record of any supported math format."""
    if "sQuestion" in rec:
        return rec["sQuestion"], rec.get("lSolutions"), "mawps"
    if "original_text" in rec:
        return rec["original_text"], rec.get("ans"), "mwptoolkit"
    body = _get(rec, "Body")
    question = _get(rec, "Question")
    if body is not None and question is not None:
        question = _join_body_question(str(body), str(question))
        return question, _get(rec, "Answer", "ans"), "svamp/asdiv"
    if question is not None:
        answer = _get(rec, "answer", "ans", "solution")
        if isinstance(answer, str) and "####" in answer:  # GSM8K: the final answer follows "####"
            return str(question), answer.rsplit("####", 1)[1].strip(), "gsm8k"
        return str(question), answer, "question/answer"
    return None, None, "unknown"


def read_math(path: str) -> TaskData:
    text = read_text(path)
    if text.lstrip().startswith("<"):
        return _read_asdiv_xml(text, path)
    examples = []
    skipped = Counter()
    formats = Counter()
    for i, rec in enumerate(_json_records(text, path)):
        if not isinstance(rec, dict):
            skipped["not a JSON object"] += 1
            continue
        question, raw, fmt = _math_from_record(rec)
        if question is None:
            skipped["no question field"] += 1
            continue
        formats[fmt] += 1
        number = parse_answer_number(raw)
        if number is None:
            skipped["answer is not a single number"] += 1
            continue
        ex_id = str(_get(rec, "id", "iIndex", "ID") or i)
        examples.append(Example(ex_id, " ".join(str(question).split()), [_fmt_number(number)],
                                number))
    if not examples and formats.get("unknown", 0) == sum(formats.values()):
        raise DataError(f"{path}: no math records found (expected sQuestion/lSolutions, "
                        "original_text/ans, question/answer, or Body/Question/Answer)")
    return TaskData(examples, formats.most_common(1)[0][0] if formats else "empty", dict(skipped))


def _read_asdiv_xml(text: str, path: str) -> TaskData:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML: {e}") from None
    examples = []
    skipped = Counter()
    for i, prob in enumerate(root.iter("Problem")):
        body, question, answer = (prob.findtext(t) for t in ("Body", "Question", "Answer"))
        if question is None or answer is None:
            skipped["missing Question or Answer"] += 1
            continue
        number = parse_answer_number(answer)
        if number is None:
            skipped["answer is not a single number"] += 1
            continue
        q = _join_body_question(body or "", question)
        examples.append(Example(prob.get("ID", str(i)), " ".join(q.split()), [_fmt_number(number)],
                                number,
                                meta={"solution_type": prob.findtext("Solution-Type")}))
    if not examples and not skipped:
        raise DataError(f"{path}: no <Problem> elements (expected ASDiv XML)")
    return TaskData(examples, "asdiv-xml", dict(skipped))


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# -- LAMA
# -----------------------------------------------------------------------------------------------
_MASK = "[MASK]"
_TRAILING = re.compile(r"^[\s.!?,;:'\")]*$")


def lama_prompt(sentence: str) -> str | None:
    """The statement up to its [MASK] if the mask is the last word (punctuation may follow), else
    None."""
    if sentence.count(_MASK) != 1:
        return None
    before, after = sentence.split(_MASK)
    if not _TRAILING.match(after) or not before.strip():
        return None
    return before.rstrip()


def read_lama(path: str) -> TaskData:
    examples = []
    skipped = Counter()
    for i, rec in enumerate(_json_records(read_text(path), path)):
        if not isinstance(rec, dict) or "obj_label" not in rec:
            skipped["no obj_label"] += 1
            continue
        sentences = rec.get("masked_sentences") or []
        if isinstance(sentences, str):
            sentences = [sentences]
        if rec.get("masked_sentence"):
            sentences = [rec["masked_sentence"], *sentences]
        for ev in rec.get("evidences") or []:  # T-REx keeps its sentences in the evidences
            if isinstance(ev, dict) and ev.get("masked_sentence"):
                sentences.append(ev["masked_sentence"])
        if not sentences:
            skipped["no masked sentence"] += 1
            continue
        prompt = next((p for p in map(lama_prompt, sentences) if p), None)
        if prompt is None:
            skipped["[MASK] is not the last word"] += 1
            continue
        ex_id = str(rec.get("uuid") or rec.get("id") or i)
        relation = rec.get("pred") or rec.get("predicate_id") or ""
        examples.append(Example(ex_id, prompt, [str(rec["obj_label"])],
                                meta={"relation": relation, "sub_label": rec.get("sub_label")}))
    if not examples and not skipped:
        raise DataError(f"{path}: no LAMA records (expected masked_sentences and obj_label)")
    return TaskData(examples, "lama-jsonl", dict(skipped))


# -- QA
# -------------------------------------------------------------------------------------------------
_TARGET_VALUE = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^)\s]+))\)')


def _answers_value(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        if value.lstrip().startswith("(list"):  # original WebQuestions targetValue
            return [a or b for a, b in _TARGET_VALUE.findall(value)]
        return [value]
    if isinstance(value, list):
        out = []
        for v in value:
            out += _answers_value(v) if isinstance(v, (list, str)) else (
                [str(v.get("text") or v.get("name") or "")] if isinstance(v, dict) else [str(v)])
        return [a for a in out if a]
    if isinstance(value, dict):  # e.g. TriviaQA {"value": ..., "aliases": [...]}
        return _answers_value([value.get("value"), *(value.get("aliases") or [])])
    return [str(value)]


def _parse_dpr_answers(field_: str) -> list[str] | None:
    try:
        value = ast.literal_eval(field_)
    except (ValueError, SyntaxError):
        return None
    return _answers_value(value) if isinstance(value, (list, str)) else None


def read_qa(path: str) -> TaskData:
    text = read_text(path)
    first = text.lstrip()[:1]
    if first in "[{":
        try:
            records = _json_records(text, path)
        except DataError:
            if "\t" not in text.split("\n", 1)[0]:
                raise
            records = None
        if records is not None:
            return _qa_from_records(records, path)
    return _read_dpr_tsv(text, path)


def _qa_from_records(records: list, path: str) -> TaskData:
    examples = []
    skipped = Counter()
    fmt = "qa-json"
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            skipped["not a JSON object"] += 1
            continue
        question = _get(rec, "qText", "question", "utterance", "Question")
        answers = _answers_value(_get(rec, "answers", "answer", "targetValue", "Answer"))
        if "qText" in rec or "utterance" in rec:
            fmt = "webquestions"
        if not question or not answers:
            skipped["no question or no answers"] += 1
            continue
        ex_id = str(_get(rec, "qId", "id", "question_id", "QuestionId") or i)
        examples.append(Example(ex_id, " ".join(str(question).split()), answers))
    if not examples and not skipped:
        raise DataError(f"{path}: no QA records (expected question + answers)")
    if not examples and skipped.get("no question or no answers") == sum(skipped.values()):
        raise DataError(f"{path}: no QA records (expected qText/question/utterance and "
                        "answers/answer)")
    return TaskData(examples, fmt, dict(skipped))


def _read_dpr_tsv(text: str, path: str) -> TaskData:
    # DPR's TSV: question<TAB>python-list of answers; fields may be CSV-quoted ("" for a quote).
    examples = []
    skipped = Counter()
    reader = csv.reader(io.StringIO(text), delimiter="\t", quotechar='"')
    for i, row in enumerate(reader):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            skipped["not question<TAB>answers"] += 1
            continue
        answers = _parse_dpr_answers(row[1])
        if not answers:
            if i == 0 and row[0].lower() == "question":  # a header line
                continue
            skipped["answers are not a list"] += 1
            continue
        examples.append(Example(str(i), " ".join(row[0].split()), answers))
    if not examples:
        raise DataError(f"{path}: no records in the DPR TSV format (question<TAB>['answer', ...])")
    return TaskData(examples, "dpr-tsv", dict(skipped))


# -- temporal
# -------------------------------------------------------------------------------------------
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def read_temporal(path: str, dateset_size: int = 500) -> TaskData:
    """SituatedQA-style jsonl / a written Dateset, or "dateset[:N[:seed]]" to generate one."""
    if path.split(":", 1)[0] == "dateset":
        parts = path.split(":")
        try:
            n = int(parts[1]) if len(parts) > 1 and parts[1] else dateset_size
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise DataError(f"bad Dateset spec {path!r}: use dateset, dateset:N or "
                            "dateset:N:seed") from None
        if n <= 0:
            raise DataError(f"bad Dateset spec {path!r}: N must be positive")
        return TaskData(generate_dateset(n, seed), "dateset")
    examples = []
    skipped = Counter()
    for i, rec in enumerate(_json_records(read_text(path), path)):
        if not isinstance(rec, dict):
            skipped["not a JSON object"] += 1
            continue
        question = rec.get("edited_question") or rec.get("question")
        answers = _answers_value(rec.get("answer", rec.get("answers")))
        meta = {k: rec[k] for k in ("date", "date_type", "template", "relation") if k in rec}
        if question is None and isinstance(rec.get("query"), str):  # TempLAMA: "X plays for _X_."
            question = lama_prompt(rec["query"].replace("_X_", _MASK))
            if question is None:
                skipped["_X_ is not the last word"] += 1
                continue
            meta["cloze"] = True  # the statement itself is the prompt
        if not question or not answers:
            skipped["no question or no answer"] += 1
            continue
        date = str(rec.get("date")) if rec.get("date") is not None else None
        today = rec.get("today") or (date if date and _ISO_DATE.match(date) else None)
        examples.append(Example(str(rec.get("id", i)), " ".join(str(question).split()),
                                list(dict.fromkeys(answers)), date=today, meta=meta))
    if not examples and not skipped:
        raise DataError(f"{path}: no temporal records (expected question/edited_question and "
                        "answer)")
    return TaskData(examples, "situatedqa-jsonl", dict(skipped))


READERS = {"math": read_math, "lama": read_lama, "qa": read_qa, "temporal": read_temporal}


def read_task(task: str, path: str, limit: int | None = None, dateset_size: int = 500) -> TaskData:
    if task not in READERS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(READERS)}")
    data = read_temporal(path, dateset_size) if task == "temporal" else READERS[task](path)
    if limit is not None:
        data.examples = data.examples[:limit]
    return data
