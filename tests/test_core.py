"""The fast batched core against the brute-force reference (core/reference.py), on the tiny model in
fp32."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from toolformer_ray.api_text import ApiCall, Markers, find_calls, strip_calls
from toolformer_ray.config import ToolConfig
from toolformer_ray.core.annotate import Annotator
from toolformer_ray.core.filtering import ScoredCall, score_candidates
from toolformer_ray.core.lm import bos_ids
from toolformer_ray.core.merge import merge_documents
from toolformer_ray.core.reference import (context_ids_ref, loss_text_ref, prefix_ref, prompt_ref,
                                           render_ref, sample_ref, start_logprob_ref)
from toolformer_ray.core.sampling import (Candidate, DecodeRow, decode_calls, select_positions,
                                          split_prompt, start_pass, tokenize_doc)
from toolformer_ray.core.scoring import WEIGHTS, loss_weights
from toolformer_ray.core.types import Document
from toolformer_ray.models import load_model
from toolformer_ray.tools.base import Tool

from caller_model import arithmetic_sentence, caller_model_dir

TOL = 1e-4
LOG_TOL = 2e-4  # on log p_i: float32 batched vs one full forward
ARITH = [arithmetic_sentence(random.Random(s), with_call=False) for s in range(4)]
TEXTS = [
    "The Nile is 6,650 km long and flows through 11 countries.",
    "Out of 1400 participants, 400 (or 29%) passed the test.",
    "Tokyo became the capital in 1868; Kyoto had been the capital before.",
    "Zoë bought 3 apples for $1.50 each — a total of $4.50.",
    "He was born on 4 July 1804 in Salem, Massachusetts.",
]


class PromptTool(Tool):
    name = "Calculator"

    def prompt(self) -> str:
        return ("Your task is to add calls to a Calculator API to a piece of text.\n"
                "Input: The total is 5 + 7 = 12.\nOutput: The total is 5 + 7 = [Calculator(5 + 7)] "
                "12.\nInput: {text}\nOutput: ")

    def run(self, inputs, dates=None):
        return [str(len(x)) for x in inputs]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny", dtype="float32")


@pytest.fixture(scope="module")
def caller():
    """A tiny model that puts real mass on " [" and writes Calculator calls
    (tests/caller_model.py)."""
    return load_model(str(caller_model_dir()), dtype="float32")


def with_bos(tokenizer):
    """A copy of the tokenizer that adds BOS to plain text (as Llama's does), to test that path."""
    t = copy.deepcopy(tokenizer)
    bos = t.bos_token
    t._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                     special_tokens=[(bos, t.bos_token_id)])
    assert bos_ids(t) == [t.bos_token_id]
    return t


def make_docs(texts=TEXTS):
    return [Document(doc_id=f"d{i}", text=t, source_id=f"s{i}") for i, t in enumerate(texts)]


def test_loss_weights_are_the_papers():
    assert WEIGHTS == pytest.approx([1 / 3, 4 / 15, 1 / 5, 2 / 15, 1 / 15], abs=1e-12)
    assert sum(loss_weights()) == pytest.approx(1.0)


def test_char_positions_match_token_prefixes(tiny):
    tok = tiny.tokenizer
    for text in TEXTS + ["naïve café 😀 emoji, ünïcödé and  double  spaces", "a[b] ->c ]x"]:
        td = tokenize_doc(tok, text)
        assert td.char_pos[0] == 0
        for i, cp in enumerate(td.char_pos):
            if cp is not None:
                assert tok.decode(td.ids[:i]) == text[:cp], (text, i)


def test_calls_never_go_inside_a_word_or_number(tiny):
    text = "Out of 1400 participants, 400 (29%) passed; Calculator-style tokenization splits 323."
    td = tokenize_doc(tiny.tokenizer, text)
    usable = [cp for cp in td.char_pos if cp is not None]
    assert usable and len(usable) < len(td.ids)
    for cp in usable:
        assert cp == 0 or not (text[cp - 1].isalnum() and text[cp].isalnum()), text[:cp]
        assert cp == 0 or not text[cp - 1].isspace(), text[:cp]  # " [Call()]" never doubles a space
    assert text.index(" 323") in usable  # the call goes before the number, not inside it


def test_split_prompt_rerenders_example_calls_with_configured_markers():
    prompt = PromptTool().prompt()
    before, after = split_prompt(prompt, Markers())
    assert before.endswith("Input: ") and after == "\nOutput: "
    markers = Markers(start=" <API>", result=" →", end="</API>")
    before2, _ = split_prompt(prompt, markers)
    assert "<API>Calculator(5 + 7)</API>" in before2 and "[Calculator" not in before2


@pytest.mark.parametrize("model_name,markers,bos", [
    ("caller", Markers(), False), ("caller", Markers(), True),
    ("tiny", Markers(start=" <API>", result=" =>", end="</API>"), False)],
    ids=["one-token-marker", "one-token-marker-bos", "multi-token-marker"])
@pytest.mark.slow
def test_start_probabilities_match_reference(request, model_name, markers, bos):
    """log p_i of the fast pass equals the reference's, which builds [P(x), x_<i] from the raw
    prompt text ("Output: " with its space, then x) and tokenizes it whole. In log space: most p_i
    are tiny."""
    lm = request.getfixturevalue(model_name)
    model, tok = lm.model, (with_bos(lm.tokenizer) if bos else lm.tokenizer)
    ann = Annotator(model, tok, {"Calculator": PromptTool()},
                    {"Calculator": ToolConfig(tau_s=0.0, k=3, m=2)},
                    markers)
    prompt = ann.prompts["Calculator"]
    docs = make_docs(ARITH[:3] + TEXTS[:2])
    tds = [tokenize_doc(tok, d.text) for d in docs]
    sp = start_pass(model, tok, prompt, tds, [d.text for d in docs], ann.marker_ids[0], ann.pad_id)
    probs = ann._full_marker_probs(sp, tds) if len(ann.marker_ids) > 1 else sp.probs
    ref_prompt = prompt_ref(PromptTool().prompt(), markers.start, markers.result, markers.end)
    checked = []
    for d, td, p in zip(docs, tds, probs):
        for i in range(ann.min_pos, len(td.ids)):
            if td.char_pos[i] is None:
                continue
            ref = start_logprob_ref(model, tok, ref_prompt, d.text, i, markers.start)
            assert math.log(p[i]) == pytest.approx(ref, abs=LOG_TOL), (d.text, i)
            checked.append(p[i])
    assert (ann.min_pos == 0) == bos and len(checked) > 40
    if model_name == "caller":
        assert max(checked) > 0.05  # real mass on " [": the comparison is not between two zeros


def test_select_positions_threshold_and_top_k():
    td = tokenize_doc.__globals__["TokenizedDoc"](ids=list(range(6)),
                                                  char_pos=[0, 1, None, 3, 4, 5])
    probs = [0.9, 0.2, 0.8, 0.05, 0.3, 0.3]
    assert select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [4, 5] or \
        select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [1, 4]
    # ties broken by earlier position: 0.3 at 4 and 5, both above 0.2 at 1
    assert select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [4, 5]
    assert select_positions(probs, td, tau_s=0.05, k=10, min_pos=0) == [0, 1, 4, 5]  # strict > tau_s; 2 unusable


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampled_continuations_match_reference(caller, temperature):
    """Decoding from slices of the batched pass's KV cache (finished rows dropped) gives the same
    continuations as sampling each row alone with full forwards over the raw-text context and the
    same random stream."""
    model, tok = caller.model, caller.tokenizer
    markers = Markers()
    ann = Annotator(model, tok, {"Calculator": PromptTool()}, {"Calculator": ToolConfig()}, markers)
    prompt = ann.prompts["Calculator"]
    docs = make_docs(ARITH[:3] + TEXTS[:1])
    tds = [tokenize_doc(tok, d.text) for d in docs]
    sp = start_pass(model, tok, prompt, tds, [d.text for d in docs], ann.marker_ids[0],
                    tok.pad_token_id)
    rng = random.Random(1)
    rows, where = [], []
    for b, td in enumerate(tds):
        usable = [i for i in range(1, len(td.ids)) if td.char_pos[i] is not None]
        for i in [rng.choice(usable), max(usable, key=lambda i: sp.probs[b][i])]:
            for j in range(2):
                rows.append(DecodeRow(doc=b, ctx_len=sp.ctx_at[b][i], seed_key=f"{b}|{i}|{j}"))
                where.append((b, i))
    outs = decode_calls(model, tok, sp, rows, ann.marker_ids, markers, seed=7,
                        temperature=temperature,
                        top_p=1.0, max_tokens=8, eos_id=tok.eos_token_id)
    ref_prompt = prompt_ref(PromptTool().prompt())
    for r, (b, i), out in zip(rows, where, outs):
        context = context_ids_ref(tok, ref_prompt, docs[b].text, i)
        ref = sample_ref(model, tok, context, 7, r.seed_key, temperature, 8)
        assert out.text == ref
    assert any(out.text.startswith("Calculator(") for out in outs)  # the model writes calls here


def _random_candidates(docs, tds, rng, n_per_doc=6, min_pos=1):
    cands = []
    calls = [ApiCall("Calculator", "400 / 1400"), ApiCall("Calculator", "12 * 3"),
             ApiCall("WikiSearch", "Nile"),
             ApiCall("Calendar", "")]
    results = ["0.29", "36", "The Nile is a river in Africa.", "Today is Monday, January 30, 2023."]
    for d, td in zip(docs, tds):
        for n in range(n_per_doc):
            i = min_pos if n == 0 else rng.randrange(min_pos, len(td.ids))
            if td.char_pos[i] is None:
                continue
            k = rng.randrange(len(calls))
            cands.append(Candidate(doc_id=d.doc_id, tool=calls[k].tool, token_pos=i,
                                   char_pos=td.char_pos[i],
                                   p_api=rng.random(), call=calls[k],
                                   result=rng.choice([results[k], None]
                                                                                        if k == 1 else [results[k]])))
    return cands


@pytest.mark.parametrize("separator,bos,attention", [("\n", False, "sdpa"), (" ", False, "sdpa"),
                                                     ("\n", True, "eager")])
def test_losses_match_reference(tiny, separator, bos, attention):
    """Packed scoring (several sequences to a row) equals one plain forward per sequence, whose
    prefix the reference renders and tokenizes itself; under eager attention too (it adds the mask
    to the scores)."""
    model, tok = tiny.model, (with_bos(tiny.tokenizer) if bos else tiny.tokenizer)
    markers = Markers()
    docs = make_docs()
    tds = {d.doc_id: tokenize_doc(tok, d.text) for d in docs}
    rng = random.Random(3)
    cands = _random_candidates(docs, [tds[d.doc_id] for d in docs], rng, min_pos=0 if bos else 1)
    tau = {"Calculator": 0.5, "WikiSearch": 1.0, "Calendar": 1.0}
    saved = model.config._attn_implementation
    model.config._attn_implementation = attention
    try:
        # a small batch budget forces several batches of different widths, and packs rows
        log: list = []
        scored = score_candidates(model, tok, tds, cands, markers, separator, tau, bos_ids(tok),
                                  tok.pad_token_id, batch_tokens=300, log=log)
        assert len(scored) == sum(c.result is not None for c in cands)
        width = max(max(e[1]) for e in log)  # every row is as wide as the longest sequence
        assert any(len(e[1]) > 300 // width for e in log)  # so some row holds several sequences
        assert any(s.cand.token_pos == 0 for s in scored) == bos
        for s in scored:
            c = s.cand
            text = docs[int(c.doc_id[1:])].text
            plus = prefix_ref(c.call.tool, c.call.input, c.result, separator)
            nores = prefix_ref(c.call.tool, c.call.input, None, separator)
            assert (s.prefix_plus, s.prefix_no_result) == (plus, nores)
            assert s.loss_plus == pytest.approx(loss_text_ref(model, tok, plus, text, c.token_pos), abs=TOL)
            assert s.loss_no_call == pytest.approx(loss_text_ref(model, tok, "", text, c.token_pos), abs=TOL)
            assert s.loss_call_no_result == pytest.approx(loss_text_ref(model, tok, nores, text, c.token_pos),
                                                          abs=TOL)
    finally:
        model.config._attn_implementation = saved


def test_kept_set_matches_reference_end_to_end(tiny):
    """Sample with the annotator, fill results, score; the kept set equals the reference's
    decisions."""
    model, tok = tiny.model, tiny.tokenizer
    markers = Markers()
    bos = bos_ids(tok)
    docs = make_docs()
    texts = {d.doc_id: d.text for d in docs}
    tds = {d.doc_id: tokenize_doc(tok, d.text) for d in docs}
    cands = _random_candidates(docs, list(tds.values()), random.Random(5), n_per_doc=8)
    cands = [c for c in cands if c.result is not None]
    ref_useful = []
    for c in cands:
        text, i = texts[c.doc_id], c.token_pos
        lp = loss_text_ref(model, tok, prefix_ref(c.call.tool, c.call.input, c.result, "\n"), text,
                           i)
        le = loss_text_ref(model, tok, "", text, i)
        ln = loss_text_ref(model, tok, prefix_ref(c.call.tool, c.call.input, None, "\n"), text, i)
        ref_useful.append(min(le, ln) - lp)
    # a threshold in the middle of the widest gap, so float noise cannot flip a decision
    vals = sorted(ref_useful)
    gaps = [(vals[k + 1] - vals[k], (vals[k + 1] + vals[k]) / 2) for k in range(len(vals) - 1)]
    mid = max(gaps[len(gaps) // 4: 3 * len(gaps) // 4 + 1])[1]
    tau = {"Calculator": mid, "WikiSearch": mid, "Calendar": mid}
    scored = score_candidates(model, tok, tds, cands, markers, "\n", tau, bos, tok.pad_token_id)
    assert [s.passes for s in scored] == [u >= mid for u in ref_useful]
    assert 0 < sum(s.passes for s in scored) < len(scored)


@pytest.mark.slow
def test_annotator_sample_is_deterministic_and_counts_funnel(caller):
    model, tok = caller.model, caller.tokenizer
    tcfg = {"Calculator": ToolConfig(tau_s=0.0, k=3, m=4, prefilter=False)}
    ann = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1,
                    max_call_tokens=8,
                    batch_docs=2, batch_rows=5)
    docs = make_docs(ARITH[:3] + TEXTS[:2])
    a = ann.sample(docs)
    b = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1,
                  max_call_tokens=8,
                  batch_docs=5, batch_rows=64).sample(docs)
    # one document per pass, all passes pooled into one decoding batch (merge_passes)
    c = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1,
                  max_call_tokens=8,
                  batch_docs=1, batch_rows=1000).sample(docs)
    key = [(c.doc_id, c.token_pos, c.call) for c in a.candidates]
    assert len({k[0] for k in key}) >= 2  # calls in several documents: the comparisons below are not empty
    assert key == [(c.doc_id, c.token_pos, c.call) for c in b.candidates]
    assert key == [(x.doc_id, x.token_pos, x.call) for x in c.candidates]
    assert [x.p_api for x in a.candidates] == pytest.approx([x.p_api for x in c.candidates], abs=1e-5)
    f = a.funnel["Calculator"]
    assert f["docs_seen"] == 5 and f["docs_prefiltered"] == 5
    assert f["positions_sampled"] == 15 and f["calls_sampled"] == 60
    assert 0 < f["calls_distinct"] == len(a.candidates) <= f["calls_well_formed"] <= 60
    usable = sum(sum(cp is not None for cp in tokenize_doc(tok, d.text).char_pos[1:]) for d in docs)
    assert len(a.p_api["Calculator"]) == usable  # every usable position (not position 0: no BOS)


def _scored(doc_id, tool, pos, char_pos, useful, inp="1+1", result="2"):
    c = Candidate(doc_id=doc_id, tool=tool, token_pos=pos, char_pos=char_pos, p_api=0.5,
                  call=ApiCall(tool, inp), result=result)
    return ScoredCall(cand=c, prefix_plus="", prefix_no_result="", loss_plus=1.0,
                      loss_no_call=1.0 + useful,
                      loss_call_no_result=5.0, tau_f=1.0)


def test_merge_one_call_per_position_cap_in_document_order_and_round_trip():
    markers = Markers()
    docs = [Document("a", "It costs 12 dollars in total."),
            Document("b", "Then 7 more were added."),
            Document("c", "Seven came.")]
    scored = [
        _scored("c", "WikiSearch", 0, 0, 2.0, "seven", "7"),  # at the start: no leading space
        _scored("a", "Calculator", 3, 8, 2.0, "3*4", "12"),
        _scored("a", "WikiSearch", 3, 8, 3.0, "dollar", "US currency"),  # same position, more useful: wins
        _scored("a", "Calculator", 5, 19, 0.5),  # below tau_f
        _scored("b", "Calculator", 2, 4, 1.5, "5+2", "7"),
        _scored("b", "Calculator", 4, 16, 1.2, "7", "7"),
    ]
    merged, used = merge_documents(docs, scored, markers, {"Calculator": 1, "WikiSearch": None})
    assert merged[0].augmented_text == "It costs [WikiSearch(dollar) -> US currency] 12 dollars in total."
    assert merged[1].augmented_text == "Then [Calculator(5+2) -> 7] 7 more were added."  # cap 1: first in order
    assert merged[2].augmented_text == render_ref("WikiSearch", "seven", "7").lstrip() + "Seven came."
    assert used == {"Calculator": 1, "WikiSearch": 2}
    for m in merged:
        assert strip_calls(m.augmented_text, markers) == m.doc.text
        assert [f.call for f in find_calls(m.augmented_text, markers)] == [s.cand.call for s in m.calls]
