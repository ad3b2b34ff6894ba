"""Thin helpers over a Hugging Face causal LM: tokenizing, hidden states, logits only where needed,
KV caches.

The method needs the full softmax only at a few positions (p_i at document positions, the 5 weighted
tokens after a call), so the forward pass stops at the final hidden states and the LM head is
applied to the positions that matter: on a 135M model with a 49k vocabulary that is a fifth of the
FLOPs saved.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from toolformer_ray.errors import UserError

log = logging.getLogger(__name__)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens (the scoring convention of
    DESIGN.md)."""
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
    """Final-layer hidden states (after the final norm) and the cache. Inputs move to the model's
    device."""
    dev = model.device
    input_ids = input_ids.to(dev)
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    position_ids = position_ids.to(dev) if position_ids is not None else None
    out = decoder(model)(**_forward_kwargs(
        model, input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
        position_ids=position_ids, use_cache=use_cache))
    return out.last_hidden_state, out.past_key_values


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in float32 for the given hidden states (any leading shape)."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style; a no-op for Llama-family models
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def cache_from_layers(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding the given per-layer (key, value) tensors [batch, kv_heads, seq,
    head_dim]."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (k, v) in enumerate(layers):
        cache.update(k, v, layer_idx)
    return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (key, value) tensors of a cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def pad_batch(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded [B, max_len] ids. Causal attention never lets a real token see the right
    padding."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ------------------------------------------------------------------------ shared-prefix attention
# Every document of a tool is read after the same few-shot prompt, and the m samples at k positions
# of a document all continue the same document context. A plain KV cache copies the prompt's and the
# document's keys/values into every row, and concatenates the cache (another copy) at every decoding
# step. Here the context is attended to where it lies: (1) the prompt's KV once for all rows, (2)
# each document's KV from the teacher-forced pass, shared by that document's rows up to each row's
# own position, (3) each row's own new tokens, in a small preallocated buffer. The softmax parts are
# merged exactly by their log-sum-exp, so the result equals attention over the concatenated sequence
# (checked against the reference).
PREFIX_ATTENTION = "toolformer_shared_prefix"
_ATTENTION_CALLS = [0]  # calls of shared_prefix_attention: a family that bypasses it shows


class RowKV:
    """Per-row keys/values in preallocated buffers [R, kv_heads, capacity, head_dim] (no copy per
    step)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], extra: int):
        self.k = []
        self.v = []
        self.lengths = []
        for k, v in layers:
            R, H, L, D = k.shape
            kb = k.new_empty(R, H, L + extra, D)
            vb = v.new_empty(R, H, L + extra, D)
            kb[:, :, :L] = k
            vb[:, :, :L] = v
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
    """Part (2): per-document KV [D, kv_heads, L, head_dim] (from the teacher-forced pass), seen by
    each row of that document up to the row's context length. Each step the active rows are packed
    per document (slot j of document b), so the attention is one batched call over documents and its
    work follows the rows still decoding; the documents' KV itself is never copied."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], row_doc: list[int],
                 row_ctx: list[int]):
        self.kv = kv
        self.n_docs = kv[0][0].shape[0]
        self.width = kv[0][0].shape[2]
        self.row_doc = torch.tensor(row_doc, dtype=torch.long)
        self.row_ctx = torch.tensor(row_ctx, dtype=torch.long)
        self._layout = None

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.cpu()
        self.row_doc = self.row_doc[rows]
        self.row_ctx = self.row_ctx[rows]
        self._layout = None

    def layout(self, gq: int, dtype, device):
        """(slot of each active row, slots per document, additive mask [D, 1, slots * gq, L]), per
        step."""
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
            # rows allocated 16-aligned (what the CUDA kernel needs), then viewed at the real width
            aligned = -(-self.width // _MASK_ALIGN) * _MASK_ALIGN
            bias = torch.zeros(*vis.shape[:-1], aligned, dtype=dtype, device=device)
            bias = bias[..., :self.width]
            bias.masked_fill_(~vis, float("-inf"))
            self._layout = (gq, slot.to(device), per_doc, bias)
        return self._layout[1:]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix=None, doc_context: DocContext | None = None, **kwargs):
    """Attention over [shared prefix, document context, row's own tokens] as separate parts, merged
    exactly.

    query [B, H, q, d]; key/value [B, kv_heads, k, d]: the rows' own tokens (part 3), which a query
    sees causally (when q == k: a teacher-forced row, or a multi-token marker fed at once) or all of
    (q == 1: one decoding step); `attention_mask` is a placeholder. Parts 1 and 2 are visible as
    described above. Grouped-query heads are folded into the query axis instead of repeating K/V;
    each part is one fused attention call that also returns its log-sum-exp.
    """
    _ATTENTION_CALLS[0] += 1
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
        o, lse = _attend(q_rows.reshape(B * n_kv, g, Q, D),
                         key.reshape(B * n_kv, 1, K, D).expand(-1, g, -1, -1),
                         value.reshape(B * n_kv, 1, K, D).expand(-1, g, -1, -1), None, scale,
                         causal=True)
        parts = [(o.reshape(B, n_kv, gq, D), lse.reshape(B, n_kv, gq))]
    else:
        parts = [_attend(query.reshape(B, n_kv, gq, D), key, value, None, scale, fused=K > 64)]
    q = query.reshape(B, n_kv, gq, D)
    if shared_prefix is not None:
        pk, pv = shared_prefix[module.layer_idx]  # [kv, P, d]
        qp = q.permute(1, 0, 2, 3).reshape(1, n_kv, B * gq, D)
        o, lse = _attend(qp, pk[None], pv[None], None, scale)
        parts.append((o.reshape(n_kv, B, gq, D).permute(1, 0, 2, 3),
                      lse.reshape(n_kv, B, gq).permute(1, 0, 2)))
    if doc_context is not None:
        dk, dv = doc_context.kv[module.layer_idx]  # [docs, kv, L, d]
        slot, per_doc, dbias = doc_context.layout(gq, q.dtype, q.device)
        n_docs = doc_context.n_docs
        S = doc_context.n_docs * per_doc
        qd = q.new_zeros(S, n_kv, gq, D)
        qd[slot] = q
        qd = qd.view(n_docs, per_doc, n_kv, gq, D).permute(0, 2, 1, 3, 4).reshape(n_docs, n_kv,
                                                                                  per_doc * gq, D)
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


# The fused kernels of each device, each returning the log-sum-exp the parts are merged by. On CUDA:
# PyTorch's memory-efficient kernel (arbitrary additive mask, the model's dtype, no materialised
# scores); on CPU: the flash kernel. `FUSED_EVERYWHERE` (env TOOLFORMER_FUSED_ATTENTION=1) makes
# every part take the fused kernel on CPU too, so tests run the code path a GPU runs (masks, layout,
# merge).
FUSED_EVERYWHERE = os.environ.get("TOOLFORMER_FUSED_ATTENTION", "") == "1"
KERNELS_USED: set[str] = set()  # which kernels ran (the GPU check reports it)
_MASK_ALIGN = 16  # the CUDA kernel wants the mask's rows 16-element aligned


def _attend(q, k, v, bias, scale, fused: bool = True, causal: bool = False):
    """(softmax(q k^T * scale + bias) v, float32 log-sum-exp of the scores). The fused CPU kernel
    wins on long keys; plain float32 math wins on a few keys (a row's own new tokens), unless
    FUSED_EVERYWHERE."""
    if q.device.type == "cuda":
        try:
            return _attend_cuda(q, k, v, bias, scale, causal)
        except RuntimeError as e:  # an unsupported shape/dtype: exact math below, said once
            if "math" not in KERNELS_USED:
                log.warning("fused CUDA attention unavailable (%s); using float32 math",
                            str(e)[:200])
    elif fused or causal or FUSED_EVERYWHERE:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        KERNELS_USED.add("cpu-flash")
        return out, lse.float()
    KERNELS_USED.add("math")
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(),
                          float("-inf"))
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.float(), lse


def _attend_cuda(q, k, v, bias, scale, causal):
    B, H, Q, _ = q.shape
    K = k.shape[2]
    k = k.expand(B, H, K, -1)
    v = v.expand(B, H, K, -1)
    if 0 in k.stride()[:2]:  # grouped heads expanded over the (few) own tokens: give real strides
        k = k.contiguous()
        v = v.contiguous()
    if bias is not None:
        bias = bias.to(q.dtype)
        if bias.stride(-2) % _MASK_ALIGN or bias.stride(-1) != 1:
            padded = bias.new_zeros(*bias.shape[:-1], -(-K // _MASK_ALIGN) * _MASK_ALIGN)
            padded[..., :K] = bias
            bias = padded[..., :K]
        bias = bias.expand(B, H, Q, K)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.contiguous(), k, v, bias, True, 0.0, causal, scale=scale)
    KERNELS_USED.add("cuda-efficient")
    return out, lse[..., :Q].float()


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)


_register()


# --------------------------------------------------------------------- which families, which path
# The shared-prefix attention above reimplements the attention step; it is exact only for plain
# causal softmax attention with the model's own position encoding applied before it (RoPE of any
# static kind, learned absolute positions). Everything else goes through plain forwards of the whole
# sequences (`plain_hidden`, `PlainContext`; slower, exact by construction) or is refused. Never
# different numbers.
SELF_CHECK_TOL = 1e-3  # max |log p diff|, float32
_SELF_CHECK_LEN = 64
_SELF_CHECK_PREFIX = 12


class UnsupportedModel(UserError, ValueError):
    """A model family neither path serves exactly: one line naming the feature."""


@dataclass(frozen=True)
class AttentionPlan:
    mode: str  # "fast" (shared-prefix attention) or "plain" (plain forwards of whole sequences)
    reason: str  # why not fast ("" when fast)
    max_context: int | None  # longer contexts change the model's RoPE: refused at run time
    self_check_max_diff: float | None  # of the path chosen, vs a plain forward (max |log p diff|)

    def to_dict(self) -> dict:
        return asdict(self)


def fast_path_obstacle(config) -> str | None:
    """The first feature of this config the shared-prefix attention does not implement, or None."""
    attn_cfg = getattr(config, "attn_config", None)
    alibi = getattr(config, "alibi", None) or (
        attn_cfg.get("alibi") if isinstance(attn_cfg, dict) else getattr(attn_cfg, "alibi", None))
    if config.model_type in ("bloom", "mpt") or alibi:
        return "ALiBi position biases"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if window or "sliding_attention" in layer_types:
        return f"sliding-window attention (window {window})"
    if getattr(config, "attention_chunk_size", None) or "chunked_attention" in layer_types:
        return "chunked attention"
    if config.model_type in ("gpt_oss",) or getattr(config, "attention_sinks", None):
        return "attention sinks"
    return None


def rope_switch_length(config) -> int | None:
    """Context length at which the RoPE frequencies change (dynamic NTK, LongRoPE), or None."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind in ("dynamic", "longrope"):
        return int(rope.get("original_max_position_embeddings")
                   or getattr(config, "original_max_position_embeddings", None)
                   or config.max_position_embeddings)
    return None


def attention_plan(model) -> AttentionPlan:
    """The path this model is served by, decided once per loaded model (`prepare_model`)."""
    plan = getattr(model, "_toolformer_attention", None)
    return plan if plan is not None else prepare_model(model)


def plain_path(model) -> bool:
    return attention_plan(model).mode == "plain"


def prepare_model(model) -> AttentionPlan:
    """Decide the path for a loaded model: the fast path if its config has no feature the fast path
    lacks AND it passes a self-check (fast path vs a plain forward on a few dozen random tokens, on
    a float32 twin of the model: `_float32_twin`); else plain forwards, if those pass their own
    self-check; else refuse (UnsupportedModel). Logs once when not fast; the plan is kept on the
    model."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{cfg.model_type} is an encoder-decoder model; a causal LM is "
                               "needed")
    switch = rope_switch_length(cfg)
    reason = fast_path_obstacle(cfg)
    diff = None
    twin = _float32_twin(model)
    if reason is None:
        try:
            diff = _self_check_fast(twin)
        except Exception as e:  # a family whose attention modules do not fit the fast path at all
            reason = f"fast path self-check failed: {type(e).__name__}: {str(e)[:120]}"
        else:
            if diff > SELF_CHECK_TOL:
                reason = f"fast path self-check: max |log p diff| {diff:.3g} vs a plain forward"
    if reason is None:
        plan = AttentionPlan("fast", "", switch, diff)
    else:
        try:
            diff = _self_check_plain(twin)
        except Exception as e:
            failed = f"{type(e).__name__}: {str(e)[:120]}"
            raise UnsupportedModel(f"{cfg.model_type} is not supported: {reason}, and plain "
                                   f"forwards failed ({failed})") from None
        if diff > SELF_CHECK_TOL:
            raise UnsupportedModel(f"{cfg.model_type} is not supported: {reason}, and batched "
                                   f"plain forwards differ from single ones by {diff:.3g}")
        plan = AttentionPlan("plain", reason, switch, diff)
        log.warning("%s: %s; using exact plain forwards (slower)", cfg.model_type, reason)
    model._toolformer_attention = plan
    return plan


def check_context(model, length: int) -> None:
    """Refuse a context the model's RoPE would encode differently from a shorter one (one line)."""
    limit = rope_switch_length(model.config)
    if limit is not None and length > limit:
        raise UnsupportedModel(f"{model.config.model_type}: a context of {length} tokens exceeds "
                               f"{limit}, where its RoPE scaling switches frequencies; shorten "
                               "corpus.max_doc_tokens or the tool prompts")


def _float32_twin(model):
    """A float32 model of the same class and config (two layers, small vocabulary, random weights
    with peaked predictions) on the same device: the paths depend on the family's code and config,
    not on the weights, and in bf16 rounding noise (~0.5 in log p on a 135M model) would hide a
    wrong path."""
    cfg = copy.deepcopy(model.config)
    n = min(2, cfg.num_hidden_layers)
    cfg.num_hidden_layers = n
    for attr in ("layer_types", "block_types"):
        if isinstance(getattr(cfg, attr, None), list):
            setattr(cfg, attr, getattr(cfg, attr)[:n])
    cfg.vocab_size = min(cfg.vocab_size, 512)
    cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = None
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(model.device):  # callers' RNG untouched
        torch.manual_seed(0)
        twin = type(model)._from_config(cfg, dtype=torch.float32).eval()
    std = min(1.0, 4.0 / getattr(cfg, "hidden_size", 16) ** 0.5)  # logits of std ~4: peaked
    with torch.no_grad():
        for emb in {twin.get_input_embeddings().weight, twin.get_output_embeddings().weight}:
            emb.normal_(0.0, std, generator=torch.Generator(emb.device).manual_seed(0))
    return twin


def _log_probs(model, hidden):
    return torch.log_softmax(logits_from_hidden(model, hidden), -1)


@torch.inference_mode()
def _self_check_fast(model) -> float:
    """max |log p diff| of the fast path (teacher-forced rows after a shared prefix, then rows
    continuing a document context with a multi-token feed and a one-token step) vs one plain
    forward."""
    n = _SELF_CHECK_LEN
    P = _SELF_CHECK_PREFIX
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
    ref = _log_probs(model, hidden_states(model, seq)[0])[0]
    _, cache = hidden_states(model, seq[:, :P], use_cache=True)
    prefix_kv = [(k[0], v[0]) for k, v in cache_layers(cache)]
    calls = _ATTENTION_CALLS[0]
    rows = RowKV.empty(model, 1, n - P)
    h = prefix_forward(model, seq[:, P:n - 8], rows, prefix_kv, P + torch.arange(n - P - 8)[None])
    if _ATTENTION_CALLS[0] == calls:
        raise RuntimeError("the model's attention does not go through the attention interface")
    diff = (_log_probs(model, h[0]) - ref[P:n - 8]).abs().max()
    ctx = [n - P - 14, n - P - 10]  # two rows continuing the document at different positions
    context = DocContext(rows.layers(), [0, 0], ctx)
    own = RowKV.empty(model, 2, 3)
    feed = torch.stack([seq[0, P + c:P + c + 2] for c in ctx])
    pos = torch.tensor([[P + c, P + c + 1] for c in ctx])
    h2 = prefix_forward(model, feed, own, prefix_kv, pos, context)
    step = torch.stack([seq[0, P + c + 2:P + c + 3] for c in ctx])
    h3 = prefix_forward(model, step, own, prefix_kv, pos[:, -1:] + 1, context)
    for b, c in enumerate(ctx):
        got = _log_probs(model, torch.cat([h2[b], h3[b]]))
        diff = torch.maximum(diff, (got - ref[P + c:P + c + 3]).abs().max())
    return float(diff)


@torch.inference_mode()
def _self_check_plain(model) -> float:
    """max |log p diff| of the plain paths (a right-padded batch; left-padded rows continued from
    the model's cache, one of them leaving the batch) vs one plain forward per sequence."""
    n = _SELF_CHECK_LEN
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (L,), generator=g).tolist()
            for L in (n, n - 7, n - 3)]
    refs = [_log_probs(model, hidden_states(model, torch.tensor([s]))[0])[0] for s in seqs]
    h = plain_hidden(model, seqs)
    diff = max(float((_log_probs(model, h[b, :len(s)]) - r).abs().max())
               for b, (s, r) in enumerate(zip(seqs, refs)))
    ctx = PlainContext(model, [s[:len(s) - 4] for s in seqs])
    h2 = ctx.forward(torch.tensor([s[len(s) - 4:len(s) - 2] for s in seqs]))
    for b, (s, r) in enumerate(zip(seqs, refs)):
        diff = max(diff, float((_log_probs(model, h2[b]) - r[len(s) - 4:len(s) - 2]).abs().max()))
    kept = [0, 2]  # row 1 finished: it leaves the batch
    ctx.keep(torch.tensor(kept))
    h3 = ctx.forward(torch.tensor([seqs[b][len(seqs[b]) - 2:len(seqs[b]) - 1] for b in kept]))
    for j, b in enumerate(kept):
        got = _log_probs(model, h3[j])
        diff = max(diff, float((got - refs[b][len(seqs[b]) - 2:len(seqs[b]) - 1]).abs().max()))
    return diff


# ------------------------------------------------------------------------------ plain-forward path
def _forward_kwargs(model, **kwargs) -> dict:
    """Drop position_ids for models without them (ALiBi families take positions from the mask)."""
    params = inspect.signature(decoder(model).forward).parameters
    if "position_ids" not in params:
        kwargs.pop("position_ids", None)
    return kwargs


@torch.inference_mode()
def plain_hidden(model, rows: list[list[int]]) -> torch.Tensor:
    """Final hidden states [B, W, H] of whole sequences, right-padded with a 2D mask (causal
    attention keeps padding out of real tokens' way): the model's own forward, all its features."""
    check_context(model, max(len(r) for r in rows))
    ids = pad_batch(rows, 0)
    mask = torch.zeros(ids.shape, dtype=torch.long)
    for b, r in enumerate(rows):
        mask[b, :len(r)] = 1
    out = decoder(model)(**_forward_kwargs(model, input_ids=ids.to(model.device),
                                           attention_mask=mask.to(model.device), use_cache=False))
    return out.last_hidden_state


class PlainContext:
    """Rows continuing their own contexts through plain forwards: the first feed encodes each row's
    whole context (left-padded, explicit positions, as `generate` does), later feeds go on from the
    model's own cache. Stands in for DocContext when the model is on the plain path."""

    def __init__(self, model, contexts: list[list[int]]):
        self.model = model
        self.contexts = contexts
        self.cache = self.mask = self.next_pos = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        dev = self.model.device
        R, q = input_ids.shape
        if self.cache is None:
            seqs = [c + ids for c, ids in zip(self.contexts, input_ids.tolist())]
            width = max(len(s) for s in seqs)
            check_context(model, width)
            ids = torch.zeros(R, width, dtype=torch.long)
            self.mask = torch.zeros(R, width, dtype=torch.long)
            pos = torch.zeros(R, width, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, width - len(s):] = torch.tensor(s)
                self.mask[b, width - len(s):] = 1
                pos[b, width - len(s):] = torch.arange(len(s))
            self.next_pos = torch.tensor([len(s) for s in seqs])
            self.cache = DynamicCache(config=model.config)
        else:
            check_context(model, int(self.next_pos.max()) + q)
            ids = input_ids
            self.mask = torch.cat([self.mask, torch.ones(R, q, dtype=torch.long)], 1)
            pos = self.next_pos[:, None] + torch.arange(q)
            self.next_pos = self.next_pos + q
        out = decoder(model)(**_forward_kwargs(
            model, input_ids=ids.to(dev), attention_mask=self.mask.to(dev),
            position_ids=pos.to(dev), past_key_values=self.cache, use_cache=True))
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -q:]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows.to(self.model.device))
        self.mask = self.mask[rows.cpu()]
        self.next_pos = self.next_pos[rows.cpu()]


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask makes HF skip its own mask building


def prefix_forward(model, input_ids: torch.Tensor, rows: RowKV, prefix_kv,
                   position_ids: torch.Tensor,
                   doc_context: DocContext | None = None) -> torch.Tensor:
    """Final hidden states of `input_ids` [R, q] attending to the shared prefix (all of it), to the
    rows' document context if given, and to each row's own tokens (causally); appends their
    keys/values to `rows`. Either rows are empty and q tokens are fed at once, or one token per row
    is fed per step."""
    if isinstance(doc_context, PlainContext):  # the plain path (attention_plan)
        return doc_context.forward(input_ids)
    check_context(model, int(position_ids.max()) + 1)
    dev = model.device
    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = PREFIX_ATTENTION
    try:
        out = decoder(model)(input_ids=input_ids.to(dev), attention_mask=_NO_MASK.to(dev),
                             position_ids=position_ids.to(dev), past_key_values=rows,
                             use_cache=True,
                             shared_prefix=prefix_kv, doc_context=doc_context)
    finally:
        cfg._attn_implementation = saved
    return out.last_hidden_state
