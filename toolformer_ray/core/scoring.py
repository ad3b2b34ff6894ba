"""The weighted loss of the paper (section 2):

    L_i(z) = - sum_{j=i..n} w_{j-i} * log p(x_j | z, x_<j),   w~_t = max(0, 1 - 0.2 t),  w_t = w~_t / sum_s w~_s

so only the 5 tokens from position i count, with weights 1/3, 4/15, 1/5, 2/15, 1/15 (no renormalisation
where the text ends early). z is a prefix of the whole text (never inserted at i while filtering).

`token_nll` is the one batched primitive: for many token sequences, the negative log-likelihood of chosen
target tokens. Sequences only need to run up to their last target, and the LM head runs only at targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from toolformer_ray.core.lm import hidden_states, logits_from_hidden, pad_batch

WINDOW = 5
LOGIT_CHUNK = 1024


def loss_weights(window: int = WINDOW) -> list[float]:
    raw = [max(0.0, 1.0 - 0.2 * t) for t in range(window)]
    total = sum(raw)
    return [w / total for w in raw]


WEIGHTS = loss_weights()


def weighted_loss(nll_at: dict[int, float], i: int, n: int) -> float:
    """L_i from per-token NLLs of document tokens (`nll_at[j]` = -log p(x_j | z, x_<j)), n = document length."""
    return sum(WEIGHTS[t] * nll_at[i + t] for t in range(WINDOW) if i + t < n)


def window(i: int, n: int) -> range:
    """Document positions whose NLL enters L_i."""
    return range(i, min(i + WINDOW, n))


@dataclass
class NllRequest:
    ids: list[int]  # the full sequence (prefix tokens + document tokens)
    targets: list[int]  # indices t >= 1 in `ids`: we want -log p(ids[t] | ids[:t])


def token_nll(model, requests: list[NllRequest], pad_id: int, batch_tokens: int = 8192,
              log: list | None = None) -> list[dict[int, float]]:
    """For each request, {t: -log p(ids[t] | ids[:t])} for its targets. Batched by length, right-padded.

    Each sequence is cut after its last target (later tokens cannot influence earlier ones).
    Returns float64 values computed from float32 log-softmax.
    """
    results: list[dict[int, float]] = [dict() for _ in requests]
    order = sorted((r for r in range(len(requests)) if requests[r].targets),
                   key=lambda r: -(max(requests[r].targets) + 1))
    batch: list[int] = []
    width = 0
    for r in order + [None]:
        length = max(requests[r].targets) + 1 if r is not None else 0
        if r is None or (batch and max(width, length) * (len(batch) + 1) > batch_tokens):
            if batch:
                if log is not None:
                    log.append(("nll", [max(requests[b].targets) + 1 for b in batch]))
                _nll_batch(model, requests, batch, pad_id, results)
            batch, width = [], 0
        if r is not None:
            batch.append(r)
            width = max(width, length)
    return results


@torch.inference_mode()
def _nll_batch(model, requests, batch: list[int], pad_id: int, results) -> None:
    rows = [requests[r].ids[:max(requests[r].targets) + 1] for r in batch]
    ids = pad_batch(rows, pad_id)
    hidden, _ = hidden_states(model, ids)
    row_idx, pos_idx, tgt = [], [], []
    for b, r in enumerate(batch):
        for t in requests[r].targets:
            row_idx.append(b)
            pos_idx.append(t - 1)  # the hidden state that predicts token t
            tgt.append(requests[r].ids[t])
    dev = hidden.device
    picked = hidden[torch.tensor(row_idx, device=dev), torch.tensor(pos_idx, device=dev)]
    tgt_t = torch.tensor(tgt, device=dev)
    values: list[float] = []
    for s in range(0, len(tgt), LOGIT_CHUNK):  # bounded memory: chunk x vocab float32 logits
        logp = torch.log_softmax(logits_from_hidden(model, picked[s:s + LOGIT_CHUNK]), dim=-1)
        chunk = tgt_t[s:s + LOGIT_CHUNK]
        values += (-logp[torch.arange(len(chunk), device=dev), chunk]).double().cpu().tolist()
    k = 0
    for b, r in enumerate(batch):
        for t in requests[r].targets:
            results[r][t] = values[k]
            k += 1
