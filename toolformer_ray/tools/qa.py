"""QA: retrieve passages with the WikiSearch index, then read them with a small causal LM and return
a short answer span.

The paper used Atlas (a retrieval-augmented seq2seq reader fine-tuned on Natural Questions). Atlas
is not to be had here (no hub, and an 11B reader would dwarf the model being taught); a
retrieve-then-read pipeline with the same BM25 index and a small instruction-tuned LM keeps Atlas's
shape (retrieve, then answer from the passages) with parts that run on a CPU worker. The reader is
prompted with two short worked examples so that it answers with a span, greedily, for a few tokens;
the answer is the first line, first clause of that, capped at a few words.
"""
from __future__ import annotations

import re

from pydantic import Field

from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, ToolOptions, clean_result, unquote
from toolformer_ray.tools.search_index import load_index

# Two worked examples teach the format "a few words, no sentence" to a small reader.
READER_PROMPT = """Answer each question with a few words taken from its context.

Context: The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the \
company of Gustave Eiffel and completed in 1889.
Question: When was the Eiffel Tower completed?
Answer: 1889

Context: Marie Curie was a Polish and naturalised-French physicist and chemist who conducted \
pioneering research on radioactivity.
Question: What did Marie Curie research?
Answer: radioactivity

Context: {context}
Question: {question}
Answer:"""

_LEAD_RE = re.compile(r"^(?:the answer is|answer)\s*[:\-]?\s*", re.IGNORECASE)
_CLAUSE_RE = re.compile(r"[.;!?](?:\s|$)|,\s|\s\(|\n")


def extract_answer(generated: str, max_words: int) -> str | None:
    """First line, first clause, at most `max_words` words, without a leading "Answer:"."""
    text = generated.strip()
    text = text.split("\n", 1)[0].strip()
    text = _LEAD_RE.sub("", text)
    m = _CLAUSE_RE.search(text)
    if m:
        text = text[:m.start()]
    words = text.split()[:max_words]
    text = " ".join(words).strip(" \"'`.,;:")
    return text or None


class QAOptions(ToolOptions):
    index: str = "runs/index/passages"  # the WikiSearch index (local or s3://)
    model: str = "default"  # reader: "default" | "tiny" | a model directory | s3://
    dtype: str = "float32"
    passages: int = Field(2, gt=0, le=10)  # retrieved passages given to the reader
    context_chars: int = Field(500, gt=20)  # per passage
    max_question_chars: int = Field(300, gt=0)
    max_new_tokens: int = Field(12, gt=0, le=64)
    max_answer_words: int = Field(8, gt=0)
    batch_size: int = Field(8, gt=0)  # reader batch (left-padded)
    cache_dir: str | None = None  # index download cache
    model_cache_dir: str | None = None  # model conversion cache (default .cache/models)
    # The reader's device: "auto" = the GPU this worker has (tools.QA.worker_gpus), else the CPU.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


@register
class QA(Tool):
    name = "QA"
    version = "1"
    Options = QAOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._index = None
        self._lm = None

    def load(self) -> None:
        from toolformer_ray.models import pick_device

        device = pick_device(self.options.device)  # a missing GPU fails before any download
        if self._index is None:
            self._index = load_index(self.options.index, self.options.cache_dir)
        if self._lm is None:
            from toolformer_ray.models import load_model

            opts = self.options
            self._lm = load_model(opts.model, opts.dtype, opts.model_cache_dir, device=device)

    def _question(self, inp) -> str | None:
        q = unquote(inp) if isinstance(inp, str) else ""
        return q if q and len(q) <= self.options.max_question_chars else None

    def reader_prompts(self, questions: list[str]) -> list[str | None]:
        """The reader's prompt for each question, with the retrieved passages as context (None when
        no passage matches: the small reader's closed-book guesses are not worth a result)."""
        self.load()
        hits = self._index.search(questions, k=self.options.passages)
        prompts: list[str | None] = []
        for q, row in zip(questions, hits):
            context = " ".join(" ".join(h.text.split())[:self.options.context_chars] for h in row)
            prompts.append(READER_PROMPT.format(context=context, question=q) if row else None)
        return prompts

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        tok, model = self._lm.tokenizer, self._lm.model
        out: list[str] = []
        for start in range(0, len(prompts), self.options.batch_size):
            batch = prompts[start:start + self.options.batch_size]
            ids = [tok.encode(p, add_special_tokens=False) for p in batch]
            if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
                ids = [[tok.bos_token_id] + x for x in ids]
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            # Left padding, so every row's next token is generated at the same position.
            dev = model.device
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=dev)
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids],
                                     device=dev)
            with torch.inference_mode():
                gen = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                     max_new_tokens=self.options.max_new_tokens, pad_token_id=pad)
            out.extend(tok.batch_decode(gen[:, width:], skip_special_tokens=True))
        return out

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        questions = [self._question(inp) for inp in inputs]
        valid = [i for i, q in enumerate(questions) if q is not None]
        results: list[str | None] = [None] * len(inputs)
        if not valid:
            return results
        prompts = self.reader_prompts([questions[i] for i in valid])
        answerable = [(i, p) for i, p in zip(valid, prompts) if p is not None]
        generated = self._generate([p for _, p in answerable]) if answerable else []
        for (i, _), text in zip(answerable, generated):
            results[i] = clean_result(extract_answer(text, self.options.max_answer_words))
        return results

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        q = unquote(inp) if isinstance(inp, str) else ""
        if not q:
            return "empty question"
        if len(q) > self.options.max_question_chars:
            return f"question longer than {self.options.max_question_chars} characters"
        if self.reader_prompts([q])[0] is None:
            return "no passage in the index matches any word of the question"
        if self.run([inp])[0] is None:
            return "the reader produced no answer span"
        return None
