"""The tool interface: a name, a few-shot prompt, a pre-filter and a batched `run`.

A tool is stateless apart from read-only resources (an index, a model) loaded once per worker in
`__init__`. `run` never raises for bad input: it returns None ("no result") for that input.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from toolformer_ray.core.types import Document


class ToolOptions(BaseModel):
    """Tool-specific options (the `options:` mapping of a tool's config). Unknown keys are
    errors."""
    model_config = ConfigDict(extra="forbid")


class Tool:
    name: ClassVar[str]
    version: ClassVar[str] = "1"  # part of the result-cache key: bump when results change
    Options: ClassVar[type[ToolOptions]] = ToolOptions
    uses_date: ClassVar[bool] = False  # results depend on the document's date (Calendar)
    takes_input: ClassVar[bool] = True  # False: the call is `Tool()` (Calendar)

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = self.Options.model_validate(options or {})

    # -- data generation -------------------------------------------------------------------------
    def prompt(self) -> str:
        """The few-shot prompt P_tool: instructions and examples, with `{text}` where the document
        goes."""
        prompts = resources.files("toolformer_ray.prompts")
        return prompts.joinpath(f"{self.name.lower()}.txt").read_text()

    def prefilter(self, doc: Document) -> bool:
        """Appendix A.1 heuristics: is this document worth sampling calls for?"""
        return True

    # -- execution ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Load read-only resources (an index, a model) once per worker, before the first `run`.

        Raises a UserError when they cannot be loaded, so a misconfigured tool fails when its pool
        starts, not as a silent run of "no result". Tools load lazily too, so `prompt()` and
        `prefilter()` never pay for a model.
        """

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        """Results for a batch of call inputs; None = no result. `dates` are ISO dates for tools
        with uses_date."""
        raise NotImplementedError

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        """Why `run` gives no result for this input, in one line (None when it gives one). For
        people debugging a tool (`toolformer-ray tool`); `run` itself only ever says None."""
        if self.run([inp], [date])[0] is not None:
            return None
        return "the tool returned no result"


def stable_fraction(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings, for sampled pre-filters that must survive a
    resume."""
    h = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def unquote(text: str) -> str:
    """The call input without surrounding whitespace and one pair of matching quotes: the paper
    writes QA("Who is ...?") as well as QA(Who is ...?)."""
    text = text.strip()
    for left, right in (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text


def clean_result(result: str | None, max_chars: int = 1000) -> str | None:
    """A result as it may appear inside a call: one line, no brackets (the default end marker "]"
    inside a result would end the call early), bounded; empty -> None."""
    if result is None:
        return None
    text = " ".join(str(result).split()).replace("[", "(").replace("]", ")")
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
    return text or None
