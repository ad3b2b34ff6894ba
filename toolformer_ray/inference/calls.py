"""The calls in one output, tracked on its decoded text.

Markers are found on decoded text, never on single token ids (")]" is one token in SmolLM2). A row
is in one of four phases: TEXT, NAME (after the API-start marker, until "Name("), ARGS (the input,
until the result or end marker) and WAIT (its tool is running).
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from enum import Enum

import torch

from toolformer_ray.api_text import ApiCall, Markers, parse_call_body

# Call outcomes. A tool ran for: ok (a result), no_result (the tool returned None), error (it raised
# or timed out). No tool ran for: closed (the model wrote the end marker without asking for a
# result), malformed (unparsable call, a newline inside it, or no marker within max_call_tokens;
# closed with "]"), unclosed (the output ended inside the call).
RAN = ("ok", "no_result", "error")


class Phase(Enum):
    TEXT = "text"
    NAME = "name"
    ARGS = "args"
    WAIT = "wait"


class Scan(Enum):
    """What an open call's text asks for."""
    OPEN = "open"  # nothing yet: go on writing
    RESULT = "result"  # the result marker: run the tool
    END = "end"  # the end marker without a result: close, no tool
    MALFORMED = "malformed"  # a newline inside the call: close it with the end marker


@dataclass
class CallRecord:
    tool: str | None  # None when the call text does not parse
    input: str | None
    result: str | None
    status: str
    text: str = ""  # the call as it stands in the output, markers (and result) included


@dataclass
class Transcript:
    prompt: str
    text: str  # the continuation as decoded: calls and their results inline
    final_text: str  # the continuation without the calls, cut at a stop string: what metrics read
    calls: list[CallRecord]
    finish_reason: str  # eos | length | stop
    n_generated: int  # tokens chosen by the model (tool results excluded)
    token_ids: list[int] = field(default_factory=list)  # the continuation, tool results included

    @property
    def called(self) -> bool:
        """Did a tool run for this input (the paper's "share of inputs with an API call")?"""
        return any(c.status in RAN for c in self.calls)

    def describe(self) -> str:
        lines = [f"prompt: {self.prompt}"]
        for i, c in enumerate(self.calls, 1):
            if c.tool is None:  # not a well-formed call: show what the model wrote
                lines.append(f"  call {i}: {c.text.strip()!r}  [{c.status}]")
                continue
            shown = "(no result)" if c.result is None else c.result
            lines.append(f"  call {i}: {c.tool}({c.input}) -> {shown}  [{c.status}]")
        lines.append(f"output: {self.text}")
        if self.calls:
            lines.append(f"final:  {self.final_text}")
        return "\n".join(lines)


@dataclass
class OpenCall:
    """The call a row is writing, or waiting on."""
    start: int  # index of its start marker in the row's continuation tokens
    char: int  # its character offset in the decoded continuation
    phase: Phase = Phase.NAME
    call: ApiCall | None = None  # parsed, once its tool was asked for
    pending: object = None  # the executor's Pending of its tool batch
    slot: int = 0  # its index in that batch


@dataclass
class CallTracker:
    """One row's calls: the open one, and the closed ones with their character spans."""
    records: list[CallRecord] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # removed from the final text
    open: OpenCall | None = None
    started: int = 0

    @property
    def phase(self) -> Phase:
        return self.open.phase if self.open else Phase.TEXT

    def begin(self, start: int, char: int) -> None:
        self.open = OpenCall(start, char)
        self.started += 1

    def close(self, rec: CallRecord, end_char: int) -> None:
        self.spans.append((self.open.char, end_char))
        self.records.append(rec)
        self.open = None

    def final_text(self, text: str) -> str:
        """The continuation without its calls (an open call is not part of it either)."""
        spans = self.spans + ([(self.open.char, len(text))] if self.open else [])
        out, pos = [], 0
        for a, b in spans:
            out.append(text[pos:a])
            pos = b
        out.append(text[pos:])
        return "".join(out)

    def finish(self, text: str) -> list[CallRecord]:
        for rec, (a, b) in zip(self.records, self.spans):
            rec.text = text[a:b]
        return self.records


def call_body(text: str, markers: Markers) -> str:
    """An open call's text after its start marker (`text` is decoded from the marker on)."""
    mk = markers.start.strip()
    i = text.find(mk)
    return text[i + len(mk):] if i >= 0 else ""


def scan(body: str, markers: Markers) -> tuple[Scan, ApiCall | None, int]:
    """Read an open call's body. RESULT: the call (None if it does not parse) and the number of
    characters written past the result marker; END: the call and where its end marker ends."""
    res_mk = markers.result.strip()
    end_mk = markers.end.strip()
    i_res = body.find(res_mk)
    i_end = body.find(end_mk)
    if i_res >= 0 and (i_end < 0 or i_res < i_end):
        past = len(body) - i_res - len(res_mk)
        return Scan.RESULT, parse_call_body(body[:i_res].rstrip(), None), past
    if i_end >= 0:
        return Scan.END, parse_call_body(body[:i_end], None), i_end + len(end_mk)
    return (Scan.MALFORMED if "\n" in body else Scan.OPEN), None, 0


def stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts, looked for after the text's leading whitespace."""
    lead = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, lead) for s in stops) if i >= 0]
    return min(hits) if hits else None


# -- the tool-name constraint -------------------------------------------------------------------

def name_mask(body: str, targets: list[str], vocab: tuple[list[str], list[int]], size: int,
              device) -> torch.Tensor:
    """Additive mask that only lets the call text continue towards `Name(` of an allowed tool."""
    strs, ids = vocab
    allowed: set[int] = set()
    for target in targets:
        if not target.startswith(body):
            continue
        rest = target[len(body):]
        for j in range(1, len(rest) + 1):  # tokens that are a prefix of the rest ...
            lo = bisect.bisect_left(strs, rest[:j])
            while lo < len(strs) and strs[lo] == rest[:j]:
                allowed.add(ids[lo])
                lo += 1
        lo = bisect.bisect_left(strs, rest)
        hi = bisect.bisect_left(strs, rest + "\U0010ffff")
        allowed.update(ids[lo:hi])  # ... or that run past "(" into the input
    mask = torch.full((size,), float("-inf"), device=device)
    if allowed:
        mask[torch.tensor(sorted(a for a in allowed if a < size))] = 0.0
    else:  # cannot happen while the constraint was followed; leave the model free rather than stall
        mask.zero_()
    return mask


_VOCAB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sorted_vocab(tokenizer) -> tuple[list[str], list[int]]:
    """Every token's text, sorted, with the ids in the same order: prefix look-ups by bisection.
    ~0.5 s once per tokenizer."""
    try:
        return _VOCAB_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    order = sorted(range(n), key=lambda i: texts[i])
    result = ([texts[i] for i in order], order)
    try:
        _VOCAB_CACHE[tokenizer] = result
    except TypeError:  # not weak-referenceable: no cache
        pass
    return result
