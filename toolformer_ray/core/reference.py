"""Brute-force reference of the method: one sequence at a time, plain loops, no KV cache, no
truncation.

Everything here follows the definitions literally and is built from raw text: P(x) is the tool's
prompt text with x written into it ("Input: x\\nOutput: x_<i", the paper's appendix A.2 format),
tokenized as a whole; calls are rendered here in the paper's format ("[Tool(input) -> result]").
Only the model (and its tokenizer) and the per-row random stream are shared with the fast path, so
the fast path can be checked against it: the tests, `toolformer-ray verify` and
benchmarks/throughput.py (bruteforce) all use this module, and nothing here calls core/scoring.py or
core/lm.py (only row_rng comes from the fast path).
"""
from __future__ import annotations

import re
import weakref

import torch

# the random stream: the same draws, so samples compare
from toolformer_ray.core.sampling import row_rng

WEIGHTS_REF = [w / 3.0 for w in (1.0, 0.8, 0.6, 0.4, 0.2)]  # w~_t = 1 - 0.2t, sum = 3
# the paper's markers, as the prompt files write them
START = " ["
RESULT = " ->"
END = "]"
_EXAMPLE_CALL = re.compile(r" \[([A-Za-z_]\w*)\(([^()\n]*)\)(?: -> ([^\]\n]*))?\]")


# ------------------------------------------------------------------------------------------ text
def render_ref(tool: str, arg: str, result: str | None, start: str = START,
               result_marker: str = RESULT,
               end: str = END) -> str:
    """e(c, r) = " [Tool(input) -> r]", or e(c, empty) = " [Tool(input) ->]" when result is None."""
    tail = f"{result_marker} {result}" if result is not None else result_marker
    return f"{start}{tool}({arg}){tail}{end}"


def prompt_ref(prompt: str, start: str = START, result_marker: str = RESULT, end: str = END) -> str:
    """The prompt text with its example calls written with the given markers."""
    def one(m):
        tail = "" if m.group(3) is None else f"{result_marker} {m.group(3)}"
        return f"{start}{m.group(1)}({m.group(2)}){tail}{end}"
    return _EXAMPLE_CALL.sub(one, prompt)


def doc_ids_ref(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def context_ids_ref(tokenizer, prompt: str, text: str, i: int) -> list[int]:
    """[P(x), x_<i] as text, tokenized as a whole (with BOS if the tokenizer adds one): the prompt
    with x written into its input and output, then x up to the end of its token i-1. At i = 0 the
    context ends at "Output:": the call's marker " [" brings its own space (the augmented text reads
    "Output: [...] x")."""
    _, offsets = doc_ids_ref(tokenizer, text)
    cut = 0 if i == 0 else offsets[i - 1][1]
    full = prompt.replace("{text}", text, 1) + text[:cut]
    if i == 0:
        full = full.rstrip(" ")
    return tokenizer(full, add_special_tokens=True)["input_ids"]


# ------------------------------------------------------------------------------------------ model
@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids) from a full forward over `ids` (no cache)."""
    seq = torch.tensor([ids], device=model.device)
    logits = model(seq, logits_to_keep=1).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def start_logprob_ref(model, tokenizer, prompt: str, text: str, i: int,
                      start: str = START) -> float:
    """log p_i = log p(API-start | P(x), x_<i): the sum over the marker's tokens, each from a fresh
    forward."""
    ids = context_ids_ref(tokenizer, prompt, text, i)
    total = 0.0
    for tok in tokenizer(start, add_special_tokens=False)["input_ids"]:
        total += float(next_token_logprobs(model, ids)[tok])
        ids.append(tok)
    return total


# per model (held weakly, so a freed model's entries go with it), per sequence: the tests and the
# brute-force benchmark score the same sequence (e.g. L(empty) of a document) many times
_NLL_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def token_nlls_ref(model, ids: list[int]) -> list[float | None]:
    """-log p(ids[t] | ids[:t]) for every t (None for t = 0), from one full forward (fp32 softmax),
    memoised per sequence."""
    memo = _NLL_MEMO.setdefault(model, {})
    key = tuple(ids)
    if key not in memo:
        memo[key] = _token_nlls(model, ids)
    return memo[key]


def _token_nlls(model, ids: list[int]) -> list[float | None]:
    seq = torch.tensor([ids], device=model.device)
    logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    picked = -logp[torch.arange(len(ids) - 1, device=logp.device), seq[0, 1:]]
    return [None] + picked.double().cpu().tolist()


def loss_ref(model, bos: list[int], prefix_ids: list[int], doc_ids: list[int], i: int) -> float:
    """L_i(z) = sum_{j=i..n} w_{j-i} * -log p(x_j | z, x_<j), with z given as a prefix of the whole
    text (no i + 5 cut, no packing). The very first token of the sequence has no context: the fast
    path never scores it, so neither does this."""
    seq = bos + prefix_ids + doc_ids
    nll = token_nlls_ref(model, seq)
    offset = len(bos) + len(prefix_ids)
    total = 0.0
    for j in range(i, len(doc_ids)):
        t = j - i
        w = WEIGHTS_REF[t] if t < len(WEIGHTS_REF) else 0.0
        if w and nll[offset + j] is not None:
            total += w * nll[offset + j]
    return total


def loss_text_ref(model, tokenizer, prefix: str, text: str, i: int) -> float:
    """L_i(z) from text: z (e.g. "[Calculator(5 + 7) -> 12]\\n", or "" for no call) and the document
    x, each tokenized on its own (DESIGN.md), the prefix with the tokenizer's BOS if it adds one."""
    head = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    return loss_ref(model, [], head, doc_ids_ref(tokenizer, text)[0], i)


def prefix_ref(tool: str, arg: str, result: str | None, separator: str) -> str:
    """The scored prefix: the call at the very start of the text (no leading space), then the
    separator."""
    return render_ref(tool, arg, result).lstrip() + separator


def closed_ref(text: str) -> bool:
    """Has a sampled continuation reached "]" or "->" (the end or result marker), or a new line?"""
    return "]" in text or "->" in text or "\n" in text


def sample_ref(model, tokenizer, context: list[int], seed: int, key: str, temperature: float,
               max_tokens: int, start: str = START) -> str:
    """One sampled continuation after the marker, token by token with full forwards, using the same
    per-row random stream (inverse CDF of the row's uniform draws) as the fast path."""
    rng = row_rng(seed, key)
    ids = list(context) + tokenizer(start, add_special_tokens=False)["input_ids"]
    gen: list[int] = []
    for _ in range(max_tokens):
        logp = next_token_logprobs(model, ids)
        if temperature == 0:
            tok = int(logp.argmax())
        else:
            probs = torch.softmax(logp / temperature, -1)
            cdf = torch.cumsum(probs, 0)
            u = torch.tensor([rng.random()], dtype=torch.float32, device=cdf.device)
            tok = int(torch.searchsorted(cdf, u * cdf[-1])[0])
            tok = min(tok, len(probs) - 1)
        gen.append(tok)
        ids.append(tok)
        if tok == tokenizer.eos_token_id or closed_ref(tokenizer.decode(gen)):
            break
    return tokenizer.decode(gen)
