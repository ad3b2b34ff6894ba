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
# Every document of a tool is read after the same few-shot prompt, and the m samples at k positions of a
# document all continue the same document context. A plain KV cache copies the prompt's and the document's
# keys/values into every row, and concatenates the cache (another copy) at every decoding step. Here the
# context is attended to where it lies: (1) the prompt's KV once for all rows, (2) each document's KV from
# the teacher-forced pass, shared by that document's rows up to each row's own position, (3) each row's own
# new tokens, in a small preallocated buffer. The softmax parts are merged exactly by their log-sum-exp,
# so the result equals attention over the concatenated sequence (checked against the reference).
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


class DocContext:
    """Part (2): per-document KV [D, kv_heads, L, head_dim] (from the teacher-forced pass), seen by each row
    of that document up to the row's context length. Each step the active rows are packed per document
    (slot j of document b), so the attention is one batched call over documents and its work follows the
    rows still decoding; the documents' KV itself is never copied."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], row_doc: list[int], row_ctx: list[int]):
        self.kv = kv
        self.n_docs, self.width = kv[0][0].shape[0], kv[0][0].shape[2]
        self.row_doc = torch.tensor(row_doc, dtype=torch.long)
        self.row_ctx = torch.tensor(row_ctx, dtype=torch.long)
        self._layout = None

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.cpu()
        self.row_doc, self.row_ctx = self.row_doc[rows], self.row_ctx[rows]
        self._layout = None

    def layout(self, gq: int, dtype, device):
        """(slot of each active row, slots per document, additive mask [D, 1, slots * gq, L]), per step."""
        if self._layout is None or self._layout[0] != gq:
            counts = torch.bincount(self.row_doc, minlength=self.n_docs)
            per_doc = max(1, int(counts.max()))
            # j = rank of the row among its document's rows (rows are grouped by document in order)
            first = torch.cumsum(counts, 0) - counts
            order = torch.argsort(self.row_doc, stable=True)
            j = torch.empty_like(self.row_doc)
            j[order] = torch.arange(len(order)) - first[self.row_doc[order]]
            slot = self.row_doc * per_doc + j
            visible = torch.zeros(self.n_docs * per_doc, self.width, dtype=torch.bool)
            visible[:, 0] = True  # empty slots see one position, so no softmax row is all -inf
            visible[slot] = torch.arange(self.width)[None, :] < self.row_ctx[:, None]
            vis = visible.view(self.n_docs, per_doc, 1, self.width).expand(-1, -1, gq, -1)
            vis = vis.reshape(self.n_docs, 1, per_doc * gq, self.width).to(device)
            bias = torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))
            self._layout = (gq, slot.to(device), per_doc, bias)
        return self._layout[1:]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix=None, doc_context: DocContext | None = None, **kwargs):
    """Attention over [shared prefix, document context, row's own tokens] as separate parts, merged exactly.

    query [B, H, q, d]; key/value [B, kv_heads, k, d]: the rows' own tokens (part 3), which a query sees
    causally (when q == k: a teacher-forced row, or a multi-token marker fed at once) or all of (q == 1:
    one decoding step); `attention_mask` is a placeholder. Parts 1 and 2 are visible as described above.
    Grouped-query heads are folded into the query axis instead of repeating K/V; each part is one fused
    attention call that also returns its log-sum-exp.
    """
    B, H, Q, D = query.shape
    n_kv = key.shape[1]
    K = key.shape[2]
    if Q > 1 and Q != K:
        raise ValueError("a row's own tokens are fed all at once or one per step")
    g = H // n_kv  # query heads per key/value head
    gq = g * Q
    scale = scaling if scaling is not None else D ** -0.5
    if Q > 1:  # causal over the row's own tokens; heads stay separate for the causal kernel
        q_rows = query.reshape(B, n_kv, g, Q, D)
        o, lse = _attend(q_rows.reshape(B * n_kv, g, Q, D), key.reshape(B * n_kv, 1, K, D).expand(-1, g, -1, -1),
                         value.reshape(B * n_kv, 1, K, D).expand(-1, g, -1, -1), None, scale, causal=True)
        parts = [(o.reshape(B, n_kv, gq, D), lse.reshape(B, n_kv, gq))]
    else:
        parts = [_attend(query.reshape(B, n_kv, gq, D), key, value, None, scale, fused=K > 64)]
    q = query.reshape(B, n_kv, gq, D)
    if shared_prefix is not None:
        pk, pv = shared_prefix[module.layer_idx]  # [kv, P, d]
        qp = q.permute(1, 0, 2, 3).reshape(1, n_kv, B * gq, D)
        o, lse = _attend(qp, pk[None], pv[None], None, scale)
        parts.append((o.reshape(n_kv, B, gq, D).permute(1, 0, 2, 3), lse.reshape(n_kv, B, gq).permute(1, 0, 2)))
    if doc_context is not None:
        dk, dv = doc_context.kv[module.layer_idx]  # [docs, kv, L, d]
        slot, per_doc, dbias = doc_context.layout(gq, q.dtype, q.device)
        n_docs, S = doc_context.n_docs, doc_context.n_docs * per_doc
        qd = q.new_zeros(S, n_kv, gq, D)
        qd[slot] = q
        qd = qd.view(n_docs, per_doc, n_kv, gq, D).permute(0, 2, 1, 3, 4).reshape(n_docs, n_kv, per_doc * gq, D)
        o, lse = _attend(qd, dk, dv, dbias, scale)
        o = o.view(n_docs, n_kv, per_doc, gq, D).permute(0, 2, 1, 3, 4).reshape(S, n_kv, gq, D)
        lse = lse.view(n_docs, n_kv, per_doc, gq).permute(0, 2, 1, 3).reshape(S, n_kv, gq)
        parts.append((o[slot], lse[slot]))
    if len(parts) == 1:
        out = parts[0][0]
    else:
        total = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
        out = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in parts)
    out = out.reshape(B, n_kv, g, Q, D).reshape(B, H, Q, D).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def _attend(q, k, v, bias, scale, fused: bool = True, causal: bool = False):
    """(softmax(q k^T * scale + bias) v, log-sum-exp of the scores), float32 softmax. The fused CPU kernel
    wins on long keys; plain float32 math wins on a few keys (a row's own new tokens)."""
    if (fused or causal) and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
        return out, lse.float()
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.float(), lse


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)


_register()


def check_prefix_attention_supported(model) -> None:
    cfg = model.config
    for attr in ("attn_logit_softcapping", "sliding_window"):
        if getattr(cfg, attr, None):
            raise ValueError(f"{cfg.model_type} uses {attr}; shared-prefix attention does not implement it")


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask makes HF skip its own mask building


def prefix_forward(model, input_ids: torch.Tensor, rows: RowKV, prefix_kv, position_ids: torch.Tensor,
                   doc_context: DocContext | None = None) -> torch.Tensor:
    """Final hidden states of `input_ids` [R, q] attending to the shared prefix (all of it), to the rows'
    document context if given, and to each row's own tokens (causally); appends their keys/values to `rows`.
    Either rows are empty and q tokens are fed at once, or one token per row is fed per step."""
    dev = model.device
    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = PREFIX_ATTENTION
    try:
        out = decoder(model)(input_ids=input_ids.to(dev), attention_mask=_NO_MASK.to(dev),
                             position_ids=position_ids.to(dev), past_key_values=rows, use_cache=True,
                             shared_prefix=prefix_kv, doc_context=doc_context)
    finally:
        cfg._attn_implementation = saved
    return out.last_hidden_state
