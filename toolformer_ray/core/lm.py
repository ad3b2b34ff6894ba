"""Thin helpers over a Hugging Face causal LM: tokenizing, hidden states, logits only where needed, KV caches.

The method needs the full softmax only at a few positions (p_i at document positions, the 5 weighted
tokens after a call), so the forward pass stops at the final hidden states and the LM head is applied to
the positions that matter: on a 135M model with a 49k vocabulary that is a fifth of the FLOPs saved.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens (the scoring convention of DESIGN.md)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """[BOS] if the tokenizer adds one to plain text, else []."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(without) and with_special[0] == bos:
        return [bos]
    return []


def decoder(model):
    """The transformer body (without LM head) of a *ForCausalLM model."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def hidden_states(model, input_ids: torch.Tensor, past_key_values=None, attention_mask=None,
                  position_ids=None, use_cache: bool = False):
    """Final-layer hidden states (after the final norm) and the cache. Inputs move to the model's device."""
    dev = model.device
    input_ids = input_ids.to(dev)
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    position_ids = position_ids.to(dev) if position_ids is not None else None
    out = decoder(model)(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=use_cache)
    return out.last_hidden_state, out.past_key_values


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in float32 for the given hidden states (any leading shape)."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style; a no-op for Llama-family models
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def cache_from_layers(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding the given per-layer (key, value) tensors [batch, kv_heads, seq, head_dim]."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (k, v) in enumerate(layers):
        cache.update(k, v, layer_idx)
    return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (key, value) tensors of a cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def pad_batch(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded [B, max_len] ids. Causal attention never lets a real token see the right padding."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
