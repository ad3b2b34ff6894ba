"""The text of an API call: e(c) = "[Tool(input)]", e(c, r) = "[Tool(input) -> r]", e(c, empty) =
"[Tool(input) ->]".

Markers are plain text by default (the paper's " [", "->", "]"), so the vocabulary is unchanged;
they may be any strings, including several tokens each. Everything here works on text, never on
token ids, so a tokenizer that merges " [" with its neighbours cannot break rendering or parsing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Markers:
    start: str = " ["
    result: str = " ->"
    end: str = "]"

    @classmethod
    def from_config(cls, cfg) -> "Markers":
        return cls(start=cfg.start, result=cfg.result, end=cfg.end)

    def __post_init__(self):
        for name in ("start", "result", "end"):
            if not getattr(self, name).strip():
                raise ValueError(f"marker {name!r} must contain a visible character")


@dataclass(frozen=True)
class ApiCall:
    tool: str
    input: str

    def text(self) -> str:
        """The call proper, without markers: `Tool(input)`."""
        return f"{self.tool}({self.input})"


def render(call: ApiCall, markers: Markers, result: str | None = None,
           with_result_marker: bool = False) -> str:
    """e(c) (no result), e(c, r) (result given) or e(c, empty) (result=None,
    with_result_marker=True)."""
    body = call.text()
    if result is not None:
        return f"{markers.start}{body}{markers.result} {result}{markers.end}"
    if with_result_marker:
        return f"{markers.start}{body}{markers.result}{markers.end}"
    return f"{markers.start}{body}{markers.end}"


def render_result_suffix(result: str | None, markers: Markers) -> str:
    """What decoding appends after the model wrote "...Tool(input) ->": " result]" (or "]" for no
    result)."""
    return f" {result}{markers.end}" if result else markers.end


_CALL_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\((.*)\)\s*$", re.DOTALL)


def parse_call_body(body: str, tool: str | None = None) -> ApiCall | None:
    """Parse `Tool(input)`; None when it is not of that form (or names another tool than `tool`)."""
    m = _CALL_RE.match(body)
    if not m:
        return None
    name = m.group(1)
    arg = m.group(2).strip()
    if tool is not None and name != tool:
        return None
    if any(ch in arg for ch in "\n\r"):
        return None
    return ApiCall(name, arg)


def parse_generated_call(generated: str, markers: Markers,
                         tool: str | None = None) -> ApiCall | None:
    """A sampled continuation after the start marker: the call text up to the end (or result)
    marker.

    Returns None for a call that never closes or does not parse: such calls are dropped.
    """
    cut = _first_marker(generated, (markers.end, markers.result))
    if cut is None:
        return None
    return parse_call_body(generated[:cut], tool)


def call_closed(generated: str, markers: Markers) -> bool:
    """Has the sampled continuation reached the end marker (or the result marker)?"""
    return _first_marker(generated, (markers.end, markers.result)) is not None


def _first_marker(text: str, marker_list: tuple[str, ...]) -> int | None:
    best = None
    for mk in marker_list:
        for candidate in {mk, mk.strip()}:
            idx = text.find(candidate)
            if idx >= 0 and (best is None or idx < best):
                best = idx
    return best


@dataclass(frozen=True)
class FoundCall:
    call: ApiCall
    result: str | None  # None when the call has no result part
    has_result_marker: bool
    start: int  # character span of the whole rendered call in the text
    end: int


def find_calls(text: str, markers: Markers, tools: set[str] | None = None) -> list[FoundCall]:
    """Every well-formed call in an augmented text, left to right (the inverse of inserting rendered
    calls)."""
    start_tok = markers.start.strip()
    res_tok = markers.result.strip()
    end_tok = markers.end.strip()
    found: list[FoundCall] = []
    pos = 0
    while True:
        s = text.find(start_tok, pos)
        if s < 0:
            return found
        e = text.find(end_tok, s + len(start_tok))
        if e < 0:
            return found
        inner = text[s + len(start_tok):e]
        r = inner.find(res_tok)
        body, result = (inner, None) if r < 0 else (inner[:r], inner[r + len(res_tok):].strip())
        call = parse_call_body(body, None)
        if call is not None and (tools is None or call.tool in tools):
            # Include the start marker's leading whitespace, so removing the span restores the text.
            lead = len(markers.start) - len(markers.start.lstrip())
            own_lead = lead and text[max(0, s - lead):s] == markers.start[:lead]
            span_start = s - lead if own_lead else s
            found.append(FoundCall(call, result, r >= 0, span_start, e + len(end_tok)))
            pos = e + len(end_tok)
        else:
            pos = s + len(start_tok)


def strip_calls(text: str, markers: Markers, tools: set[str] | None = None) -> str:
    """The augmented text with its calls removed: recovers the original when calls were inserted by
    merge."""
    out = []
    pos = 0
    for fc in find_calls(text, markers, tools):
        out.append(text[pos:fc.start])
        pos = fc.end
    out.append(text[pos:])
    return "".join(out)


def insert_calls(text: str, inserts: list[tuple[int, str]]) -> str:
    """Insert rendered calls at character positions of the ORIGINAL text (at most one per
    position)."""
    out = []
    pos = 0
    last = -1
    for char_pos, rendered in sorted(inserts):
        if not 0 <= char_pos <= len(text):
            raise ValueError(f"insert position {char_pos} outside the text (length {len(text)})")
        if char_pos == last:
            raise ValueError(f"two calls at character position {char_pos}")
        last = char_pos
        out.append(text[pos:char_pos])
        out.append(rendered)
        pos = char_pos
    out.append(text[pos:])
    return "".join(out)
