"""Brute-force reference of the method: one sequence at a time, plain loops, no KV cache, no truncation.

Everything here follows the definitions literally, so the fast batched path can be checked against it.
"""
from __future__ import annotations

import torch

from toolformer_ray.api_text import Markers, render
from toolformer_ray.core.sampling import row_rng

WEIGHTS_REF = [w / 3.0 for w in (1.0, 0.8, 0.6, 0.4, 0.2)]  # w~_t = 1 - 0.2t, sum = 3


@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids) from a full forward over `ids` (no cache)."""
    logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def p_api_ref(model, context: list[int], marker_ids: list[int]) -> float:
    """p(API-start | context): the product over the marker's tokens, each from a fresh forward."""
    total = 0.0
    ids = list(context)
    for tok in marker_ids:
        total += float(next_token_logprobs(model, ids)[tok])
        ids.append(tok)
    return float(torch.tensor(total).exp())


def start_probs_ref(model, prefix_ids: list[int], input_ids: list[int], doc_ids: list[int],
                    marker_ids: list[int]) -> list[float]:
    """p_i for every position i of the document: context = [P(x), x_<i]."""
    return [p_api_ref(model, prefix_ids + input_ids + doc_ids[:i], marker_ids) for i in range(len(doc_ids))]


_NLL_MEMO: dict = {}


@torch.no_grad()
def token_nlls_ref(model, ids: list[int]) -> list[float | None]:
    """-log p(ids[t] | ids[:t]) for every t (None for t = 0), from one full forward (memoised per sequence)."""
    key = (id(model), tuple(ids))
    if key not in _NLL_MEMO:
        _NLL_MEMO[key] = _token_nlls(model, ids)
    return _NLL_MEMO[key]


def _token_nlls(model, ids: list[int]) -> list[float | None]:
    logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    out: list[float | None] = [None]
    for t in range(1, len(ids)):
        out.append(float(-logp[t - 1, ids[t]]))
    return out


def loss_ref(model, bos: list[int], prefix_ids: list[int], doc_ids: list[int], i: int) -> float:
    """L_i(z) = sum_{j=i..n} w_{j-i} * -log p(x_j | z, x_<j), with z given as a prefix of the whole text."""
    seq = bos + prefix_ids + doc_ids
    nll = token_nlls_ref(model, seq)
    offset = len(bos) + len(prefix_ids)
    total = 0.0
    for j in range(i, len(doc_ids)):
        t = j - i
        w = WEIGHTS_REF[t] if t < len(WEIGHTS_REF) else 0.0
        if w:
            total += w * nll[offset + j]
    return total


def sample_ref(model, tokenizer, context: list[int], marker_ids: list[int], markers: Markers, seed: int, key: str,
               temperature: float, max_tokens: int, eos_id) -> str:
    """One sampled continuation after the marker, token by token with full forwards, using the same
    per-row random stream (inverse CDF of the row's uniform draws) as the fast path."""
    from toolformer_ray.api_text import call_closed

    rng = row_rng(seed, key)
    ids = list(context) + list(marker_ids)
    gen: list[int] = []
    for _ in range(max_tokens):
        logp = next_token_logprobs(model, ids)
        if temperature == 0:
            tok = int(logp.argmax())
        else:
            probs = torch.softmax(logp / temperature, -1)
            cdf = torch.cumsum(probs, 0)
            u = torch.tensor([rng.random()], dtype=torch.float32)
            tok = int(torch.searchsorted(cdf, u * cdf[-1])[0])
            tok = min(tok, len(probs) - 1)
        gen.append(tok)
        ids.append(tok)
        text = tokenizer.decode(gen)
        if tok == eos_id or call_closed(text, markers) or "\n" in text:
            break
    return tokenizer.decode(gen)


def prefix_string_ref(call, result, markers: Markers, separator: str, with_result: bool) -> str:
    if with_result:
        return render(call, markers, result=result).lstrip() + separator
    return render(call, markers, with_result_marker=True).lstrip() + separator
