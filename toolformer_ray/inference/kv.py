"""The KV cache of the rows decoding together, and their 2-D attention mask (0 = padding or a hole).

Rows are left-padded; position ids are passed explicitly (the count of real tokens), so padding and
holes are invisible to the model: the result equals decoding each row alone, up to float rounding.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dimension -2 (the sequence of a [batch, heads, seq, dim] cache tensor) on the left."""
    return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x


class KVBatch:
    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.cache = DynamicCache(config=model.config)
        self.mask: torch.Tensor | None = None  # [rows, cache length]

    @property
    def can_merge(self) -> bool:
        # Merging rows into a live cache needs plain full-attention layers (true for Llama-family
        # models).
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def add(self, seqs: list[list[int]]) -> torch.Tensor:
        """Prefill new rows (appended after the current ones); returns their next-token logits."""
        width = max(len(s) for s in seqs)
        dev = self.model.device
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        if self.mask is None:
            self.cache = cache
            self.mask = mask
        else:
            self._merge(cache, mask)
        return out.logits[:, -1].float()

    def _merge(self, cache, mask: torch.Tensor) -> None:
        a = self.mask.shape[1]
        b = mask.shape[1]
        width = max(a, b)
        layers = []
        for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, cache):
            layers.append((torch.cat([_left_pad(k1, width - a), _left_pad(k2, width - b)]),
                           torch.cat([_left_pad(v1, width - a), _left_pad(v2, width - b)])))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - a, 0)),
                               torch.nn.functional.pad(mask, (width - b, 0))])

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        # Drop leading columns that no remaining row uses (they were padding of rows that left).
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0 and self.can_merge:
            self.cache = DynamicCache(
                ddp_cache_data=[(k[:, :, first:], v[:, :, first:]) for k, v, *_ in self.cache])
            self.mask = self.mask[:, first:]

    def step(self, tokens: list[int | None], positions: list[int]) -> torch.Tensor:
        """Feed one token per row (None = a masked hole); returns next-token logits."""
        dev = self.model.device
        ids = torch.tensor([[self.pad_id if t is None else t] for t in tokens], device=dev)
        col = torch.tensor([[0 if t is None else 1] for t in tokens], device=dev)
        self.mask = torch.cat([self.mask, col], dim=1)
        pos = torch.tensor([[p] for p in positions], device=dev)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()
