"""Sampling API calls (paper, section 2, "Sampling API Calls").

For a tool with few-shot prompt P and a document x = x_1..x_n:
  1. one teacher-forced pass over [P(x), x] gives p_i = p(API-start | P(x), x_<i) at every position
     i of the ORIGINAL document tokens;
  2. keep I = {i : p_i > tau_s}, the top k of them;
  3. at each i in I sample up to m calls from [P(x), x_<i, API-start], stopping at the end marker;
     calls that never close or do not parse are dropped, duplicates merged.

P(x) is "<instructions and examples>Input: x\nOutput: ", and x is copied after it exactly as the
examples write their outputs ("Output: " with its space, then x): the copy is tokenized as " x" in
one piece, and p_i is read at the copy's token boundaries that coincide with x's own (the first
word's token differs, " The" vs "The"; the boundaries after it coincide). The part before the
document is the same for every document, so its KV cache is computed once per tool and reused; and
the context of a call at position i is a prefix of step 1's sequence, so sampling starts from step
1's KV cache, sliced at i (nothing is re-encoded).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from toolformer_ray.api_text import (ApiCall, Markers, call_closed, find_calls,
                                     parse_generated_call, render)
from toolformer_ray.core.lm import (DocContext, PlainContext, RowKV, cache_layers, encode,
                                    hidden_states, logits_from_hidden, pad_batch, plain_hidden,
                                    plain_path, prefix_forward)

LOGIT_CHUNK = 1024  # rows of float32 logits materialised at once (x vocab size)


# ---------------------------------------------------------------------------------------- documents
@dataclass
class TokenizedDoc:
    ids: list[int]  # the document's own tokens (encoded alone, no special tokens)
    # where a call inserted before token i goes; None: inside a word or character
    char_pos: list[int | None]
    # each token's character span in the text
    offsets: list[tuple[int, int]] = field(default_factory=list)


def tokenize_doc(tokenizer, text: str) -> TokenizedDoc:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = enc["offset_mapping"]
    char_pos: list[int | None] = []
    for i in range(len(ids)):
        if i == 0:
            char_pos.append(0)
            continue
        prev_end = offsets[i - 1][1]
        start = offsets[i][0]
        # A call goes right after the previous token, before any whitespace that belongs to token i
        # (" Paris" -> "of [Call()] Paris"). Overlapping offsets mean a character split across
        # tokens. Calls go between words only: tokenizers that split numbers into digits (SmolLM2
        # writes " 323" as " ","3","2","3") would otherwise put a call inside a number, or after a
        # lone space token, where the call's own leading space would double it.
        ok = (prev_end <= start and text[prev_end:start].strip() == ""
              and not text[prev_end - 1:prev_end].isspace())
        if ok and prev_end == start and start < len(text):
            ok = not (text[start - 1].isalnum() and text[start].isalnum())
        char_pos.append(prev_end if ok else None)
    return TokenizedDoc(ids=ids, char_pos=char_pos, offsets=[tuple(o) for o in offsets])


# ------------------------------------------------------------------------------------------ prompts
def split_prompt(prompt: str, markers: Markers) -> tuple[str, str]:
    """(text before the document, text between the document's input copy and its output copy).

    Prompt files write example calls with the default markers; they are re-rendered with the
    configured ones.
    """
    default = Markers()
    if markers != default:
        out = []
        pos = 0
        for fc in find_calls(prompt, default):
            out.append(prompt[pos:fc.start])
            out.append(render(fc.call, markers, fc.result, fc.has_result_marker))
            pos = fc.end
        prompt = "".join(out) + prompt[pos:]
    if prompt.count("{text}") != 1:
        raise ValueError("a tool prompt must contain {text} exactly once")
    before, after = prompt.split("{text}")
    return before, after


@dataclass
class ToolPrompt:
    """A tool's few-shot prompt, tokenized, with the KV cache of the part shared by all
    documents."""
    tool: str
    prefix_ids: list[int]  # [BOS] + instructions and examples, up to "Input:"
    input_lead: str  # " ": the spaces the prompt writes before the input copy ("Input: ")
    suffix_text: str  # "\nOutput:" (between the input copy and the output copy)
    output_lead: str  # " ": the spaces the prompt writes before the output copy ("Output: ")
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [kv_heads, P, head_dim]

    @classmethod
    def build(cls, tool: str, prompt: str, tokenizer, markers: Markers,
              bos: list[int]) -> "ToolPrompt":
        before, after = split_prompt(prompt, markers)
        # Trailing spaces move to the next piece, so "Input: The" tokenizes as it does in running
        # text (" The" is one token); they are kept, so the model reads exactly the examples'
        # format.
        head = before.rstrip(" ")
        tail = after.rstrip(" ")
        return cls(tool=tool, prefix_ids=bos + encode(tokenizer, head),
                   input_lead=before[len(head):],
                   suffix_text=tail, output_lead=after[len(tail):])

    def input_ids(self, tokenizer, text: str) -> list[int]:
        """The per-document tokens between the shared prefix and the document's output copy."""
        return encode(tokenizer, self.input_lead + text + self.suffix_text)

    def output_copy(self, tokenizer, doc: "TokenizedDoc",
                    text: str) -> tuple[list[int], list[int | None]]:
        """The output copy's tokens (output_lead + x, encoded in one piece) and, for each position i
        of x's own tokens, how many copy tokens precede it: the copy's boundary at the same
        character as x's boundary before token i. None where the copy has no boundary there (its
        token spans it); such a position is never sampled (p_i = 0)."""
        lead = len(self.output_lead)
        enc = tokenizer(self.output_lead + text, add_special_tokens=False,
                        return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = [(a - lead, b - lead) for a, b in enc["offset_mapping"]]
        at = {(offsets[j - 1][1], offsets[j][0]): j for j in range(1, len(ids))}
        return ids, [0 if i == 0 else at.get((doc.offsets[i - 1][1], doc.offsets[i][0]))
                     for i in range(len(doc.ids))]

    @torch.inference_mode()
    def ensure_kv(self, model) -> None:
        if self.kv is None:
            _, cache = hidden_states(model, torch.tensor([self.prefix_ids]), use_cache=True)
            self.kv = [(k[0].clone(), v[0].clone()) for k, v in cache_layers(cache)]


# --------------------------------------------------------------------------------- step 1: p_i pass
@dataclass
class StartPass:
    """Output of the teacher-forced pass for a batch of documents."""
    probs: list[list[float]]  # p_i (first marker token) for each document position
    # per layer [B, kv_heads, L, head_dim]: the rows' own part
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    # row tokens before position i (input copy + output copy up to i)
    ctx_at: list[list[int | None]]
    prefix_len: int  # P: the shared prompt's length (row token t sits at absolute position P + t)
    # the shared prompt's KV, [kv_heads, P, head_dim]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    tokens: list[list[int]] | None = None  # plain path only (kv is None): prompt + row tokens


@torch.inference_mode()
def start_pass(model, tokenizer, prompt: ToolPrompt, docs: list[TokenizedDoc], texts: list[str],
               start_id: int, pad_id: int, log: list | None = None) -> StartPass:
    """One teacher-forced pass over [prompt, input copy, output copy] for a batch; `log` records the
    work (for the benchmark's naive baseline)."""
    P = len(prompt.prefix_ids)
    inputs = [prompt.input_ids(tokenizer, t) for t in texts]
    copies = [prompt.output_copy(tokenizer, d, t) for d, t in zip(docs, texts)]
    rows = [inp + ids for inp, (ids, _) in zip(inputs, copies)]
    ctx_at = [[None if j is None else len(inp) + j for j in at]
              for inp, (_, at) in zip(inputs, copies)]
    # right padding: causal attention keeps it out of real tokens' way
    ids = pad_batch(rows, pad_id)
    B, L = ids.shape
    if log is not None:
        log.append(("start", [len(r) for r in rows], P))
    if plain_path(model):  # a family the shared-prefix attention cannot serve (lm.prepare_model)
        hidden = plain_hidden(model, [prompt.prefix_ids + r for r in rows])[:, P:]
        kv = None
    else:
        prompt.ensure_kv(model)
        cache = RowKV.empty(model, B, L)
        hidden = prefix_forward(model, ids, cache, prompt.kv, (P + torch.arange(L)).expand(B, L))
        kv = cache.layers()
    # The hidden state at row index ctx - 1 predicts what follows the context: p_i = its prob of
    # API-start.
    row_idx = []
    pos_idx = []
    where = []
    for b, at in enumerate(ctx_at):
        for i, ctx in enumerate(at):
            if ctx is not None:
                row_idx.append(b)
                pos_idx.append(ctx - 1)
                where.append((b, i))
    flat = hidden[torch.tensor(row_idx, dtype=torch.long, device=hidden.device),
                  torch.tensor(pos_idx, dtype=torch.long, device=hidden.device)]
    p_flat = torch.cat([torch.softmax(logits_from_hidden(model, flat[s:s + LOGIT_CHUNK]),
                                      -1)[:, start_id]
                        for s in range(0, len(flat), LOGIT_CHUNK)]) if len(flat) else torch.zeros(0)
    probs = [[0.0] * len(d.ids) for d in docs]
    for (b, i), p in zip(where, p_flat.double().cpu().tolist()):
        probs[b][i] = p
    return StartPass(probs=probs, kv=kv, ctx_at=ctx_at, prefix_len=P, prefix_kv=prompt.kv,
                     tokens=None if kv is not None else [prompt.prefix_ids + r for r in rows])


def merge_passes(parts: list[tuple[StartPass, list[int]]]) -> StartPass:
    """One StartPass holding the given documents (rows) of several passes of the same prompt, so
    their sampled calls decode in one batch (positions above tau_s can be rare: a pass alone may
    have few)."""
    if parts[0][0].kv is None:  # plain path: the rows' tokens instead of their KV
        return StartPass(probs=[sp.probs[b] for sp, docs in parts for b in docs], kv=None,
                         ctx_at=[sp.ctx_at[b] for sp, docs in parts for b in docs],
                         prefix_len=parts[0][0].prefix_len, prefix_kv=None,
                         tokens=[sp.tokens[b] for sp, docs in parts for b in docs])
    width = max(sp.kv[0][0].shape[2] for sp, _ in parts)
    layers = []
    for layer in range(len(parts[0][0].kv)):
        ks = []
        vs = []
        for sp, docs in parts:
            idx = torch.tensor(docs, dtype=torch.long, device=sp.kv[layer][0].device)
            k = sp.kv[layer][0].index_select(0, idx)
            v = sp.kv[layer][1].index_select(0, idx)
            pad = width - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        layers.append((torch.cat(ks), torch.cat(vs)))
    first = parts[0][0]
    return StartPass(probs=[sp.probs[b] for sp, docs in parts for b in docs], kv=layers,
                     ctx_at=[sp.ctx_at[b] for sp, docs in parts for b in docs],
                     prefix_len=first.prefix_len, prefix_kv=first.prefix_kv)


# -------------------------------------------------------------------------------- step 2: positions
def select_positions(probs: list[float], doc: TokenizedDoc, tau_s: float, k: int,
                     min_pos: int) -> list[int]:
    """I = {i : p_i > tau_s}, top k by p_i (ties: earlier position first), over usable positions."""
    usable = [i for i in range(min_pos, len(probs))
              if doc.char_pos[i] is not None and probs[i] > tau_s]
    usable.sort(key=lambda i: (-probs[i], i))
    return sorted(usable[:k])


# --------------------------------------------------------------------------------- step 3: decoding
@dataclass
class DecodeRow:
    doc: int  # row of the StartPass batch
    # context after the shared prompt: input copy + output copy of x_<i (StartPass.ctx_at)
    ctx_len: int
    seed_key: str  # identifies the sample, for a per-row random stream independent of batching


@dataclass
class DecodeOut:
    text: str  # decoded continuation after the start marker
    # log p of the start marker's tokens after the first (0 for one-token markers)
    marker_logprob: float
    n_tokens: int = 0


def row_rng(seed: int, key: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, h])


def _sample(logits: torch.Tensor, rngs: list[np.random.Generator], temperature: float,
            top_p: float) -> list[int]:
    """One token per row: greedy when temperature is 0, else temperature + nucleus sampling by
    inverse CDF with the row's own uniform draw (so a row's sample does not depend on the rest of
    the batch)."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    u = torch.tensor([rng.random() for rng in rngs], dtype=torch.float32)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # the smallest prefix with mass >= top_p
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)
    if order is not None:
        pick = order.gather(1, pick)
    return pick.squeeze(1).tolist()


@torch.inference_mode()
def decode_calls(model, tokenizer, sp: StartPass, rows: list[DecodeRow], marker_ids: list[int],
                 markers: Markers,
                 *, seed: int, temperature: float, top_p: float, max_tokens: int,
                 eos_id: int | None,
                 sample: bool = True, log: list | None = None) -> list[DecodeOut]:
    """Feed the start marker after each row's context (its document's StartPass KV up to the row's
    position), then sample until the call closes. Finished rows leave the batch at once. With
    sample=False only the marker is fed (to get the probability of a multi-token marker's later
    tokens)."""
    R = len(rows)
    M = len(marker_ids)
    if sp.kv is not None:
        context = DocContext(sp.kv, [r.doc for r in rows], [r.ctx_len for r in rows])
    else:  # plain path (lm.PlainContext): each row's own tokens
        context = PlainContext(model, [sp.tokens[r.doc][:sp.prefix_len + r.ctx_len] for r in rows])
    cache = RowKV.empty(model, R, M + max(max_tokens, 1))  # only the rows' new tokens
    ctx = torch.tensor([r.ctx_len for r in rows], dtype=torch.long)
    pos = sp.prefix_len + ctx[:, None] + torch.arange(M)[None, :]
    hidden = prefix_forward(model, torch.tensor([marker_ids] * R, dtype=torch.long), cache,
                            sp.prefix_kv, pos,
                            context)
    marker_lp = torch.zeros(R, dtype=torch.float64)
    if M > 1:
        lp = torch.log_softmax(logits_from_hidden(model, hidden[:, :-1]), -1)
        later = torch.tensor([marker_ids[1:]] * R, device=lp.device)[:, :, None]
        marker_lp = lp.gather(2, later).squeeze(2).double().sum(1).cpu()
    outs = [DecodeOut("", float(marker_lp[r])) for r in range(R)]
    steps = [R]  # rows fed at each forward (for the benchmark's naive baseline)
    if log is not None:
        log.append(("decode", sp.prefix_len, [r.ctx_len for r in rows], M, steps))
    if not sample:
        return outs
    rngs = [row_rng(seed, r.seed_key) for r in rows]
    generated: list[list[int]] = [[] for _ in range(R)]
    active = list(range(R))  # original row index of each batch row
    last_hidden = hidden[:, -1]
    next_pos = pos[:, -1] + 1
    for step in range(max_tokens):
        logits = logits_from_hidden(model, last_hidden)
        tokens = _sample(logits, [rngs[a] for a in active], temperature, top_p)
        keep = []
        for b, (a, tok) in enumerate(zip(active, tokens)):
            generated[a].append(tok)
            text = tokenizer.decode(generated[a])
            outs[a].text = text
            outs[a].n_tokens = len(generated[a])
            if tok == eos_id or call_closed(text, markers) or "\n" in text:
                continue
            keep.append(b)
        if not keep or step == max_tokens - 1:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, dtype=torch.long)
            cache.select(sel)
            context.keep(sel)
            next_pos = next_pos[sel]
            active = [active[b] for b in keep]
            tokens = [tokens[b] for b in keep]
        hidden = prefix_forward(model, torch.tensor(tokens, dtype=torch.long)[:, None], cache,
                                sp.prefix_kv,
                                next_pos[:, None], context)
        steps.append(len(active))
        last_hidden = hidden[:, -1]
        next_pos = next_pos + 1
    return outs


def parse_sample(text: str, markers: Markers, tool: str, takes_input: bool) -> ApiCall | None:
    """The call in a sampled continuation, or None if it never closed, does not parse or names
    another tool."""
    call = parse_generated_call(text, markers, tool)
    if call is None:
        return None
    if takes_input == (call.input == ""):  # Calendar() takes no input; every other tool needs one
        return None
    return call


@dataclass
class Candidate:
    """A distinct sampled call at one position of one document, for one tool."""
    doc_id: str
    tool: str
    token_pos: int
    char_pos: int
    p_api: float
    call: ApiCall
    n_samples: int = 1  # how many of the m samples produced this call
    result: str | None = None  # filled by the execute stage
    extra: dict = field(default_factory=dict)
