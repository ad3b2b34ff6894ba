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


# ------------------------------------------------------------------------ shared-prefix attention
# Every document of a tool is read after the same few-shot prompt, and every sampled call of a document
# after the same document prefix. Copying the prompt's keys/values into each row (what a plain KV cache
# does) multiplies memory traffic by the number of rows, and concatenating the cache at every decoding
# step copies it again. Here the prompt's KV is stored once and attended to by all rows in one GEMM, each
# row keeps only its own KV in a preallocated buffer, and the two softmax parts are merged exactly
# (log-sum-exp), so the result equals attention over [prompt, row] (checked against the reference).
PREFIX_ATTENTION = "toolformer_shared_prefix"


class RowKV:
    """Per-row keys/values in preallocated buffers [R, kv_heads, capacity, head_dim] (no copy per step)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], extra: int):
        self.k, self.v, self.lengths = [], [], []
        for k, v in layers:
            R, H, L, D = k.shape
            kb = k.new_empty(R, H, L + extra, D)
            vb = v.new_empty(R, H, L + extra, D)
            kb[:, :, :L], vb[:, :, :L] = k, v
            self.k.append(kb)
            self.v.append(vb)
            self.lengths.append(L)

    @classmethod
    def empty(cls, model, rows: int, capacity: int) -> "RowKV":
        cfg = model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        z = torch.empty(rows, n_kv, 0, head_dim, dtype=model.dtype, device=model.device)
        return cls([(z, z)] * cfg.num_hidden_layers, capacity)

    def update(self, key, value, layer_idx, *args, **kwargs):
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.k[layer_idx].shape[2]:
            raise RuntimeError("RowKV capacity exceeded")
        self.k[layer_idx][:, :, start:end] = key
        self.v[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    @property
    def length(self) -> int:
        return self.lengths[0]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :n], v[:, :, :n]) for k, v, n in zip(self.k, self.v, self.lengths)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        rows = rows.to(self.k[0].device)
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix=None, **kwargs):
    """softmax([q.Kp, q.Kr]) @ [Vp; Vr] with the prefix Kp, Vp [kv_heads, P, d] shared by all rows.

    query [B, H, q, d]; key/value [B, kv_heads, k, d] (the rows' own part); attention_mask: bool
    [B, 1, q, k], True = may attend (the prefix is visible to every query). Computed in float32.
    """
    B, H, Q, D = query.shape
    n_kv = key.shape[1]
    g = H // n_kv  # query heads per key/value head (grouped-query attention, without repeating K/V)
    scale = scaling if scaling is not None else D ** -0.5
    q = (query.float() * scale).reshape(B, n_kv, g * Q, D)
    s_rows = q @ key.float().transpose(-1, -2)  # [B, kv, g*Q, k]
    if attention_mask is not None:
        m = attention_mask[:, :, None].expand(B, 1, g, Q, attention_mask.shape[-1]).reshape(B, 1, g * Q, -1)
        s_rows = s_rows.masked_fill(~m, float("-inf"))
    if shared_prefix is None:
        out = torch.softmax(s_rows, -1) @ value.float()
    else:
        pk, pv = shared_prefix[module.layer_idx]  # [kv, P, d]
        qp = q.permute(1, 0, 2, 3).reshape(n_kv, B * g * Q, D)
        s_pre = (qp @ pk.float().transpose(-1, -2)).reshape(n_kv, B, g * Q, -1).permute(1, 0, 2, 3)
        top = torch.maximum(s_pre.amax(-1, keepdim=True), s_rows.amax(-1, keepdim=True))
        e_pre, e_rows = torch.exp(s_pre - top), torch.exp(s_rows - top)
        den = e_pre.sum(-1, keepdim=True) + e_rows.sum(-1, keepdim=True)
        o_pre = (e_pre.permute(1, 0, 2, 3).reshape(n_kv, B * g * Q, -1) @ pv.float())
        o_pre = o_pre.reshape(n_kv, B, g * Q, D).permute(1, 0, 2, 3)
        out = (o_pre + e_rows @ value.float()) / den
    out = out.reshape(B, n_kv, g, Q, D).reshape(B, H, Q, D).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)


_register()


def check_prefix_attention_supported(model) -> None:
    cfg = model.config
    for attr in ("attn_logit_softcapping", "sliding_window"):
        if getattr(cfg, attr, None):
            raise ValueError(f"{cfg.model_type} uses {attr}; shared-prefix attention does not implement it")


def prefix_forward(model, input_ids: torch.Tensor, rows: RowKV, prefix_kv, mask: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states of `input_ids` [R, q] attending to the shared prefix (all of it) and to each row's
    own cached tokens (where `mask` [R, q, k] is True); appends the new keys/values to `rows`."""
    dev = model.device
    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = PREFIX_ATTENTION
    try:
        out = decoder(model)(input_ids=input_ids.to(dev), attention_mask=mask[:, None].to(dev),
                             position_ids=position_ids.to(dev), past_key_values=rows, use_cache=True,
                             shared_prefix=prefix_kv)
    finally:
        cfg._attn_implementation = saved
    return out.last_hidden_state
