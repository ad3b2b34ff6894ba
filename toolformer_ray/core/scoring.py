"""The weighted loss of the paper (section 2):

    L_i(z) = - sum_{j=i..n} w_{j-i} * log p(x_j | z, x_<j),
    w~_t = max(0, 1 - 0.2 t),  w_t = w~_t / sum_s w~_s

so only the 5 tokens from position i count, with weights 1/3, 4/15, 1/5, 2/15, 1/15 (no
renormalisation where the text ends early). z is a prefix of the whole text (never inserted at i
while filtering).

`token_nll` is the one batched primitive: for many token sequences, the negative log-likelihood of
chosen target tokens. Sequences only need to run up to their last target, and the LM head runs only
at targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from toolformer_ray.core.lm import hidden_states, logits_from_hidden, plain_path

WINDOW = 5
LOGIT_CHUNK = 1024


def loss_weights(window: int = WINDOW) -> list[float]:
    raw = [max(0.0, 1.0 - 0.2 * t) for t in range(window)]
    total = sum(raw)
    return [w / total for w in raw]


WEIGHTS = loss_weights()


def weighted_loss(nll_at: dict[int, float], i: int, n: int) -> float:
    """L_i from per-token NLLs of document tokens (`nll_at[j]` = -log p(x_j | z, x_<j)), n =
    document length."""
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
    """For each request, {t: -log p(ids[t] | ids[:t])} for its targets.

    Each sequence is cut after its last target (later tokens cannot influence earlier ones).
    Sequences are packed several to a row (first fit, longest first) with a block-diagonal causal
    mask and positions restarting at 0 for each, so almost no forward work goes to padding; a batch
    holds `batch_tokens`. Returns float64 values computed from float32 log-softmax.
    """
    results: list[dict[int, float]] = [dict() for _ in requests]
    order = sorted((r for r in range(len(requests)) if requests[r].targets),
                   key=lambda r: -(max(requests[r].targets) + 1))
    if not order:
        return results
    length = {r: max(requests[r].targets) + 1 for r in order}
    width = length[order[0]]
    rows: list[list[int]] = []  # request indices packed into each row
    free: list[int] = []
    pack = not plain_path(model)  # a packed row's mask would drop e.g. a sliding window
    for r in order:  # first fit decreasing
        for i, room in enumerate(free if pack else []):
            if length[r] <= room:
                rows[i].append(r)
                free[i] -= length[r]
                break
        else:
            rows.append([r])
            free.append(width - length[r])
    per_batch = max(1, batch_tokens // width)
    for s in range(0, len(rows), per_batch):
        batch = rows[s:s + per_batch]
        if log is not None:
            log.append(("nll", [length[r] for row in batch for r in row]))
        _nll_batch(model, requests, batch, length, width, pad_id, results)
    return results


def packed_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """[B, 1, W, W] additive mask in the model's dtype (0 where attending is allowed, the dtype's
    minimum elsewhere). Eager and flex attention ADD a 4-D mask to the scores while SDPA reads a
    boolean one as "attend", so only the additive form means the same to all three; flash attention
    takes no 4-D mask."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if "flash" in impl:
        raise ValueError(f"packed scoring needs a 4-D attention mask, which {impl!r} does not "
                         "take: load the model with eager or sdpa attention")
    dtype = model.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.inference_mode()
def _nll_batch(model, requests, batch: list[list[int]], length: dict, width: int, pad_id: int,
               results) -> None:
    B = len(batch)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros(B, width, dtype=torch.long)
    segment = torch.full((B, width), -1, dtype=torch.long)
    row_idx = []
    pos_idx = []
    tgt = []
    owner = []
    for b, row in enumerate(batch):
        offset = 0
        for seg, r in enumerate(row):
            n = length[r]
            ids[b, offset:offset + n] = torch.tensor(requests[r].ids[:n])
            pos[b, offset:offset + n] = torch.arange(n)
            segment[b, offset:offset + n] = seg
            for t in requests[r].targets:
                row_idx.append(b)
                pos_idx.append(offset + t - 1)  # the hidden state that predicts token t
                tgt.append(requests[r].ids[t])
                owner.append((r, t))
            offset += n
    # a token sees the earlier tokens of its own sequence only (padding sees itself, so no row is
    # empty)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    mask = packed_mask(model, causal[None] & same)
    if plain_path(model):  # one sequence a row (token_nll): the model's own mask, all its features
        mask = (segment >= 0).long()
    hidden, _ = hidden_states(model, ids, attention_mask=mask, position_ids=pos)
    dev = hidden.device
    picked = hidden[torch.tensor(row_idx, device=dev), torch.tensor(pos_idx, device=dev)]
    tgt_t = torch.tensor(tgt, device=dev)
    values: list[float] = []
    for s in range(0, len(tgt), LOGIT_CHUNK):  # bounded memory: chunk x vocab float32 logits
        logp = torch.log_softmax(logits_from_hidden(model, picked[s:s + LOGIT_CHUNK]), dim=-1)
        chunk = tgt_t[s:s + LOGIT_CHUNK]
        values += (-logp[torch.arange(len(chunk), device=dev), chunk]).double().cpu().tolist()
    for (r, t), v in zip(owner, values):
        results[r][t] = v
