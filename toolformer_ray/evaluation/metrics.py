"""The paper's lenient zero-shot metrics (section 4.2).

- Math: the first number in the output, or the first number after "=", equals the answer.
- LAMA / QA / temporal: a gold answer appears (as whole words, after normalisation) within the first
  N words of the output (LAMA: 5, QA: 20).
Normalisation is SQuAD's (lower case, no punctuation, no articles, single spaces) plus Unicode
folding (NFKD, accents dropped), so "Jozef Israëls" matches "jozef israels".
"""
from __future__ import annotations

import math
import re
import string
import unicodedata

# A number: optional minus (not when glued to a preceding word or digit: "3-4" is 3 and 4), digits
# with optional thousands commas ("25,000"), optional decimals, optional "/denominator" ("1/2").
_NUMBER = re.compile(
    r"(?<![\w.])(-)?"
    r"((?:\d{1,3}(?:,\d{3})+(?![\d,]))|\d+)?(\.\d+)?"
    r"(?:/(\d+(?:\.\d+)?))?"
)
_VULGAR = re.compile(r"(\d*)\s?([\u00bc-\u00be\u2150-\u215e])")


def _fold_unicode_numbers(text: str) -> str:
    # "3½" -> "3.5", "½" -> "0.5" before NFKC (which would turn "3½" into "31⁄2"); "−" (U+2212) ->
    # "-".
    def vulgar(m: re.Match) -> str:
        whole = int(m.group(1)) if m.group(1) else 0
        return repr(round(whole + unicodedata.numeric(m.group(2)), 6))

    text = _VULGAR.sub(vulgar, text)
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u2212", "-").replace("\u2044", "/")


def extract_numbers(text: str) -> list[float]:
    """All numbers in `text`, left to right: "1,000" -> 1000, "-3" -> -3, "1/2" -> 0.5, "$5." ->
    5."""
    text = _fold_unicode_numbers(text)
    out = []
    for m in _NUMBER.finditer(text):
        sign, whole, frac, denom = m.groups()
        if whole is None and frac is None:
            continue
        value = float((whole or "0").replace(",", "") + (frac or ""))
        if denom is not None:
            d = float(denom)
            if d == 0:
                continue
            value /= d
        out.append(-value if sign else value)
    return out


def first_number(text: str) -> float | None:
    nums = extract_numbers(text)
    return nums[0] if nums else None


def number_candidates(output: str) -> list[float]:
    """The numbers the math metric looks at: the first in the output and the first after the first
    "="."""
    cands = []
    first = first_number(output)
    if first is not None:
        cands.append(first)
    if "=" in output:
        after = first_number(output.split("=", 1)[1])
        if after is not None:
            cands.append(after)
    return cands


def numbers_equal(pred: float, gold: float) -> bool:
    # Equal up to float noise, or equal when both are rounded to two decimals ("33.33" for
    # 33.333...).
    return math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9) or round(pred, 2) == round(gold, 2)


def math_correct(output: str, answer: float) -> bool:
    return any(numbers_equal(c, answer) for c in number_candidates(output))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014",
                                    "\u00bf", "\u00a1"}


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation with Unicode folding: lower case, accents, punctuation and articles
    removed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_in_first_words(output: str, answers: list[str], n_words: int) -> bool:
    """Does a gold answer occur, as whole words, within the first `n_words` words of the output?"""
    window = normalize_answer(" ".join(output.split()[:n_words]))
    padded = f" {window} "
    for ans in answers:
        norm = normalize_answer(str(ans))
        if norm and f" {norm} " in padded:
            return True
    return False


def parse_answer_number(value) -> float | None:
    """A gold math answer as a number: 504.0, "98", "1,000", "9 (apples)", "-3", "1/2"; None if it
    is not one number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, list):
        return parse_answer_number(value[0]) if len(value) == 1 else None
    if not isinstance(value, str):
        return None
    text = re.sub(r"\([^)]*\)\s*$", "", value.strip()).strip()  # ASDiv: "9 (apples)"
    text = text.strip("$ %").strip()
    nums = extract_numbers(text)
    if len(nums) != 1:
        return None
    # The whole answer must be that one number (no "3:4" ratios or "5 and 3").
    rest = _NUMBER.sub("", _fold_unicode_numbers(text), count=1).strip()
    return nums[0] if not rest else None
