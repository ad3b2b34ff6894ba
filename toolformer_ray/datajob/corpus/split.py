"""Splitting a record's text into documents of at most `max_doc_tokens` tokens, at sentence
boundaries where possible, at token boundaries inside a longer sentence."""
from __future__ import annotations

import bisect
import re

# Gaps between sentences: whitespace after . ! ? … (optionally closed by a quote or bracket), after
# a CJK full stop, or at a line break. Gaps are whitespace only, so no visible text is lost at a
# cut. (Not "\s*\n": tried at every position of a long run of spaces, that is quadratic; the
# whitespace before a line break is stripped from the span instead.)
_SENTENCE_GAP = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|(?<=[。！？])\s*|\n\s*")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, prev = [], 0
    for m in _SENTENCE_GAP.finditer(text):
        spans.append((prev, m.start()))
        prev = m.end()
    spans.append((prev, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _strip_span(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def split_text(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Cut `text` into pieces of at most `max_tokens` tokens (counted without special tokens): whole
    sentences packed greedily, a sentence longer than the limit cut at token boundaries. Pieces are
    stripped of outer whitespace; only whitespace is lost at the cuts. Every piece is counted
    exactly (estimates from the whole text's token offsets only choose where to cut)."""
    text = text.strip()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return [text] if text else []
    starts = [s for s, _ in enc["offset_mapping"]]

    def estimate(a: int, b: int) -> int:  # tokens of the whole text that start inside [a, b)
        return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

    spans = _sentence_spans(text)
    pieces: list[str] = []
    i = 0
    while i < len(spans):
        j = i
        while j + 1 < len(spans) and estimate(spans[i][0], spans[j + 1][1]) <= max_tokens:
            j += 1
        while True:
            a, b = spans[i][0], spans[j][1]
            if _n_tokens(tokenizer, text[a:b]) <= max_tokens:
                pieces.append(text[a:b])
                break
            if j > i:
                j -= 1
                continue
            pieces.extend(_split_tokens(text, a, b, starts, tokenizer, max_tokens))
            break
        i = j + 1
    return pieces


def _split_tokens(text: str, a: int, b: int, starts: list[int], tokenizer,
                  max_tokens: int) -> list[str]:
    """Cut text[a:b] (one over-long sentence) at token starts into pieces of at most max_tokens
    tokens."""
    # Distinct token start positions inside the span: a character split into several byte tokens has
    # one start, and a cut can only fall between characters.
    inside = starts[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)]
    cuts = sorted({s for s in inside if s > a})
    pieces: list[str] = []
    pos = a
    while pos < b:
        k = bisect.bisect_right(cuts, pos)  # first cut after pos
        # The most cuts whose span holds at most max_tokens of the whole text's tokens: a character
        # of several byte tokens is one cut, so counting cuts alone would overshoot and shrink one
        # at a time (re-encoding the piece each time: ~max_tokens encodes per character for CJK).
        lo = bisect.bisect_left(starts, pos)
        if lo + max_tokens < len(starts):
            n = max(1, bisect.bisect_right(cuts, starts[lo + max_tokens]) - k)
        else:
            n = max(1, len(cuts) - k + 1)
        while True:
            end = cuts[k + n - 1] if k + n - 1 < len(cuts) else b
            pa_, pb_ = _strip_span(text, pos, end)
            excess = _n_tokens(tokenizer, text[pa_:pb_]) - max_tokens if pa_ < pb_ else 0
            if excess <= 0 or n == 1:
                break
            # each cut holds at least one token: drop the excess at once
            n = max(1, min(n - 1, n - excess))
        if pa_ < pb_:
            pieces.append(text[pa_:pb_])
        pos = end
    return pieces
