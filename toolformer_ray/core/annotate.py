"""The method for a batch of documents, in one process: sample -> (execute, outside) -> score ->
merge.

`Annotator` holds the model, the tokenizer and each tool's prompt (with its KV cache). The Ray job
calls `sample` and `score` from its LM actors and runs the tools in between on tool-worker pools;
the single-process entry point (`generate --no-ray`) calls the same methods with an in-process
executor.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from toolformer_ray.api_text import Markers
from toolformer_ray.core.filtering import ScoredCall, score_candidates
from toolformer_ray.core.lm import attention_plan, bos_ids, encode
from toolformer_ray.core.sampling import (Candidate, DecodeRow, TokenizedDoc, ToolPrompt,
                                          decode_calls,
                                          merge_passes, parse_sample, select_positions, start_pass,
                                          tokenize_doc)
from toolformer_ray.core.types import Document


@dataclass
class SampleResult:
    candidates: list[Candidate]
    funnel: dict[str, Counter]  # tool -> counters (schema.FUNNEL_KEYS)
    # tool -> p_i of every scored position
    p_api: dict[str, list[float]] = field(default_factory=dict)


class Annotator:
    def __init__(self, model, tokenizer, tools: dict, tool_configs: dict, markers: Markers, *,
                 seed: int = 0,
                 temperature: float = 1.0, top_p: float = 1.0, max_call_tokens: int = 40,
                 batch_docs: int = 8,
                 batch_rows: int = 128, prefix_separator: str = "\n", batch_tokens: int = 8192):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = tools
        self.tool_configs = tool_configs
        self.markers = markers
        self.seed = seed
        self.temperature = temperature
        self.top_p = top_p
        self.max_call_tokens = max_call_tokens
        self.batch_docs = batch_docs
        self.batch_rows = batch_rows
        self.prefix_separator = prefix_separator
        self.batch_tokens = batch_tokens
        # set to a list to record every forward's shape (benchmarks)
        self.work_log: list | None = None
        # fast path or plain forwards (or refused), self-checked once per loaded model
        # (lm.prepare_model)
        self.attention = attention_plan(model).to_dict()
        self.bos = bos_ids(tokenizer)
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id)
        self.eos_id = tokenizer.eos_token_id
        # Without BOS nothing predicts the first token, so L_0(empty) is undefined: position 0 is
        # skipped.
        self.min_pos = 0 if self.bos else 1
        self.marker_ids = encode(tokenizer, markers.start)
        if not self.marker_ids:
            raise ValueError(f"the start marker {markers.start!r} encodes to no tokens")
        self.prompts = {name: ToolPrompt.build(name, tool.prompt(), tokenizer, markers, self.bos)
                        for name, tool in tools.items()}

    @classmethod
    def from_config(cls, lm, tools: dict, cfg) -> "Annotator":
        return cls(lm.model, lm.tokenizer, tools, cfg.enabled_tools(),
                   Markers.from_config(cfg.markers),
                   seed=cfg.run.seed, temperature=cfg.sampling.temperature,
                   top_p=cfg.sampling.top_p,
                   max_call_tokens=cfg.sampling.max_call_tokens, batch_docs=cfg.sampling.batch_docs,
                   batch_rows=cfg.sampling.batch_rows,
                   prefix_separator=cfg.filtering.prefix_separator,
                   batch_tokens=cfg.filtering.batch_tokens)

    def tokenize(self, docs: list[Document]) -> dict[str, TokenizedDoc]:
        return {d.doc_id: tokenize_doc(self.tokenizer, d.text) for d in docs}

    # --------------------------------------------------------------------------------------- sample
    @torch.inference_mode()
    def sample(self, docs: list[Document]) -> SampleResult:
        tok_docs = self.tokenize(docs)
        candidates: list[Candidate] = []
        funnel: dict[str, Counter] = {}
        p_api: dict[str, list[float]] = {}
        for name, tool in self.tools.items():
            tc = self.tool_configs[name]
            counts = funnel.setdefault(name, Counter())
            counts["docs_seen"] += len(docs)
            chosen = [d for d in docs if len(tok_docs[d.doc_id].ids) > self.min_pos
                      and (not tc.prefilter or tool.prefilter(d))]
            counts["docs_prefiltered"] += len(chosen)
            # similar lengths in a pass waste little on padding; results do not depend on the
            # grouping
            chosen.sort(key=lambda d: -len(tok_docs[d.doc_id].ids))
            # Teacher-forced passes go batch_docs documents at a time; their sampled calls are
            # pooled until a decoding batch is full, so sparse positions (tau_s > 0) still decode in
            # large batches.
            pending: list = []
            rows_pending = 0
            for s in range(0, len(chosen), self.batch_docs):
                part = self._start(name, tc, chosen[s:s + self.batch_docs], tok_docs, counts,
                                   p_api.setdefault(name, []))
                if part is not None:
                    pending.append(part)
                    rows_pending += len(part[3]) * tc.m
                if pending and (rows_pending >= self.batch_rows or len(pending) >= 8):
                    candidates += self._decode(name, tool, tc, pending, counts)
                    pending = []
                    rows_pending = 0
            if pending:
                candidates += self._decode(name, tool, tc, pending, counts)
        return SampleResult(candidates=candidates, funnel=funnel, p_api=p_api)

    def _start(self, name, tc, batch: list[Document], tok_docs, counts, p_seen):
        """The p_i pass for a batch and the positions to sample at: (docs, tokenized docs, pass,
        [(b, i)])."""
        docs_t = [tok_docs[d.doc_id] for d in batch]
        sp = start_pass(self.model, self.tokenizer, self.prompts[name], docs_t,
                        [d.text for d in batch],
                        self.marker_ids[0], self.pad_id, log=self.work_log)
        if len(self.marker_ids) > 1:
            sp.probs = self._full_marker_probs(sp, docs_t)
        selected: list[tuple[int, int]] = []  # (row in batch, position)
        for b, d in enumerate(docs_t):
            usable = [sp.probs[b][i] for i in range(self.min_pos, len(d.ids))
                      if d.char_pos[i] is not None]
            p_seen += usable
            counts["positions_above_tau_s"] += sum(p > tc.tau_s for p in usable)
            selected += [(b, i)
                         for i in select_positions(sp.probs[b], d, tc.tau_s, tc.k, self.min_pos)]
        counts["positions_sampled"] += len(selected)
        return (batch, docs_t, sp, selected) if selected else None

    def _decode(self, name, tool, tc, parts: list, counts) -> list[Candidate]:
        """Sample m calls at every selected position of the pooled passes; parse and de-duplicate
        them."""
        sp = merge_passes([(p[2], sorted({b for b, _ in p[3]}))
                           for p in parts]) if len(parts) > 1 else parts[0][2]
        docs = []
        docs_t = []
        selected = []
        for batch, part_docs_t, part_sp, part_sel in parts:
            used = sorted({b for b, _ in part_sel}) if len(parts) > 1 else list(range(len(batch)))
            new_index = {b: len(docs) + k for k, b in enumerate(used)}
            docs += [batch[b] for b in used]
            docs_t += [part_docs_t[b] for b in used]
            selected += [(new_index[b], i) for b, i in part_sel]
        rows = [DecodeRow(doc=b, ctx_len=sp.ctx_at[b][i],
                          seed_key=f"{docs[b].doc_id}|{name}|{i}|{j}")
                for b, i in selected for j in range(tc.m)]
        counts["calls_sampled"] += len(rows)
        outs = []
        for s in range(0, len(rows), self.batch_rows):
            outs += decode_calls(self.model, self.tokenizer, sp, rows[s:s + self.batch_rows],
                                 self.marker_ids,
                                 self.markers, seed=self.seed, temperature=self.temperature,
                                 top_p=self.top_p,
                                 max_tokens=self.max_call_tokens, eos_id=self.eos_id,
                                 log=self.work_log)
        found: dict[tuple[int, int], dict[str, Candidate]] = {}
        for (b, i), out in zip([sel for sel in selected for _ in range(tc.m)], outs):
            call = parse_sample(out.text, self.markers, name, tool.takes_input)
            if call is None:
                continue
            counts["calls_well_formed"] += 1
            per_pos = found.setdefault((b, i), {})
            if call.input in per_pos:
                per_pos[call.input].n_samples += 1
            else:
                per_pos[call.input] = Candidate(doc_id=docs[b].doc_id, tool=name, token_pos=i,
                                                char_pos=docs_t[b].char_pos[i],
                                                p_api=sp.probs[b][i], call=call)
        result = [c for (b, i) in sorted(found) for c in found[(b, i)].values()]
        counts["calls_distinct"] += len(result)
        return result

    def _full_marker_probs(self, sp, docs_t) -> list[list[float]]:
        """p_i of a multi-token start marker: p(first token) times the later tokens' probabilities,
        from one batched prefill of the marker at every usable position (a cache slice each, nothing
        re-encoded)."""
        probs = [list(p) for p in sp.probs]
        where = [(b, i) for b, d in enumerate(docs_t) for i in range(len(d.ids))
                 if sp.ctx_at[b][i] is not None and d.char_pos[i] is not None]
        for s in range(0, len(where), self.batch_rows):
            chunk = where[s:s + self.batch_rows]
            rows = [DecodeRow(doc=b, ctx_len=sp.ctx_at[b][i], seed_key="") for b, i in chunk]
            outs = decode_calls(self.model, self.tokenizer, sp, rows, self.marker_ids, self.markers,
                                seed=0, temperature=0.0, top_p=1.0, max_tokens=0, eos_id=None,
                                sample=False,
                                log=self.work_log)
            for (b, i), out in zip(chunk, outs):
                probs[b][i] = sp.probs[b][i] * math.exp(out.marker_logprob)
        return probs

    # ---------------------------------------------------------------------------------------- score
    @torch.inference_mode()
    def score(self, docs: list[Document], candidates: list[Candidate]) -> list[ScoredCall]:
        """Losses of every candidate that has a result (`Candidate.result` filled by the execute
        stage)."""
        wanted = {c.doc_id for c in candidates}
        tok_docs = self.tokenize([d for d in docs if d.doc_id in wanted])
        tau_f = {name: tc.tau_f for name, tc in self.tool_configs.items()}
        return score_candidates(self.model, self.tokenizer, tok_docs, candidates, self.markers,
                                self.prefix_separator, tau_f, self.bos, self.pad_id,
                                self.batch_tokens,
                                log=self.work_log)
