"""The training loss and the checkpoint criterion: per-token NLL (optionally with calls disabled, as
in the paper's evaluation) and dev perplexity summed across the ranks."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from toolformer_ray.finetune.data import Packed, gather_rows


def token_nll(logits, input_ids, loss_mask, disabled_token: int | None = None):
    """Negative log-likelihood of each next token, [B, T-1], and its loss mask (token t is predicted
    from the logits at t-1). With `disabled_token`, tool calls are disabled as in the paper's
    evaluation: that token's probability is set to 0 and the rest renormalised, except where the
    text itself continues with it (plain text may contain " [" too; its own probability is used
    there)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    nll = F.cross_entropy(flat_logits, flat_targets, reduction="none").view_as(targets)
    if disabled_token is not None:
        blocked = flat_logits.clone()
        blocked[:, disabled_token] = float("-inf")
        nll_blocked = F.cross_entropy(blocked, flat_targets, reduction="none").view_as(targets)
        nll = torch.where(targets == disabled_token, nll, nll_blocked)
    return nll, loss_mask[:, 1:].to(nll.dtype)


def forward_logits(engine, batch: dict, device):
    """(input ids on `device`, the engine's logits) for a batch from gather_rows."""
    ids = torch.from_numpy(batch["input_ids"]).to(device)
    attention = torch.from_numpy(batch["attention_mask"]).to(device)
    return ids, engine(input_ids=ids, attention_mask=attention, use_cache=False).logits


def all_reduce(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """Sum (or `op`) a few numbers over the ranks; themselves when there is no process group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def evaluate_dev(engine, dev: Packed, micro: int, rank: int, world: int, device,
                 api_start_token: int | None) -> dict:
    """Dev perplexity over the packed dev rows, split across ranks. Every rank runs the same number
    of forward passes (ZeRO-3 gathers parameters collectively), padding its share with zero-weight
    rows."""
    n = len(dev)
    if n == 0:
        return {}
    per_rank = -(-n // world)
    lo = rank * per_rank
    hi = min(n, (rank + 1) * per_rank)
    sums = [0.0, 0.0, 0.0]  # nll with calls disabled, plain nll, targets
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro):
            idx = lo + start + np.arange(micro)
            real = idx < hi
            batch = gather_rows(dev, np.where(real, idx, 0))
            ids, logits = forward_logits(engine, batch, device)
            loss_mask = torch.from_numpy(batch["loss_mask"] * real[:, None]).to(device)
            nll_off, mask = token_nll(logits, ids, loss_mask, api_start_token)
            nll_on, _ = token_nll(logits, ids, loss_mask)
            sums[0] += float((nll_off * mask).sum())
            sums[1] += float((nll_on * mask).sum())
            sums[2] += float(mask.sum())
    engine.train()
    off, on, count = all_reduce(sums, device)
    if count == 0:
        return {}
    return {"dev_ppl": math.exp(off / count), "dev_ppl_plain": math.exp(on / count),
            "dev_loss": off / count}
