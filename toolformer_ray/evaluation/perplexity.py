"""Perplexity on held-out text (paper, section 4.3), optionally with tool calls disabled.

Each text is encoded on its own (with BOS if the tokenizer adds one) and cut into windows of
`max_length` tokens; every token after the first of a window is scored. Perplexity = exp(total NLL /
scored tokens). With `mask_token_ids` (the API-start token: "Toolformer (disabled)") those tokens
get probability 0 and the rest is renormalised, except where the text itself has that token (there
the raw probability is used, or a text containing " [" would have infinite perplexity).
"""
from __future__ import annotations

import json
import math

import torch

from toolformer_ray.evaluation.examples import DataError, read_text


@torch.inference_mode()
def nll_and_count(model, tokenizer, texts: list[str], max_length: int = 1024, batch_size: int = 8,
                  mask_token_ids: list[int] | None = None,
                  vocab_chunk: int = 256) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of scored tokens."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for i in range(0, len(ids), max_length):
            if len(ids[i:i + max_length]) >= 2:
                windows.append(ids[i:i + max_length])
    windows.sort(key=len)  # similar lengths together: little padding
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    dev = model.device
    masked = torch.tensor(sorted(set(mask_token_ids or [])), dtype=torch.long, device=dev)
    total = 0.0
    count = 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([w + [0] * (width - len(w)) for w in chunk], device=dev)
        attn = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in chunk], device=dev)
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
        targets = ids[:, 1:]
        valid = attn[:, 1:].bool()
        # The LM head over slices of positions: full [batch, length, vocab] logits would not fit for
        # long texts.
        for s in range(0, width - 1, vocab_chunk):
            logits = head(hidden[:, s:s + vocab_chunk]).float()
            tgt = targets[:, s:s + vocab_chunk]
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
            if len(masked):
                logits_m = logits.clone()
                logits_m[..., masked] = float("-inf")
                lp_m = torch.log_softmax(logits_m, -1).gather(-1, tgt[..., None])[..., 0]
                lp = torch.where(torch.isin(tgt, masked), lp, lp_m)
            v = valid[:, s:s + vocab_chunk]
            total -= float(lp[v].double().sum())
            count += int(v.sum())
    return total, count


def perplexity(model, tokenizer, texts: list[str], max_length: int = 1024, batch_size: int = 8,
               mask_token_ids: list[int] | None = None) -> float:
    """exp(mean NLL per scored token) of `texts` under `model` (teacher-forced, no tool calls
    run)."""
    total, count = nll_and_count(model, tokenizer, texts, max_length, batch_size, mask_token_ids)
    if count == 0:
        raise ValueError("no tokens to score: give texts of at least two tokens")
    return math.exp(total / count)


def read_texts(path: str, field: str = "text") -> list[str]:
    """Held-out texts: jsonl with a `text` field, a JSON list of strings/objects, or plain text (one
    per line)."""
    raw = read_text(path)
    stripped = raw.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            items = json.loads(stripped) if stripped.startswith("[") else [
                json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON / JSON lines: {e}") from None
        texts = [it if isinstance(it, str) else (it.get(field) if isinstance(it, dict) else None)
                 for it in items]
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no texts found (jsonl with a {field!r} field, or plain text)")
    return texts
