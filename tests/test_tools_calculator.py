"""Calculator: real inputs (the paper's examples), bad inputs, bounds, a 10,000-input fuzz against an
independent Fraction evaluator, and the appendix A.1 pre-filter."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolformer_ray.core.types import Document
from toolformer_ray.tools import build_tool
from toolformer_ray.tools.calculator import Calculator, calculator_prefilter, text_numbers

CALC = build_tool("Calculator")


def calc(expr):
    return CALC.run([expr])[0]


@pytest.mark.parametrize("expr, expected", [
    ("400 / 1400", "0.29"),  # the paper's example
    ("400/1400", "0.29"),
    ("18 + 12 * 3", "54"),  # prompt example: precedence
    ("18 + 12 x 3", "54"),  # "x" as a convenience
    ("(18 + 12) × 3", "90"),
    ("27 ÷ 4", "6.75"),
    ("1,000 / 8", "125"),  # thousands separators
    ("12,345.5 * 2", "24691"),
    ("0.1 + 0.2", "0.3"),  # exact decimals, not binary floats
    ("10 / 3", "3.33"),
    ("2 / 3", "0.67"),
    ("-1 / 3", "-0.33"),
    ("0.125", "0.13"),  # ties round away from zero
    ("-0.125", "-0.13"),
    ("-0.001", "0"),  # no "-0"
    ("5 / 2", "2.5"),  # no trailing zeros
    ("7 * 5", "35"),
    ("-(-3)", "3"),
    ("+4 - -2", "6"),
    ("((((1 + 1))))", "2"),
    (".5 + 5.", "5.5"),
    ('"27 * 3"', "81"),  # quoted input, as a model may write it
    ("  3  -  10  ", "-7"),
    ("999999999999999", "999999999999999"),
    ("100 − 1", "99"),  # typographic minus
])
def test_real_inputs(expr, expected):
    assert calc(expr) == expected


@pytest.mark.parametrize("expr, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("5 / 0", "division by zero"),
    ("1 / (3 - 3)", "division by zero"),
    ("2 ** 10", "expected a number"),
    ("2 ^ 10", "unexpected character"),
    ("1e309", "unexpected character"),
    ("nan", "unexpected character"),
    ("inf + 1", "unexpected character"),
    ("__import__('os')", "unexpected character"),
    ("(1 + 2", "unbalanced"),
    ("1 + 2)", "after a complete expression"),
    ("2 (3)", "after a complete expression"),  # no implicit multiplication
    ("1,00 + 1", "malformed number"),
    ("1.2.3", "malformed number"),
    ("9" * 16, "more than 15 digits"),
    ("999999999999999 * 999999999999999", "range"),
    ("(" * 30 + "1" + ")" * 30, "nesting"),
    ("-" * 30 + "1", "nesting"),
    ("1" + "+1" * 70, "operators"),
    ("1" * 10 + " + " + "1" * 300, "longer than"),
    ("١٢٣ + 1", "unexpected character"),  # non-ASCII digits are not numbers here
    ("１２ + 1", "unexpected character"),
    ("12 apples", "unexpected character"),
])
def test_bad_inputs_give_none_with_a_reason(expr, reason):
    assert calc(expr) is None
    assert reason in CALC.diagnose(expr)


def test_non_string_and_batch_order():
    assert CALC.run(["1+1", None, "2*3", 7, "x"]) == ["2", None, "6", None, None]
    assert CALC.run([]) == []


def test_adversarial_sizes_are_cheap():
    for expr in ["(" * 100_000, "9" * 1_000_000, "1/3*" * 10_000 + "1", "\x00" * 1000, "🙂" * 500]:
        assert calc(expr) is None
    # Many divisions with long denominators stay exact and bounded.
    assert calc("1/7/7/7/7/7/7/7*7*7*7*7*7*7*7") == "1"


def test_options_bound_the_calculator():
    small = Calculator({"max_abs": 100, "max_depth": 2})
    assert small.run(["50 + 50", "50 + 51", "((1))", "(((1)))"]) == ["100", None, "1", None]
    with pytest.raises(Exception):
        Calculator({"max_digits": 0})
    with pytest.raises(Exception):
        Calculator({"not_an_option": 1})


# -- fuzz --------------------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_SPELL = {"+": ["+"], "-": ["-", "−"], "*": ["*", "x", "×"], "/": ["/", "÷"]}
BOUND = Fraction(10**15)


class Invalid(Exception):
    pass


def _number():
    ints = st.one_of(st.integers(0, 1000), st.integers(0, 10**20))
    decimals = st.tuples(st.integers(0, 10**6), st.integers(0, 10**4)).map(lambda t: f"{t[0]}.{t[1]}")
    grouped = st.integers(1000, 10**12).map(lambda n: f"{n:,}")
    return st.one_of(ints.map(str), decimals, grouped).map(lambda s: ("num", s))


def _tree():
    return st.recursive(
        _number(),
        lambda children: st.one_of(
            st.tuples(st.sampled_from("+-*/"), children, children).map(lambda t: ("bin",) + t),
            children.map(lambda c: ("neg", c)),
            children.map(lambda c: ("paren", c)),
        ),
        max_leaves=40,
    )


def _render(node, draw_spell, depth=0):
    """(text, exact value or Invalid(reason), max nesting depth as the parser counts it)."""
    kind = node[0]
    if kind == "num":
        text = node[1]
        digits = sum(c.isdigit() for c in text)
        value = Fraction(text.replace(",", ""))
        return text, (Invalid("digits") if digits > 15 else value), depth
    if kind == "neg":
        child = node[1]
        wrap = child[0] == "bin"
        text, value, d = _render(child, draw_spell, depth + 1 + wrap)
        text = f"-({text})" if wrap else f"-{text}"
        return text, (value if isinstance(value, Invalid) else -value), max(d, depth + 1 + wrap)
    if kind == "paren":
        text, value, d = _render(node[1], draw_spell, depth + 1)
        return f"({text})", value, max(d, depth + 1)
    _, op, left, right = node
    lwrap = left[0] == "bin" and _PREC[left[1]] < _PREC[op]
    rwrap = right[0] == "bin" and _PREC[right[1]] <= _PREC[op]
    lt, lv, ld = _render(left, draw_spell, depth + lwrap)
    rt, rv, rd = _render(right, draw_spell, depth + rwrap)
    lt, rt = (f"({lt})" if lwrap else lt), (f"({rt})" if rwrap else rt)
    text = f"{lt} {draw_spell(op)} {rt}"
    d = max(ld, rd)
    for v in (lv, rv):
        if isinstance(v, Invalid):
            return text, v, d
    if op == "/" and rv == 0:
        return text, Invalid("zero"), d
    value = {"+": lambda: lv + rv, "-": lambda: lv - rv, "*": lambda: lv * rv, "/": lambda: lv / rv}[op]()
    return text, (Invalid("range") if abs(value) > BOUND else value), d


def check_against_fraction(tree, spell) -> None:
    text, value, depth = _render(tree, spell)
    result = calc(text)
    n_ops = sum(text.count(c) for c in "+-−*x×/÷")
    over_limits = len(text) > 200 or depth > 20 or n_ops > 64
    if result is None:
        assert isinstance(value, Invalid) or over_limits or abs(value) > BOUND - 1, (text, value)
        return
    assert not isinstance(value, Invalid), (text, result, value)
    assert not over_limits
    got = Fraction(result)
    # Correct to 2 decimals, written with at most 2 decimals, ties away from zero.
    assert abs(got - value) <= Fraction(1, 200), (text, result, value)
    assert len(result.partition(".")[2]) <= 2
    if abs(got - value) == Fraction(1, 200):
        assert abs(got) > abs(value)


# Inputs in the fuzz: 2,000 hypothesis trees (shrinkable) + 500 x 16 trees from a hypothesis-seeded
# generator (volume at low cost) + 2,000 garbage strings = 12,000.
@pytest.mark.slow
@settings(max_examples=2000, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(tree=_tree(), data=st.data())
def test_fuzz_expressions_against_fraction(tree, data):
    check_against_fraction(tree, lambda op: data.draw(st.sampled_from(_SPELL[op])))


def _random_tree(rng, budget: int):
    if budget <= 1 or rng.random() < 0.25:
        kind = rng.random()
        if kind < 0.5:
            return ("num", str(rng.randint(0, 1000)))
        if kind < 0.7:
            return ("num", str(rng.randint(0, 10 ** rng.randint(1, 22))))
        if kind < 0.9:
            return ("num", f"{rng.randint(0, 10**5)}.{rng.randint(0, 10**rng.randint(1, 6))}")
        return ("num", f"{rng.randint(1000, 10**13):,}")
    kind = rng.random()
    if kind < 0.7:
        split = rng.randint(1, budget - 1)
        return ("bin", rng.choice("+-*/"), _random_tree(rng, split), _random_tree(rng, budget - split))
    if kind < 0.85:
        return ("neg", _random_tree(rng, budget - 1))
    return ("paren", _random_tree(rng, budget - 1))


@pytest.mark.slow
@settings(max_examples=500, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_random_expression_batches(rng):
    for _ in range(16):
        check_against_fraction(_random_tree(rng, rng.choice([2, 4, 8, 16, 40])),
                               lambda op: rng.choice(_SPELL[op]))


@settings(max_examples=2000, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.text(max_size=60),
    st.text(alphabet="0123456789+-*/()., x×÷−eE_^%", max_size=80),
    st.text(alphabet=st.characters(min_codepoint=0x80), max_size=30),
    st.integers(0, 5000).map(lambda n: "(" * n + "1" + ")" * (n % 7)),
))
def test_fuzz_garbage_never_raises(text):
    result = calc(text)
    assert result is None or isinstance(result, str)
    if result is not None:
        Fraction(result)  # always a plain decimal number
        assert CALC.diagnose(text) is None


# -- pre-filter (appendix A.1; whitespace tokens) -----------------------------------------------------

def doc(text, doc_id="d"):
    return Document(doc_id=doc_id, text=text)


@pytest.mark.parametrize("text", [
    "Out of 1400 participants, 400 (or 29%) passed the test.",  # 400 / 1400 = 0.29 (written as 29%)
    "The shop sold 18 apples on Monday and 12 on Tuesday, 30 apples in all.",  # 18 + 12 = 30
    "The rooms measure 3.5 m by 4 m, an area of 14 square metres.",  # 3.5 * 4 = 14
    "A dozen eggs cost 4.20, so one egg costs 0.35 when you buy 12.",  # 4.20 / 12 = 0.35
    "18+12=30",
    "They paid a total of 54 dollars.",  # keyword followed by a number
    "The class had an average of 7.5 points.",
    "x = 3",
    "Three times two equals 6.",
    "It is equal to 1,200 metres.",
    "He was born in 1950 and died in 2001 at the age of 51.",  # 2001 - 1950 = 51
])
def test_prefilter_keeps_arithmetic_documents(text):
    assert calculator_prefilter(text, "d", random_fraction=0.0)
    assert CALC.prefilter(doc(text))


@pytest.mark.parametrize("text", [
    "The Australia national soccer team played in 1974, 2006, 2010, 2014 and 2018.",
    "No numbers at all in this text.",
    "Only 2 numbers: 5.",
    "Page 1 of 5, chapter 5.",  # identities (5 * 1 = 5) do not count
    "The total of the votes was not known.",  # keyword not followed by a number
])
def test_prefilter_rejects_other_documents(text):
    assert not calculator_prefilter(text, "d", random_fraction=0.0)


def test_prefilter_window_is_100_whitespace_tokens():
    filler = " ".join(["word"] * 120)
    near = f"We had 18 cats and 12 dogs, so 30 pets. {filler}"
    far = f"We had 18 cats and 12 dogs. {filler} There were 30 pets."
    assert calculator_prefilter(near, "d", random_fraction=0.0)
    assert not calculator_prefilter(far, "d", random_fraction=0.0)


def test_prefilter_random_share_is_deterministic_and_about_one_percent():
    text = "In 1974, 2006 and 2018 they played."  # >= 3 numbers, no triple, no keyword
    kept = [i for i in range(10_000) if calculator_prefilter(text, f"doc-{i}")]
    assert 60 <= len(kept) <= 140  # 1% of 10,000 = 100
    assert kept == [i for i in range(10_000) if calculator_prefilter(text, f"doc-{i}")]
    assert not any(calculator_prefilter("Just 1974 and 2006.", f"doc-{i}") for i in range(2000))


def test_text_numbers():
    nums = text_numbers("Paid $1,200.50 for 3 items (25%) on 2023-01-30")
    values = [v for v, *_ in nums]
    assert Fraction("1200.50") in values and 3 in values and 25 in values and Fraction(1, 4) in values
