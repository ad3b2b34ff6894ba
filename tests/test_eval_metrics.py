"""The lenient metrics of the paper's section 4.2, with their edge cases."""
from __future__ import annotations

import pytest

from toolformer_ray.evaluation.metrics import (answer_in_first_words, extract_numbers, first_number,
                                               math_correct, normalize_answer, number_candidates,
                                               parse_answer_number)


@pytest.mark.parametrize("text, numbers", [
    ("He has 25,000 dollars and spends 1,500.", [25000, 1500]),
    ("half is 1/2 of it", [0.5]),
    ("It is -3 degrees, then 4", [-3, 4]),
    ("3-4 and 10 - 2", [3, 4, 10, 2]),  # a minus glued to a number after a digit is a range, not a sign
    ("The answer is 504.", [504]),
    ("costs $2.50 or .5", [2.5, 0.5]),
    ("1,2345 is not grouped", [1, 2345]),
    ("\u2212 7 and \u22127", [7, -7]),  # U+2212 minus sign
    ("\uff15\uff10 apples", [50]),  # full-width digits
    ("3\u00bd cups, \u00bd cup", [3.5, 0.5]),  # vulgar fractions
    ("divide by 0/0 then 6/3", [2.0]),  # a fraction with a zero denominator is no number
    ("no numbers here", []),
    ("x2 is a name, 2x is not", [2]),
])
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == pytest.approx(numbers)


def test_first_number_and_first_after_equals():
    assert first_number("so 56 * 9 = 504") == 56
    assert number_candidates("so 56 * 9 = 504 books") == [56, 504]
    assert number_candidates("no equals 7") == [7]
    assert number_candidates("nothing") == []


@pytest.mark.parametrize("output, answer, ok", [
    (" 504", 504.0, True),
    (" 56 * 9 = 504", 504.0, True),  # the first number after "=" counts
    (" 56 * 9 = 500", 504.0, False),
    (" He has 23,500 dollars left.", 23500, True),
    (" -3", -3, True),
    (" 3", -3, False),
    (" 1/2", 0.5, True),
    (" 33.33", 33.333333, True),  # equal at two decimals
    (" 33.3", 33.333333, False),
    (" 504.0000001", 504, True),
    (" The answer is 12 and then 504", 504, False),  # only the first number (or the first after "=")
    ("", 5, False),
])
def test_math_correct(output, answer, ok):
    assert math_correct(output, answer) is ok


@pytest.mark.parametrize("text, norm", [
    ("The Saint Lawrence River!", "saint lawrence river"),
    ("Jozef Isra\u00ebls", "jozef israels"),
    ("Paul C\u00e9zanne", "paul cezanne"),
    ("an apple, a pear", "apple pear"),
    ("\u201cQuoted\u201d \u2014 text", "quoted text"),
    ("Theory", "theory"),  # "the" only as a whole word
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_answer_in_first_words():
    assert answer_in_first_words(" Paris, of course.", ["Paris"], 5)
    assert answer_in_first_words(" it is the Saint Lawrence River", ["the Saint Lawrence River"], 20)
    assert answer_in_first_words(" It was painted by Paul Cezanne", ["Paul C\u00e9zanne"], 20)
    assert not answer_in_first_words(" one two three four five Paris", ["Paris"], 5)  # 6th word
    assert answer_in_first_words(" one two three four Paris", ["Paris"], 5)
    assert not answer_in_first_words(" Parisian food", ["Paris"], 5)  # whole words only
    assert answer_in_first_words(" Born in 1,941? no: 1941.", ["1941"], 5)
    assert not answer_in_first_words(" anything", ["The"], 5)  # an answer that normalises to nothing
    assert answer_in_first_words(" \U0001f681 flew", ["\U0001f681", "Helicopter"], 5)  # unicode symbols


@pytest.mark.parametrize("value, number", [
    (504.0, 504), ("98", 98), ([432.0], 432), ("1,000", 1000), ("9 (apples)", 9),
    ("-3 (degrees)", -3),
    ("1/2", 0.5), ("$5", 5), ("50%", 50),
    ("3:2", None), ("5 and 3", None), ([1.0, 2.0], None), ("", None), (None, None), (True, None),
    (float("nan"), None), ("about 5", None),
])
def test_parse_answer_number(value, number):
    assert parse_answer_number(value) == (pytest.approx(number) if number is not None else None)
