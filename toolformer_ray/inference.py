"""Tool-aware decoding (paper, section 4.2): generate text, and whenever the model writes a call and the
result marker ("[Calculator(400/1400) ->"), pause that sequence, run the tool, append " result]" and go on.

How it works:
- Greedy (or sampled) decoding of many prompts at once over one KV cache (left-padded rows, explicit
  position ids). Rows that finish leave the batch and waiting prompts take their place (continuous
  batching), so a long answer does not hold up the rest.
- A call starts whenever the API-start marker's first token is among the top `top_k_start` tokens
  (paper: k = 10), not only when it is the argmax; the rest of a multi-token marker is forced. After the
  marker the tool name is constrained to the allowed tools, so a disallowed tool cannot be called.
- Markers are detected on decoded text, never on single token ids (")]" is one token in SmolLM2).
- When the result marker appears the tool runs (batched per tool, tools in parallel threads); its result
  suffix " r]" (or "]" for no result / an error) is then fed one token per step FROM THE KEPT KV CACHE,
  while the other rows keep decoding. With `async_tools` a row waiting on a slow tool feeds masked
  placeholder positions ("holes") until its result arrives instead of holding up the batch.
- Baselines for the benchmark: `resume="reencode"` encodes the row's whole sequence (prompt, text so far,
  result) again after its tool result, as a fresh prompt merged back into the batch (the other rows keep
  their cache); `resume="reencode_batch"` re-encodes every row of the batch, as a loop that stops `generate`
  at "->" and calls it again on the new texts does.

Modes: "tools" (the paper's rule), "disabled" (p(API-start) = 0: the start token is masked) and "forced"
(ablation: every output begins with a call; the model picks the tool among the allowed ones and writes
its input).
"""
from __future__ import annotations

import bisect
import concurrent.futures as cf
import datetime as _dt
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from toolformer_ray.api_text import Markers, parse_call_body, render_result_suffix
from toolformer_ray.errors import UserError
from toolformer_ray.tools.base import clean_result

if TYPE_CHECKING:
    from toolformer_ray.config import Config, InferenceConfig
    from toolformer_ray.tools.base import Tool

MODES = ("tools", "disabled", "forced")
RESUME = ("kv", "reencode", "reencode_batch")
# Call outcomes. A tool ran for: ok (a result), no_result (the tool returned None), error (it raised or
# timed out). No tool ran for: closed (the model wrote the end marker without asking for a result),
# malformed (unparsable call, a newline inside it, or no marker within max_call_tokens; closed with "]"),
# unclosed (the output ended inside the call).
RAN = ("ok", "no_result", "error")


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
    final_text: str  # the continuation with the calls removed (cut at a stop string): what metrics read
    calls: list[CallRecord]
    finish_reason: str  # eos | length | stop
    n_generated: int  # tokens chosen by the model (tool results excluded)
    token_ids: list[int] = field(default_factory=list)  # the continuation's tokens, tool results included

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
class _Row:
    index: int  # position in the caller's list
    prompt_ids: list[int]
    date: str | None
    gen_ids: list[int] = field(default_factory=list)  # every token after the prompt, generated or forced
    n_fed: int = 0  # tokens in the KV cache for this row (prompt included)
    forced: deque = field(default_factory=deque)  # tokens to feed before the model chooses again
    phase: str = "text"  # text | name | args | wait (async tool running)
    call_start: int = 0  # gen_ids index of the current call's start marker
    call_char: int = 0  # its character offset in the decoded continuation
    spans: list[tuple[int, int]] = field(default_factory=list)  # character spans of calls (removed in final_text)
    calls: list[CallRecord] = field(default_factory=list)
    n_calls: int = 0
    n_generated: int = 0
    finish: str | None = None
    future: object = None  # async tool future
    wait_since: float = 0.0  # when its tool was started (async timeout)
    reencode: bool = False  # baseline: re-encode this row's whole sequence before its next step
    pending: tuple | None = None  # (call, start char) of the call whose tool is running


class ToolDecoder:
    """Batched tool-aware decoding with a kept KV cache. `tools` maps tool names to built tools."""

    def __init__(self, model, tokenizer, tools: dict[str, "Tool"], markers: Markers, cfg: "InferenceConfig",
                 logits_processor=None):
        # logits_processor(sequences, logits) -> logits: an optional hook that sees each row's full token
        # sequence (prompt + continuation) and its next-token logits before the call rules apply.
        self.logits_processor = logits_processor
        self.model = model
        self.tok = tokenizer
        self.tools = dict(tools)
        self.markers = markers
        self.cfg = cfg
        self.start_ids = self._encode(markers.start)
        if not self.start_ids:
            raise UserError(f"the API-start marker {markers.start!r} encodes to no tokens")
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._vocab: tuple[list[str], list[int]] | None = None  # sorted token strings (name constraint)
        self._pool: cf.ThreadPoolExecutor | None = None

    # -- public API -------------------------------------------------------------------------------
    def generate(self, prompts: list[str], mode: str = "tools", allowed_tools: list[str] | None = None,
                 dates: list[str | None] | None = None, max_new_tokens: int | None = None,
                 stop: list[str] | None = None, resume: str | None = None,
                 seed: int = 0) -> list[Transcript]:
        """Continue each prompt; returns one transcript per prompt, in order.

        allowed_tools: the tools the model may call (default: all of `self.tools`); dates: per-prompt ISO
        dates for tools that use one (Calendar); stop: strings that end an output (looked for in the text
        without calls, after its leading whitespace); resume: "kv" (default from config) or "reencode".
        """
        if mode not in MODES:
            raise UserError(f"unknown decoding mode {mode!r}; choose one of {', '.join(MODES)}")
        names = sorted(self.tools if allowed_tools is None else allowed_tools)
        unknown = [n for n in names if n not in self.tools]
        if unknown:
            raise UserError(f"tool(s) not available: {', '.join(unknown)}; available: {', '.join(sorted(self.tools)) or 'none'}")
        if mode == "forced" and not names:
            raise UserError("mode 'forced' needs at least one allowed tool")
        if dates is not None and len(dates) != len(prompts):
            raise ValueError("give one date per prompt")
        resume = resume or self.cfg.resume
        if resume not in RESUME:
            raise UserError(f"unknown resume {resume!r}; choose one of {', '.join(RESUME)}")
        self._names = names
        self._targets = [f"{n}(" for n in names]
        self._mode = mode
        self._max_new = max_new_tokens or self.cfg.max_new_tokens
        self._stop = [s for s in (self.cfg.stop if stop is None else stop) if s]
        self._resume = resume
        self._gen = torch.Generator().manual_seed(seed)
        rows = [_Row(i, self._encode(p, special=True), dates[i] if dates else None) for i, p in enumerate(prompts)]
        for r in rows:
            if not r.prompt_ids:  # an empty prompt: start from BOS if there is one, else from EOS
                r.prompt_ids = [self.tok.bos_token_id if self.tok.bos_token_id is not None else self.pad_id]
        with torch.inference_mode():
            self._decode(rows)
        return [self._transcript(prompts[r.index], r) for r in rows]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- the loop ---------------------------------------------------------------------------------
    def _decode(self, rows: list[_Row]) -> None:
        # Longest prompts first: prompts admitted together have similar lengths, so little padding.
        waiting = deque(sorted(rows, key=lambda r: -len(r.prompt_ids)))
        active: list[_Row] = []
        batch = _KVBatch(self.model, self.pad_id)
        logits = None
        bs = self.cfg.batch_size
        refill_at = max(1, bs // 4)  # admit new prompts once this many slots are free (prefill in chunks)
        while waiting or active:
            free = bs - len(active)
            if waiting and (free >= refill_at or not active) and (not active or batch.can_merge):
                new = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                new_logits = batch.add([r.prompt_ids for r in new])
                for r in new:
                    r.n_fed = len(r.prompt_ids)
                active += new
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
            feed = self._choose(active, logits)
            # Rows that leave the batch: finished ones, and (baseline) rows to re-encode after a tool result.
            keep = [i for i, r in enumerate(active) if r.finish is None and not r.reencode]
            moved = [r for r in active if r.finish is None and r.reencode]
            if moved and (self._resume == "reencode_batch" or not batch.can_merge):  # re-encode every row
                keep, moved = [], [active[i] for i in keep] + moved
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                feed = [feed[i] for i in keep]
                logits = logits[keep]
                if active:
                    batch.select(keep)
                else:
                    batch, logits = _KVBatch(self.model, self.pad_id), None
            if active and any(t is not None for t in feed):
                logits = batch.step(feed, [r.n_fed for r in active])
                for r, t in zip(active, feed):
                    r.n_fed += t is not None
            if moved:  # the baseline: encode each such row's whole sequence again, as a fresh prompt
                new_logits = batch.add([r.prompt_ids + r.gen_ids for r in moved])
                for r in moved:
                    r.n_fed, r.reencode = len(r.prompt_ids) + len(r.gen_ids), False
                active += moved
                logits = new_logits if logits is None else torch.cat([logits, new_logits])

    def _choose(self, active: list[_Row], logits: torch.Tensor) -> list[int | None]:
        """Pick each row's next token (None = a hole while its tool runs); run the tools that were asked for."""
        logits = logits.float()
        if self.logits_processor is not None:
            logits = self.logits_processor([r.prompt_ids + r.gen_ids for r in active], logits)
        s0 = self.start_ids[0]
        can_start = torch.tensor([r.phase == "text" and r.n_calls < self.cfg.max_calls and bool(self._names)
                                  and self._mode != "disabled" for r in active],
                                 device=logits.device)
        logits[~can_start, s0] = float("-inf")  # disabled mode, calls used up, or inside a call
        for i, r in enumerate(active):
            if r.phase == "name" and not r.forced:
                logits[i] += self._name_mask(self._call_body(r), logits.device)
        start_in_topk = (logits.topk(min(self.cfg.top_k_start, logits.shape[-1])).indices == s0).any(-1)
        if self.cfg.temperature > 0:
            probs = torch.softmax(logits / self.cfg.temperature, -1)
            # on the CPU, with the seeded CPU generator: the same draws whatever device decodes
            picks = torch.multinomial(probs.cpu(), 1, generator=self._gen).squeeze(-1).tolist()
        else:
            picks = logits.argmax(-1).tolist()

        feed: list[int | None] = []
        tool_requests: list[tuple[_Row, object]] = []
        for i, r in enumerate(active):
            if r.phase == "wait":  # async: has the tool finished (or run out of time)?
                if not r.future.done() and time.monotonic() - r.wait_since < self.cfg.tool_timeout_s:
                    feed.append(None)
                    continue
                self._tool_done(r, *self._collect(r))
                if self._resume != "kv":
                    self._append_forced(r)
                    feed.append(None)
                    continue
            if r.forced:
                tok = r.forced.popleft()
                forced_kind = "result" if r.phase == "text" else "marker"
            else:
                forced_kind = None
                tok = picks[i]
                if can_start[i] and (start_in_topk[i] or (self._mode == "forced" and r.n_generated == 0)):
                    tok = s0
            r.gen_ids.append(tok)
            if forced_kind != "result":
                r.n_generated += 1
            if forced_kind is None or forced_kind == "marker":
                request = self._advance(r, tok)  # may replace the token (a marker with text after it)
                if request is not None:
                    tool_requests.append((r, request))
            feed.append(r.gen_ids[-1] if r.finish is None else None)
            if r.finish is None and r.n_generated >= self._max_new and not r.forced:
                self._end(r, "length")
        if tool_requests:
            self._start_tools(tool_requests)
            for r, _ in tool_requests:
                if r.phase != "wait" and self._resume != "kv":
                    self._append_forced(r)
        waiting = [r for r in active if r.phase == "wait"]
        if waiting and all(r.phase == "wait" or r.finish for r in active):
            # Nothing else to decode: block until a tool is done (or times out) instead of feeding holes.
            left = min(r.wait_since for r in waiting) + self.cfg.tool_timeout_s - time.monotonic()
            cf.wait([r.future for r in waiting], timeout=max(0.0, left), return_when=cf.FIRST_COMPLETED)
        return feed

    @staticmethod
    def _append_forced(r: _Row) -> None:
        # Baseline: the tool result goes straight into the sequence, which is then re-encoded whole.
        r.gen_ids += list(r.forced)
        r.forced.clear()
        r.reencode = True

    def _advance(self, r: _Row, tok: int):
        """Update a row's state after it took a model-chosen token; returns a call to run, if any."""
        if r.phase == "text":
            if tok == self.start_ids[0] and r.n_calls < self.cfg.max_calls and self._names and self._mode != "disabled":
                r.phase, r.call_start, r.n_calls = "name", len(r.gen_ids) - 1, r.n_calls + 1
                r.call_char = len(self._decode_ids(r.gen_ids[:-1]))
                r.forced.extend(self.start_ids[1:])
                return None
            if tok in self.eos_ids:
                r.gen_ids.pop()
                self._end(r, "eos")
            elif self._stop and self._stop_at(self._final(r)) is not None:
                self._end(r, "stop")
            return None
        if r.forced:  # still inside a multi-token start marker
            return None
        if tok in self.eos_ids:
            r.gen_ids.pop()
            self._close_call(r, CallRecord(None, None, None, "unclosed"), len(self._decode_ids(r.gen_ids)))
            self._end(r, "eos")
            return None
        body = self._call_body(r)
        if r.phase == "name":
            if "(" in body:
                r.phase = "args"
            else:
                return None
        res_mk, end_mk = self.markers.result.strip(), self.markers.end.strip()
        i_res, i_end = body.find(res_mk), body.find(end_mk)
        body_offset = r.call_char + len(self._decode_ids(r.gen_ids[r.call_start:])) - len(body)
        if i_res >= 0 and (i_end < 0 or i_res < i_end):
            trailing = body[i_res + len(res_mk):]
            if trailing:  # the marker token carried more text: keep only up to the marker
                self._cut_last_token(r, len(trailing))
            return parse_call_body(body[:i_res].rstrip(), None) or False
        if i_end >= 0:
            call = parse_call_body(body[:i_end], None)
            rec = CallRecord(call.tool if call else None, call.input if call else None, None,
                             "closed" if call else "malformed")
            self._close_call(r, rec, body_offset + i_end + len(end_mk))
            return None
        if "\n" in body or len(r.gen_ids) - r.call_start > self.cfg.max_call_tokens:
            r.forced.extend(self._encode(self.markers.end))
            self._pending_close(r, CallRecord(None, None, None, "malformed"))
        return None

    # -- tools ------------------------------------------------------------------------------------
    def _start_tools(self, requests: list[tuple[_Row, object]]) -> None:
        """Run the requested calls: one batched `run` per tool, tools in parallel threads."""
        by_tool: dict[str, list[tuple[_Row, object]]] = {}
        for r, call in requests:
            if not call or call.tool not in self._names:  # unparsable call: empty result "]"
                r.pending = (call or None,)
                r.future = None
                self._tool_done(r, None, "malformed")
                continue
            by_tool.setdefault(call.tool, []).append((r, call))
        if not by_tool:
            return
        pool = self._executor()
        for name, items in by_tool.items():
            tool = self.tools[name]
            inputs = [c.input for _, c in items]
            dates = [r.date for r, _ in items]
            fut = pool.submit(_run_tool, tool, inputs, dates)
            for k, (r, call) in enumerate(items):
                r.pending = (call, k)
                r.future = fut
                r.phase = "wait"
                r.wait_since = time.monotonic()
        if self.cfg.async_tools:
            return
        futures = {r.future for r, _ in requests if r.phase == "wait"}
        cf.wait(futures, timeout=self.cfg.tool_timeout_s)
        for r, _ in requests:
            if r.phase == "wait":
                self._tool_done(r, *self._collect(r))

    def _collect(self, r: _Row) -> tuple[str | None, str]:
        call, k = r.pending
        fut = r.future
        if not fut.done():
            return None, "error"  # timed out: the thread is left to finish on its own
        try:
            results = fut.result()
            result = results[k]
        except Exception:  # a tool must not crash decoding: an error is an empty result
            return None, "error"
        # One line, no brackets, bounded: as results appear in the training data (an "]" would end the call).
        result = clean_result(result)
        if result is None:
            return None, "no_result"
        return result, "ok"

    def _tool_done(self, r: _Row, result: str | None, status: str) -> None:
        call = r.pending[0]
        r.pending, r.future = None, None
        r.phase = "text"
        r.forced.extend(self._encode(render_result_suffix(result, self.markers)))
        self._pending_close(r, CallRecord(call.tool if call else None, call.input if call else None,
                                          result, status))

    def _pending_close(self, r: _Row, rec: CallRecord) -> None:
        # The call ends after the queued tokens: its span in characters is known now.
        end_char = len(self._decode_ids(r.gen_ids + list(r.forced)))
        self._close_call(r, rec, end_char)

    def _close_call(self, r: _Row, rec: CallRecord, end_char: int) -> None:
        r.phase = "text"
        r.spans.append((r.call_char, end_char))
        r.calls.append(rec)

    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.cfg.tool_threads, thread_name_prefix="tool")
        return self._pool

    # -- text helpers -----------------------------------------------------------------------------
    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _call_body(self, r: _Row) -> str:
        """The call text after the start marker, as decoded so far."""
        text = self._decode_ids(r.gen_ids[r.call_start:])
        mk = self.markers.start.strip()
        i = text.find(mk)
        return text[i + len(mk):] if i >= 0 else ""

    def _cut_last_token(self, r: _Row, n_chars: int) -> None:
        # Replace the (not yet fed) last token by the tokens of its text minus the trailing n_chars.
        last = self._decode_ids(r.gen_ids[-1:])
        head = self._encode(last[:-n_chars]) if len(last) > n_chars else []
        r.gen_ids.pop()
        if head:
            r.gen_ids.append(head[0])
            r.forced.extendleft(reversed(head[1:]))

    def _final(self, r: _Row) -> str:
        text = self._decode_ids(r.gen_ids)
        spans = list(r.spans)
        if r.phase != "text":  # an open call is not part of the final text
            spans.append((r.call_char, len(text)))
        out, pos = [], 0
        for a, b in spans:
            out.append(text[pos:a])
            pos = b
        out.append(text[pos:])
        return "".join(out)

    def _stop_at(self, text: str) -> int | None:
        lead = len(text) - len(text.lstrip())
        hits = [i for i in (text.find(s, lead) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _end(self, r: _Row, reason: str) -> None:
        if r.phase in ("name", "args"):
            self._close_call(r, CallRecord(None, None, None, "unclosed"), len(self._decode_ids(r.gen_ids)))
        r.finish = reason

    def _name_mask(self, body: str, device) -> torch.Tensor:
        """Additive mask that only lets the call text continue towards `Name(` of an allowed tool."""
        strs, ids = self._sorted_vocab()
        allowed: set[int] = set()
        for target in self._targets:
            if not target.startswith(body):
                continue
            rest = target[len(body):]
            for j in range(1, len(rest) + 1):  # tokens that are a prefix of the rest ...
                lo = bisect.bisect_left(strs, rest[:j])
                while lo < len(strs) and strs[lo] == rest[:j]:
                    allowed.add(ids[lo])
                    lo += 1
            lo, hi = bisect.bisect_left(strs, rest), bisect.bisect_left(strs, rest + "\U0010ffff")
            allowed.update(ids[lo:hi])  # ... or that run past "(" into the input
        mask = torch.full((self.vocab_size,), float("-inf"), device=device)
        if allowed:
            mask[torch.tensor(sorted(a for a in allowed if a < self.vocab_size))] = 0.0
        else:  # cannot happen while the constraint was followed; leave the model free rather than stall
            mask.zero_()
        return mask

    def _sorted_vocab(self) -> tuple[list[str], list[int]]:
        if self._vocab is None:
            self._vocab = _sorted_vocab(self.tok)
        return self._vocab

    def _transcript(self, prompt: str, r: _Row) -> Transcript:
        text = self._decode_ids(r.gen_ids)
        for rec, (a, b) in zip(r.calls, r.spans):
            rec.text = text[a:b]
        final = self._final(r)
        cut = self._stop_at(final) if self._stop else None
        if cut is not None:
            final = final[:cut]
        return Transcript(prompt=prompt, text=text, final_text=final, calls=r.calls,
                          finish_reason=r.finish or "length", n_generated=r.n_generated,
                          token_ids=list(r.gen_ids))


_VOCAB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sorted_vocab(tokenizer) -> tuple[list[str], list[int]]:
    """Every token's text, sorted (with the ids in the same order): prefix look-ups by bisection. ~0.5 s once."""
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


def _run_tool(tool: "Tool", inputs: list[str], dates: list[str | None]) -> list[str | None]:
    results = tool.run(inputs, dates)
    if len(results) != len(inputs):
        raise RuntimeError(f"{tool.name}.run returned {len(results)} results for {len(inputs)} inputs")
    return results


class _KVBatch:
    """The KV cache of the rows decoding together and their 2-D attention mask (0 = padding or a hole).

    Rows are left-padded; position ids are passed explicitly (count of real tokens), so padding and holes
    are invisible to the model: the result equals decoding each row alone, up to float rounding.
    """

    def __init__(self, model, pad_id: int):
        from transformers import DynamicCache

        self.model = model
        self.pad_id = pad_id
        self.cache = DynamicCache(config=model.config)
        self.mask: torch.Tensor | None = None  # [rows, cache length]

    @property
    def can_merge(self) -> bool:
        # Merging rows into a live cache needs plain full-attention layers (true for Llama-family models).
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def add(self, seqs: list[list[int]]) -> torch.Tensor:
        """Prefill new rows (appended after the current ones); returns their next-token logits."""
        from transformers import DynamicCache

        width = max(len(s) for s in seqs)
        dev = self.model.device
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        if self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            self._merge(cache, mask)
        return out.logits[:, -1].float()

    def _merge(self, cache, mask: torch.Tensor) -> None:
        from transformers import DynamicCache

        a, b = self.mask.shape[1], mask.shape[1]
        width = max(a, b)
        pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x  # noqa: E731  left-pad dim -2
        layers = []
        for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, cache):
            layers.append((torch.cat([pad(k1, width - a), pad(k2, width - b)]),
                           torch.cat([pad(v1, width - a), pad(v2, width - b)])))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - a, 0)),
                               torch.nn.functional.pad(mask, (width - b, 0))])

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        # Drop leading columns that no remaining row uses (they were padding of rows that left).
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0 and self.can_merge:
            from transformers import DynamicCache

            self.cache = DynamicCache(ddp_cache_data=[(k[:, :, first:], v[:, :, first:]) for k, v, *_ in self.cache])
            self.mask = self.mask[:, first:]

    def step(self, tokens: list[int | None], positions: list[int]) -> torch.Tensor:
        """Feed one token per row (None = a masked hole); returns next-token logits."""
        dev = self.model.device
        ids = torch.tensor([[self.pad_id if t is None else t] for t in tokens], device=dev)
        col = torch.tensor([[0 if t is None else 1] for t in tokens], device=dev)
        self.mask = torch.cat([self.mask, col], dim=1)
        pos = torch.tensor([[p] for p in positions], device=dev)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True)
        return out.logits[:, -1].float()


# -- entry points ----------------------------------------------------------------------------------
def load_tools(cfg: "Config", names: list[str] | None = None, strict: bool = True) -> tuple[dict[str, "Tool"], dict[str, str]]:
    """Build the named tools (default: the config's enabled tools) in-process.

    Returns (tools, failed): with strict=False a tool that cannot be built (missing index or weights) is
    left out and its error recorded instead of stopping the run.
    """
    from toolformer_ray.tools import build_tool

    names = list(cfg.enabled_tools()) if names is None else names
    tools, failed = {}, {}
    for name in names:
        options = cfg.tools[name].options if name in cfg.tools else {}
        try:
            tool = build_tool(name, options)
            tool.load()  # an index or model that cannot be loaded fails here, not as silent "no result"
            tools[name] = tool
        except KeyError as e:
            if strict:
                raise UserError(str(e.args[0])) from None
            failed[name] = str(e.args[0])
        except Exception as e:  # noqa: BLE001 - reported to the user, not swallowed
            if strict:
                raise UserError(f"tool {name} could not be built: {e}") from None
            failed[name] = f"{type(e).__name__}: {e}"
    return tools, failed


def set_torch_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def decoder_from_config(cfg: "Config", lm=None, tools: dict[str, "Tool"] | None = None) -> ToolDecoder:
    from toolformer_ray.models import load_from_config

    from toolformer_ray.models import pick_device

    lm = lm or load_from_config(cfg.model, device=pick_device(cfg.inference.device))
    return ToolDecoder(lm.model, lm.tokenizer, tools or {}, Markers.from_config(cfg.markers), cfg.inference)


def run_infer(cfg: "Config", prompts: list[str], mode: str = "tools", tools: list[str] | None = None,
              date: str | None = None) -> list[Transcript]:
    """`toolformer-ray infer`: decode the prompts with the configured model and tools."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not prompts:
        raise UserError("no prompts given")
    if date is not None:
        try:
            _dt.date.fromisoformat(date)
        except ValueError:
            raise UserError(f"--date must be an ISO date (yyyy-mm-dd), got {date!r}") from None
    date = date or _dt.date.today().isoformat()
    set_torch_threads(cfg.inference.torch_threads)
    built = {}
    if mode != "disabled":
        # Tools asked for by name must load; of the config's tools, those that cannot (no index, no weights)
        # are left out with a warning.
        built, failed = load_tools(cfg, tools, strict=tools is not None)
        for name, why in failed.items():
            print(f"warning: tool {name} unavailable ({why})", file=sys.stderr)
    decoder = decoder_from_config(cfg, tools=built)
    try:
        return decoder.generate(prompts, mode=mode, allowed_tools=list(built), dates=[date] * len(prompts),
                                seed=cfg.run.seed)
    finally:
        decoder.close()
