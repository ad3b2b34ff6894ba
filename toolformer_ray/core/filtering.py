"""Filtering API calls (paper, section 2, "Filtering API Calls").

    L+ = L_i(e(c, r)),   L- = min(L_i(empty), L_i(e(c, empty))),
    keep the call iff L- - L+ >= tau_f

The call is given as a PREFIX of the whole text (the base model has never seen inline calls), so:
  * L_i(empty) for every position comes from one pass per document;
  * a scored sequence only runs to i + 5 document tokens;
  * sequences with the same prefix string share one pass, whatever positions they are scored at.
Scoring sequence (DESIGN.md): [BOS if the tokenizer adds one] + tokens(prefix) + tokens(document),
each encoded on its own without special tokens. A call without a result is never kept, so it is not
scored.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from toolformer_ray.api_text import Markers, render
from toolformer_ray.core.lm import encode
from toolformer_ray.core.sampling import Candidate, TokenizedDoc
from toolformer_ray.core.scoring import NllRequest, token_nll, weighted_loss, window


@dataclass
class ScoredCall:
    cand: Candidate
    prefix_plus: str  # e(c, r) + separator: the exact prefix string of L+
    prefix_no_result: str  # e(c, empty) + separator: the exact prefix string of L-(call, no result)
    loss_plus: float
    loss_no_call: float
    loss_call_no_result: float
    tau_f: float

    @property
    def loss_minus(self) -> float:
        return min(self.loss_no_call, self.loss_call_no_result)

    @property
    def usefulness(self) -> float:
        """L- - L+: how much the call and its result lower the loss of the following tokens."""
        return self.loss_minus - self.loss_plus

    @property
    def passes(self) -> bool:
        return self.usefulness >= self.tau_f


def prefix_strings(cand: Candidate, markers: Markers, separator: str) -> tuple[str, str]:
    """(e(c, r) + separator, e(c, empty) + separator); the marker's leading space is dropped at text
    start."""
    plus = render(cand.call, markers, result=cand.result).lstrip() + separator
    no_result = render(cand.call, markers, with_result_marker=True).lstrip() + separator
    return plus, no_result


def score_candidates(model, tokenizer, docs: dict[str, TokenizedDoc], candidates: list[Candidate],
                     markers: Markers, separator: str, tau_f: dict[str, float], bos: list[int],
                     pad_id: int,
                     batch_tokens: int = 8192, log: list | None = None) -> list[ScoredCall]:
    """Losses for every candidate that has a result; one batched pass over all distinct
    sequences."""
    scorable = [c for c in candidates if c.result is not None]
    prefixes = [prefix_strings(c, markers, separator) for c in scorable]

    # One request per document (no prefix) and per distinct (document, prefix string).
    positions: dict[tuple[str, str | None], set[int]] = defaultdict(set)
    for c, (plus, no_res) in zip(scorable, prefixes):
        for key in ((c.doc_id, None), (c.doc_id, plus), (c.doc_id, no_res)):
            positions[key].add(c.token_pos)
    keys = list(positions)
    prefix_ids = {p: encode(tokenizer, p) for p in {k[1] for k in keys if k[1] is not None}}
    requests = []
    offsets = []
    for doc_id, prefix in keys:
        doc = docs[doc_id]
        head = bos + (prefix_ids[prefix] if prefix is not None else [])
        offset = len(head)  # index of document token 0 in the sequence
        targets = sorted({offset + j for i in positions[(doc_id, prefix)]
                          for j in window(i, len(doc.ids))})
        if targets and targets[0] < 1:
            raise ValueError("position 0 cannot be scored without a BOS token")
        requests.append(NllRequest(ids=head + doc.ids, targets=targets))
        offsets.append(offset)
    nll = token_nll(model, requests, pad_id, batch_tokens, log)
    by_key = {key: {t - off: v for t, v in res.items()}
              for key, res, off in zip(keys, nll, offsets)}

    scored = []
    for c, (plus, no_res) in zip(scorable, prefixes):
        n = len(docs[c.doc_id].ids)
        scored.append(ScoredCall(
            cand=c, prefix_plus=plus, prefix_no_result=no_res,
            loss_plus=weighted_loss(by_key[(c.doc_id, plus)], c.token_pos, n),
            loss_no_call=weighted_loss(by_key[(c.doc_id, None)], c.token_pos, n),
            loss_call_no_result=weighted_loss(by_key[(c.doc_id, no_res)], c.token_pos, n),
            tau_f=tau_f[c.tool]))
    return scored
