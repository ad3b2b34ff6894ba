"""Calculator: + - * / and parentheses over exact rationals, rounded to 2 decimals as in the paper.

The expression is parsed by a small recursive-descent parser (never eval): numbers become exact
`Fraction`s, so 0.1 + 0.2 is 0.3 and the only rounding is the final one (half away from zero, as a
person rounds; the paper's `round(float, 2)` rounds the binary float half-to-even, which differs
only on exact ties such as 0.125). Every resource is bounded: input length, digits per number,
nesting depth, operator count, the size of every intermediate value and a wall-clock budget, so no
input can hang a worker or blow up memory. Bad input gives None ("no result"), with the reason in
`diagnose`.
"""
from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from fractions import Fraction

from pydantic import Field

from toolformer_ray.core.types import Document
from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, ToolOptions, stable_fraction, unquote


class CalcError(ValueError):
    """Why an expression has no result (shown by `diagnose` / `toolformer-ray tool`)."""


# Operator spellings accepted as conveniences: "3 x 4", "3 × 4", "8 ÷ 2", a typographic minus.
_OPS = {"+": "+", "-": "-", "\u2212": "-", "\u2013": "-", "*": "*", "x": "*", "X": "*",
        "\u00d7": "*", "\u22c5": "*", "\u00b7": "*", "/": "/", "\u00f7": "/", "(": "(", ")": ")"}
# A number: thousands-grouped (1,000 or 12,345.5) or plain (12, 12.5, .5, 12.). ASCII digits only.
_NUMBER_RE = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+\.?[0-9]*|\.[0-9]+")


_HEX_PREFIX = re.compile(r"[xX][0-9a-fA-F]")


def _tokenize(expr: str, max_digits: int, deadline: float) -> list[Fraction | str]:
    tokens: list[Fraction | str] = []
    pos, n = 0, len(expr)
    while pos < n:
        if time.thread_time() > deadline:
            raise CalcError("time limit exceeded")
        ch = expr[pos]
        if ch.isspace():
            pos += 1
            continue
        m = _NUMBER_RE.match(expr, pos)
        if m:
            text = m.group().replace(",", "")
            if sum(c.isdigit() for c in text) > max_digits:
                raise CalcError(f"a number has more than {max_digits} digits")
            end = m.end()
            if end < n and (expr[end] == "," or expr[end] == "."):
                raise CalcError(f"malformed number near {expr[pos:end + 1]!r}")
            if text == "0" and _HEX_PREFIX.match(expr, end):
                # "0x10" is a hexadecimal literal to anyone who writes code, not 0 x 10 = 0.
                raise CalcError(f"hexadecimal literals are not supported: {expr[pos:end + 2]!r}...")
            tokens.append(Fraction(text))
            pos = end
            continue
        if ch in _OPS:
            tokens.append(_OPS[ch])
            pos += 1
            continue
        raise CalcError(f"unexpected character {ch!r}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('+'|'-') unary | number | '(' expr ')'. Evaluates while parsing."""

    def __init__(self, tokens, max_depth: int, max_abs: Fraction, max_bits: int, deadline: float):
        self.tokens, self.pos = tokens, 0
        self.max_depth, self.max_abs, self.max_bits, self.deadline = (max_depth, max_abs, max_bits,
                                                                      deadline)
        self.depth = 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def check(self, value: Fraction) -> Fraction:
        if time.thread_time() > self.deadline:
            raise CalcError("time limit exceeded")
        if abs(value) > self.max_abs:
            raise CalcError("a value exceeds the calculator's range")
        if value.denominator.bit_length() > self.max_bits:
            raise CalcError("a value has too many decimals")
        return value

    def parse(self) -> Fraction:
        if not self.tokens:
            raise CalcError("empty expression")
        value = self.expr()
        if self.pos != len(self.tokens):
            raise CalcError(f"unexpected {self._describe(self.peek())} after a complete expression")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = self.check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = self.check(value * rhs)
            elif rhs == 0:
                raise CalcError("division by zero")
            else:
                value = self.check(value / rhs)
        return value

    def unary(self) -> Fraction:
        tok = self.take()
        if isinstance(tok, Fraction):
            return self.check(tok)
        if tok in ("+", "-", "("):
            self.depth += 1
            if self.depth > self.max_depth:
                raise CalcError(f"nesting deeper than {self.max_depth}")
            if tok == "(":
                value = self.expr()
                if self.take() != ")":
                    raise CalcError("unbalanced parentheses")
            else:
                value = self.unary()
                value = -value if tok == "-" else value
            self.depth -= 1
            return value
        raise CalcError(f"expected a number, found {self._describe(tok)}")

    @staticmethod
    def _describe(tok) -> str:
        return "the end of the expression" if tok is None else repr(str(tok))


def round_2(value: Fraction) -> Fraction:
    """Round to 2 decimals, half away from zero, exactly."""
    hundredths = (abs(value) * 100 + Fraction(1, 2)).__floor__()
    return Fraction(hundredths if value >= 0 else -hundredths, 100)


def format_number(value: Fraction) -> str:
    """A 2-decimal Fraction without trailing zeros: 35, 0.29, 2.5, -3."""
    hundredths = abs(value.numerator * 100 // value.denominator)
    whole, frac = divmod(hundredths, 100)
    text = f"{whole}.{frac:02d}".rstrip("0").rstrip(".")
    return "-" + text if value < 0 and text != "0" else text


class CalculatorOptions(ToolOptions):
    max_chars: int = Field(200, gt=0)  # longer inputs are not a calculator call
    max_digits: int = Field(15, gt=0)  # digits in one number
    max_depth: int = Field(20, gt=0)  # nested parentheses / signs
    max_operators: int = Field(64, gt=0)
    max_abs: float = Field(1e15, gt=0)  # bound on every intermediate value and the result
    time_limit_s: float = Field(0.5, gt=0)  # CPU seconds per input (a safety net: inputs are short)
    # Pre-filter (appendix A.1).
    window_tokens: int = Field(100, gt=2)  # whitespace tokens that must span the three numbers
    # docs with >= 3 numbers let through anyway
    random_fraction: float = Field(0.01, ge=0.0, le=1.0)


@register
class Calculator(Tool):
    name = "Calculator"
    version = "1"
    Options = CalculatorOptions

    def evaluate(self, expression: str) -> Fraction:
        """The exact value of an expression (unrounded); raises CalcError with the reason."""
        o = self.options
        expr = unquote(expression)
        if len(expr) > o.max_chars:
            raise CalcError(f"input longer than {o.max_chars} characters")
        deadline = time.thread_time() + o.time_limit_s
        tokens = _tokenize(expr, o.max_digits, deadline)
        if sum(1 for t in tokens if isinstance(t, str) and t not in "()") > o.max_operators:
            raise CalcError(f"more than {o.max_operators} operators")
        parser = _Parser(tokens, o.max_depth, Fraction(int(o.max_abs)), 4096, deadline)
        return parser.parse()

    def calculate(self, expression: str) -> str:
        value = round_2(self.evaluate(expression))
        if abs(value) > self.options.max_abs:
            raise CalcError("the result exceeds the calculator's range")
        return format_number(value)

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        out: list[str | None] = []
        for inp in inputs:
            try:
                out.append(self.calculate(inp) if isinstance(inp, str) else None)
            except (CalcError, ArithmeticError, ValueError, RecursionError, MemoryError):
                out.append(None)
        return out

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        try:
            self.calculate(inp)
            return None
        except Exception as e:  # noqa: BLE001 - a reason to show, whatever it is
            return str(e) or type(e).__name__

    def prefilter(self, doc: Document) -> bool:
        return calculator_prefilter(doc.text, doc.doc_id, self.options.window_tokens,
                                    self.options.random_fraction)


# -- pre-filter (appendix A.1) ---------------------------------------------------------------------

# "=", "equals", "equal to", "total of", "average of" followed by a number (a currency sign
# allowed).
_KEYWORD_RE = re.compile(r"(?:=|\bequals\b|\bequal to\b|\btotal of\b|\baverage of\b)"
                         r"\s*[$\u20ac\u00a3\u00a5]?\s*"
                         r"[-\u2212]?\.?[0-9]", re.IGNORECASE)
_TEXT_NUMBER_RE = re.compile(r"(?<![\w.,])([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"
                             r"(?:\.([0-9]+))?(?![\w])(%?)")
_MAX_PREFILTER_NUMBERS = 400  # a table of thousands of numbers is judged on its first ones


def text_numbers(text: str) -> list[tuple[Fraction, int, int, int]]:
    """(value, whitespace-token index, decimals, occurrence) of the numbers in a text. "29%" is one
    occurrence with two readings, 29 and 0.29."""
    found: list[tuple[Fraction, int, int, int]] = []
    occurrence = 0
    for tok_idx, tok in enumerate(re.finditer(r"\S+", text)):
        for m in _TEXT_NUMBER_RE.finditer(tok.group()):
            whole, frac, pct = m.group(1).replace(",", ""), m.group(2) or "", m.group(3)
            if len(whole) + len(frac) > 15:
                continue
            value = Fraction(f"{whole}.{frac}" if frac else whole)
            found.append((value, tok_idx, len(frac), occurrence))
            if pct:
                found.append((value / 100, tok_idx, len(frac) + 2, occurrence))
            occurrence += 1
            if len(found) >= _MAX_PREFILTER_NUMBERS:
                return found
    return found


def has_arithmetic_triple(numbers: list[tuple[Fraction, int, int, int]], window: int = 100) -> bool:
    """Are there three numbers within `window` tokens where one is a + b, a - b, a * b or a / b of
    the other two? A written quotient may be rounded (400 / 1400 = 0.29). Identities (x * 1, x + 0,
    x - x, x / x) do not count: any text with a "1" and a repeated number would pass otherwise.

    Candidates are found with float keys (fast) and confirmed with exact Fractions.
    """
    floats = [float(v) for v, *_ in numbers]
    by_key: dict[float, list[int]] = defaultdict(list)  # value rounded to 6 decimals -> indices
    by_decimals: dict[int, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
    for idx, (value, _, dec, _) in enumerate(numbers):
        by_key[round(floats[idx], 6)].append(idx)
        if 1 <= dec <= 3:
            by_decimals[dec][round(floats[idx], dec)].append(idx)

    def in_window(idx: int, used: tuple[int, int], lo: int, hi: int) -> bool:
        _, tok, _, occ = numbers[idx]
        return lo <= tok <= hi and occ not in used

    for p, (a, tok_a, _, occ_a) in enumerate(numbers):
        fa = floats[p]
        for q in range(p + 1, len(numbers)):
            b, tok_b, _, occ_b = numbers[q]
            if tok_b - tok_a >= window:
                break
            if occ_a == occ_b:
                continue
            fb = floats[q]
            used, lo, hi = (occ_a, occ_b), tok_b - window + 1, tok_a + window - 1
            ops = [(fa + fb, lambda: a + b), (abs(fa - fb), lambda: abs(a - b)),
                   (fa * fb, lambda: a * b)]
            quotients = []
            if a != b:
                if fb:
                    quotients.append((fa / fb, lambda: a / b))
                if fa:
                    quotients.append((fb / fa, lambda: b / a))
            for approx, exact in ops + quotients:
                for idx in by_key.get(round(approx, 6), ()):
                    if in_window(idx, used, lo, hi):
                        value = exact()
                        if value == numbers[idx][0] and value not in (0, a, b):
                            return True
            for approx, exact in quotients:  # a written quotient rounded to 1-3 decimals
                for dec, table in by_decimals.items():
                    scale = 10 ** dec
                    for key in {math.floor(approx * scale) / scale,
                                math.ceil(approx * scale) / scale}:
                        for idx in table.get(round(key, dec), ()):
                            c = numbers[idx][0]
                            if (in_window(idx, used, lo, hi) and c not in (0, a, b)
                                    and abs(exact() - c) <= Fraction(1, 2 * scale)):
                                return True
    return False


def calculator_prefilter(text: str, doc_id: str, window: int = 100,
                         random_fraction: float = 0.01) -> bool:
    """Appendix A.1: an arithmetic triple within `window` whitespace tokens, or a keyword followed
    by a number; plus a deterministic `random_fraction` of the documents that merely have >= 3
    numbers."""
    if _KEYWORD_RE.search(text):
        return True
    numbers = text_numbers(text)
    if len({occ for *_, occ in numbers}) < 3:
        return False
    if has_arithmetic_triple(numbers, window):
        return True
    return stable_fraction("Calculator", doc_id) < random_fraction
