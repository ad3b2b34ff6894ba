"""Tool-aware decoding (paper, section 4.2): generate text, and whenever the model writes a call and
the result marker ("[Calculator(400/1400) ->"), pause that row, run the tool, append " result]" and
go on.

- Many prompts decode at once over one KV cache (kv.py). Rows that finish leave the batch and
  waiting prompts take their place (continuous batching), so a long answer does not hold up the
  rest.
- A call starts whenever the API-start marker's first token is among the top `top_k_start` tokens
  (paper: k = 10), not only when it is the argmax; the rest of a multi-token marker is forced. Then
  the tool name is constrained to the allowed tools. calls.py follows each row's calls on its text.
- At the result marker the call goes to the tool executor (tools/executor.py, as in the data job:
  the same de-duplication, cache, batching and deadlines). Its suffix " r]" (or "]" for no result /
  an error) is then fed one token per step from the kept KV cache while the other rows go on
  decoding. With `async_tools` a row waiting on a slow tool feeds masked placeholder positions
  ("holes").

Modes: "tools" (the paper's rule), "disabled" (p(API-start) = 0: the start token is masked) and
"forced" (ablation: every output begins with a call to one of the allowed tools).

benchmarks/decoding.py overrides `_decode` and `_resume` for its re-encode baselines.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from toolformer_ray.api_text import Markers, render_result_suffix
from toolformer_ray.config import InferenceConfig, ToolConfig
from toolformer_ray.errors import UserError
from toolformer_ray.inference.calls import (CallRecord, CallTracker, Phase, Scan, Transcript,
                                            call_body, name_mask, scan, sorted_vocab, stop_at)
from toolformer_ray.inference.kv import KVBatch
from toolformer_ray.tools.base import Tool
from toolformer_ray.tools.executor import LocalToolExecutor, wait_any

MODES = ("tools", "disabled", "forced")


@dataclass
class Row:
    index: int  # position in the caller's list
    prompt_ids: list[int]
    date: str | None
    ids: list[int] = field(default_factory=list)  # every token after the prompt, chosen or forced
    n_fed: int = 0  # tokens in the KV cache (prompt included)
    forced: deque = field(default_factory=deque)  # tokens to feed before the model chooses again
    n_generated: int = 0  # tokens the model chose (tool results excluded)
    finish: str | None = None
    calls: CallTracker = field(default_factory=CallTracker)


@dataclass
class Session:
    """The settings of one `generate` call."""
    names: list[str]  # tools the model may call
    mode: str
    max_new: int
    stop: list[str]
    gen: torch.Generator  # sampling draws (temperature > 0)


class ToolDecoder:
    """Batched tool-aware decoding with a kept KV cache. `tools` maps names to built tools; their
    calls run under `tool_configs[name]` (timeout_s, batch_size: the data job's rules), by default a
    ToolConfig with timeout_s = cfg.tool_timeout_s."""

    def __init__(self, model, tokenizer, tools: dict[str, Tool], markers: Markers,
                 cfg: InferenceConfig, logits_processor=None, tool_configs: dict | None = None):
        # logits_processor(sequences, logits) -> logits: an optional hook that sees each row's token
        # sequence (prompt + continuation) and its next-token logits before the call rules apply.
        self.logits_processor = logits_processor
        self.model = model
        self.tok = tokenizer
        self.tools = dict(tools)
        self.markers = markers
        self.cfg = cfg
        default = ToolConfig(timeout_s=cfg.tool_timeout_s)
        self.tool_configs = {n: (tool_configs or {}).get(n, default) for n in self.tools}
        self.start_ids = self._encode(markers.start)
        if not self.start_ids:
            raise UserError(f"the API-start marker {markers.start!r} encodes to no tokens")
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
        self.eos_ids = {i for i in eos if i is not None}
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._executor: LocalToolExecutor | None = None

    def generate(self, prompts: list[str], mode: str = "tools",
                 allowed_tools: list[str] | None = None, dates: list[str | None] | None = None,
                 max_new_tokens: int | None = None, stop: list[str] | None = None,
                 seed: int = 0) -> list[Transcript]:
        """Continue each prompt; one transcript per prompt, in order. allowed_tools: default all of
        `self.tools`; dates: per-prompt ISO dates for tools that use one (Calendar); stop: strings
        that end an output (looked for in the text without calls, after its leading whitespace)."""
        if mode not in MODES:
            raise UserError(f"unknown decoding mode {mode!r}; choose one of {', '.join(MODES)}")
        names = sorted(self.tools if allowed_tools is None else allowed_tools)
        if unknown := [n for n in names if n not in self.tools]:
            raise UserError(f"tool(s) not available: {', '.join(unknown)}; available: "
                            f"{', '.join(sorted(self.tools)) or 'none'}")
        if mode == "forced" and not names:
            raise UserError("mode 'forced' needs at least one allowed tool")
        if dates is not None and len(dates) != len(prompts):
            raise ValueError("give one date per prompt")
        s = Session(names, mode, max_new_tokens or self.cfg.max_new_tokens,
                    [x for x in (self.cfg.stop if stop is None else stop) if x],
                    torch.Generator().manual_seed(seed))
        # An empty prompt starts from BOS if there is one, else from the pad token.
        bos = [self.tok.bos_token_id if self.tok.bos_token_id is not None else self.pad_id]
        rows = [Row(i, self._encode(p, special=True) or list(bos), dates[i] if dates else None)
                for i, p in enumerate(prompts)]
        with torch.inference_mode():
            self._decode(s, rows)
        return [self._transcript(s, prompts[r.index], r) for r in rows]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _decode(self, s: Session, rows: list[Row]) -> None:
        # Longest prompts first: prompts admitted together have similar lengths, so little padding.
        waiting = deque(sorted(rows, key=lambda r: -len(r.prompt_ids)))
        active: list[Row] = []
        batch = KVBatch(self.model, self.pad_id)
        logits = None
        refill_at = max(1, self.cfg.batch_size // 4)  # admit prompts once this many slots are free
        while waiting or active:
            free = self.cfg.batch_size - len(active)
            if waiting and (free >= refill_at or not active) and (not active or batch.can_merge):
                new = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                new_logits = batch.add([r.prompt_ids for r in new])
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
                for r in new:
                    r.n_fed = len(r.prompt_ids)
                active += new
            feed = self.choose(s, active, logits)
            keep = [i for i, r in enumerate(active) if r.finish is None]
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                feed = [feed[i] for i in keep]
                logits = logits[keep]
                if active:
                    batch.select(keep)
                else:
                    batch = KVBatch(self.model, self.pad_id)
                    logits = None
            if active and any(t is not None for t in feed):
                logits = batch.step(feed, [r.n_fed for r in active])
                for r, t in zip(active, feed):
                    r.n_fed += t is not None

    def choose(self, s: Session, active: list[Row], logits: torch.Tensor) -> list[int | None]:
        """Each row's next token (None: a hole while its tool runs); runs the tools asked for."""
        logits = logits.float()
        if self.logits_processor is not None:
            logits = self.logits_processor([r.prompt_ids + r.ids for r in active], logits)
        s0 = self.start_ids[0]
        can_start = torch.tensor([self._can_start(s, r) for r in active], device=logits.device)
        logits[~can_start, s0] = float("-inf")  # disabled mode, calls used up, or inside a call
        for i, r in enumerate(active):
            if r.calls.phase is Phase.NAME and not r.forced:
                body = call_body(self._text(r.ids[r.calls.open.start:]), self.markers)
                logits[i] += name_mask(body, [f"{n}(" for n in s.names], sorted_vocab(self.tok),
                                       self.vocab_size, logits.device)
        top_k = logits.topk(min(self.cfg.top_k_start, logits.shape[-1])).indices
        start_in_topk = (top_k == s0).any(-1)
        if self.cfg.temperature > 0:  # drawn on the CPU with the seeded generator, on any device
            probs = torch.softmax(logits / self.cfg.temperature, -1).cpu()
            picks = torch.multinomial(probs, 1, generator=s.gen).squeeze(-1).tolist()
        else:
            picks = logits.argmax(-1).tolist()
        feed: list[int | None] = []
        requests = []
        for i, r in enumerate(active):
            if r.calls.phase is Phase.WAIT:
                if not r.calls.open.pending.done():
                    feed.append(None)
                    continue
                self._collect(r)
            result_token = bool(r.forced) and r.calls.phase is Phase.TEXT  # not the model's choice
            if r.forced:
                r.ids.append(r.forced.popleft())
            elif can_start[i] and (start_in_topk[i] or (s.mode == "forced" and not r.n_generated)):
                r.ids.append(s0)
            else:
                r.ids.append(picks[i])
            call = None
            if not result_token:
                r.n_generated += 1
                call = self._advance(s, r, r.ids[-1])  # may replace the token (text past a marker)
            feed.append(r.ids[-1] if r.finish is None else None)
            if r.finish is None and r.n_generated >= s.max_new and not r.forced:
                self._end(r, "length")
            if call is not None and r.finish is None:
                requests.append((r, call))
        if requests:
            self._run_tools(s, requests)
        waiting = [r.calls.open.pending for r in active if r.calls.phase is Phase.WAIT]
        if waiting and len(waiting) == sum(r.finish is None for r in active):
            wait_any(waiting)  # nothing else to decode: block for a tool instead of feeding holes
        return feed

    def _can_start(self, s: Session, r: Row) -> bool:
        return (r.calls.phase is Phase.TEXT and r.calls.started < self.cfg.max_calls
                and bool(s.names) and s.mode != "disabled")

    def _advance(self, s: Session, r: Row, tok: int):
        """Follow a row's text after a token the model chose; returns a call to run (False: one that
        does not parse), else None."""
        calls = r.calls
        if calls.phase is Phase.TEXT:
            if tok == self.start_ids[0] and self._can_start(s, r):
                calls.begin(len(r.ids) - 1, len(self._text(r.ids[:-1])))
                r.forced.extend(self.start_ids[1:])
            elif tok in self.eos_ids:
                r.ids.pop()
                self._end(r, "eos")
            elif s.stop and stop_at(calls.final_text(self._text(r.ids)), s.stop) is not None:
                self._end(r, "stop")
            return None
        if r.forced:  # still inside a multi-token start marker
            return None
        if tok in self.eos_ids:
            r.ids.pop()
            self._end(r, "eos")
            return None
        text = self._text(r.ids[calls.open.start:])
        body = call_body(text, self.markers)
        if calls.phase is Phase.NAME:
            if "(" not in body:
                return None
            calls.open.phase = Phase.ARGS
        what, call, n = scan(body, self.markers)
        if what is Scan.RESULT:
            if n:  # the marker's token carried text past it: keep the text up to the marker
                self._cut_last_token(r, n)
            return call or False
        if what is Scan.END:
            rec = CallRecord(call and call.tool, call and call.input, None,
                             "closed" if call else "malformed")
            calls.close(rec, calls.open.char + len(text) - len(body) + n)
        elif what is Scan.MALFORMED or len(r.ids) - calls.open.start > self.cfg.max_call_tokens:
            r.forced.extend(self._encode(self.markers.end))
            self._close_after_forced(r, CallRecord(None, None, None, "malformed"))
        return None

    def _run_tools(self, s: Session, requests: list) -> None:
        """One executor submit per tool (batched, de-duplicated, tools in parallel threads)."""
        by_tool: dict[str, list] = {}
        for r, call in requests:
            if call and call.tool in s.names:
                by_tool.setdefault(call.tool, []).append((r, call))
            else:  # unparsable, or a tool that may not be called: an empty result "]"
                self._resume(r, call or None, None, "malformed")
        if by_tool and self._executor is None:
            self._executor = LocalToolExecutor(self.tool_configs, tools=self.tools,
                                               threads=self.cfg.tool_threads)
        for name, items in by_tool.items():
            inputs = [c.input for _, c in items]
            pending = self._executor.submit(name, inputs, [r.date for r, _ in items])
            for k, (r, call) in enumerate(items):
                r.calls.open.phase = Phase.WAIT
                r.calls.open.call = call
                r.calls.open.pending = pending
                r.calls.open.slot = k
        if not self.cfg.async_tools:
            for r, _ in requests:
                if r.calls.phase is Phase.WAIT:
                    self._collect(r)

    def _collect(self, r: Row) -> None:
        """A waiting row takes its tool's result (blocks until the executor resolved it)."""
        o = r.calls.open
        result = o.pending.get()[o.slot]
        ran = o.pending.outcomes()[o.slot] == "ok"  # else a timeout or a failure: an empty result
        status = "error" if not ran else "ok" if result is not None else "no_result"
        self._resume(r, o.call, result, status)

    def _resume(self, r: Row, call, result: str | None, status: str) -> None:
        r.forced.extend(self._encode(render_result_suffix(result, self.markers)))
        rec = CallRecord(call and call.tool, call and call.input, result, status)
        self._close_after_forced(r, rec)

    def _close_after_forced(self, r: Row, rec: CallRecord) -> None:
        # The call ends after the queued tokens: its span in characters is known now.
        r.calls.close(rec, len(self._text(r.ids + list(r.forced))))

    def _end(self, r: Row, reason: str) -> None:
        if r.calls.phase in (Phase.NAME, Phase.ARGS):
            r.calls.close(CallRecord(None, None, None, "unclosed"), len(self._text(r.ids)))
        r.finish = reason

    def _cut_last_token(self, r: Row, n_chars: int) -> None:
        # Replace the (not yet fed) last token by the tokens of its text minus the trailing n_chars.
        last = self._text(r.ids[-1:])
        head = self._encode(last[:-n_chars]) if len(last) > n_chars else []
        r.ids.pop()
        if head:
            r.ids.append(head[0])
            r.forced.extendleft(reversed(head[1:]))

    def _transcript(self, s: Session, prompt: str, r: Row) -> Transcript:
        text = self._text(r.ids)
        final = r.calls.final_text(text)
        cut = stop_at(final, s.stop) if s.stop else None
        return Transcript(prompt=prompt, text=text, final_text=final[:cut],
                          calls=r.calls.finish(text), finish_reason=r.finish or "length",
                          n_generated=r.n_generated, token_ids=list(r.ids))

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
