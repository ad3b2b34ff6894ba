"""The fast batched core against the brute-force reference (tests/reference.py), on the tiny model in fp32."""
from __future__ import annotations

import random

import pytest
import torch

from toolformer_ray.api_text import ApiCall, Markers, find_calls, strip_calls
from toolformer_ray.config import ToolConfig
from toolformer_ray.core.annotate import Annotator
from toolformer_ray.core.filtering import ScoredCall, score_candidates
from toolformer_ray.core.lm import bos_ids, encode
from toolformer_ray.core.merge import merge_documents
from toolformer_ray.core.sampling import (Candidate, DecodeRow, ToolPrompt, decode_calls, select_positions,
                                          split_prompt, start_pass, tokenize_doc)
from toolformer_ray.core.scoring import WEIGHTS, loss_weights
from toolformer_ray.core.types import Document
from toolformer_ray.models import load_model
from toolformer_ray.tools.base import Tool

from reference import (loss_ref, p_api_ref, prefix_string_ref, sample_ref, start_probs_ref)

TOL = 1e-4
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
                "Input: The total is 5 + 7 = 12.\nOutput: The total is 5 + 7 = [Calculator(5 + 7)] 12.\n"
                "Input: {text}\nOutput: ")

    def run(self, inputs, dates=None):
        return [str(len(x)) for x in inputs]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny", dtype="float32")


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


@pytest.mark.parametrize("markers", [Markers(), Markers(start=" <API>", result=" =>", end="</API>")],
                         ids=["one-token-marker", "multi-token-marker"])
def test_start_probabilities_match_reference(tiny, markers):
    model, tok = tiny.model, tiny.tokenizer
    bos = bos_ids(tok)
    prompt = ToolPrompt.build("Calculator", PromptTool().prompt(), tok, markers, bos)
    marker_ids = encode(tok, markers.start)
    assert (len(marker_ids) > 1) == (markers.start != " [")
    docs = make_docs()
    ann = Annotator(model, tok, {"Calculator": PromptTool()}, {"Calculator": ToolConfig(tau_s=0.0, k=3, m=2)},
                    markers)
    tds = [tokenize_doc(tok, d.text) for d in docs]
    sp = start_pass(model, tok, prompt, tds, [d.text for d in docs], marker_ids[0], ann.pad_id)
    probs = ann._full_marker_probs(sp, tds) if len(marker_ids) > 1 else sp.probs
    for d, td, p in zip(docs, tds, probs):
        ref = start_probs_ref(model, prompt.prefix_ids, prompt.input_ids(tok, d.text), td.ids, marker_ids)
        assert p == pytest.approx(ref, abs=TOL, rel=TOL)


def test_select_positions_threshold_and_top_k():
    td = tokenize_doc.__globals__["TokenizedDoc"](ids=list(range(6)), char_pos=[0, 1, None, 3, 4, 5])
    probs = [0.9, 0.2, 0.8, 0.05, 0.3, 0.3]
    assert select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [4, 5] or \
        select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [1, 4]
    # ties broken by earlier position: 0.3 at 4 and 5, both above 0.2 at 1
    assert select_positions(probs, td, tau_s=0.1, k=2, min_pos=1) == [4, 5]
    assert select_positions(probs, td, tau_s=0.05, k=10, min_pos=0) == [0, 1, 4, 5]  # strict > tau_s; 2 unusable


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampled_continuations_match_reference(tiny, temperature):
    """Decoding from slices of the batched pass's KV cache (left-padded, finished rows dropped) gives the
    same continuations as sampling each row alone with full forwards and the same random stream."""
    model, tok = tiny.model, tiny.tokenizer
    markers = Markers()
    bos = bos_ids(tok)
    prompt = ToolPrompt.build("Calculator", PromptTool().prompt(), tok, markers, bos)
    marker_ids = encode(tok, markers.start)
    docs = make_docs()
    tds = [tokenize_doc(tok, d.text) for d in docs]
    sp = start_pass(model, tok, prompt, tds, [d.text for d in docs], marker_ids[0], tok.pad_token_id)
    rng = random.Random(1)
    rows = []
    for b, td in enumerate(tds):
        for i in sorted(rng.sample(range(1, len(td.ids)), 2)):
            for j in range(2):
                rows.append(DecodeRow(doc=b, ctx_len=sp.doc_offset[b] + i, seed_key=f"{b}|{i}|{j}"))
    outs = decode_calls(model, tok, sp, rows, marker_ids, markers, seed=7, temperature=temperature,
                        top_p=1.0, max_tokens=10, eos_id=tok.eos_token_id)
    for r, out in zip(rows, outs):
        b = r.doc
        i = r.ctx_len - sp.doc_offset[b]
        context = prompt.prefix_ids + prompt.input_ids(tok, docs[b].text) + tds[b].ids[:i]
        ref = sample_ref(model, tok, context, marker_ids, markers, 7, r.seed_key, temperature, 10, tok.eos_token_id)
        assert out.text == ref


def _random_candidates(docs, tds, rng, n_per_doc=6):
    cands = []
    calls = [ApiCall("Calculator", "400 / 1400"), ApiCall("Calculator", "12 * 3"), ApiCall("WikiSearch", "Nile"),
             ApiCall("Calendar", "")]
    results = ["0.29", "36", "The Nile is a river in Africa.", "Today is Monday, January 30, 2023."]
    for d, td in zip(docs, tds):
        for _ in range(n_per_doc):
            i = rng.randrange(1, len(td.ids))
            if td.char_pos[i] is None:
                continue
            k = rng.randrange(len(calls))
            cands.append(Candidate(doc_id=d.doc_id, tool=calls[k].tool, token_pos=i, char_pos=td.char_pos[i],
                                   p_api=rng.random(), call=calls[k], result=rng.choice([results[k], None]
                                                                                        if k == 1 else [results[k]])))
    return cands


@pytest.mark.parametrize("separator", ["\n", " "])
def test_losses_match_reference(tiny, separator):
    model, tok = tiny.model, tiny.tokenizer
    markers = Markers()
    bos = bos_ids(tok)
    docs = make_docs()
    tds = {d.doc_id: tokenize_doc(tok, d.text) for d in docs}
    rng = random.Random(3)
    cands = _random_candidates(docs, [tds[d.doc_id] for d in docs], rng)
    tau = {"Calculator": 0.5, "WikiSearch": 1.0, "Calendar": 1.0}
    # a small batch budget forces several batches of different widths
    scored = score_candidates(model, tok, tds, cands, markers, separator, tau, bos, tok.pad_token_id,
                              batch_tokens=300)
    assert len(scored) == sum(c.result is not None for c in cands)
    for s in scored:
        c = s.cand
        ids = tds[c.doc_id].ids
        plus = prefix_string_ref(c.call, c.result, markers, separator, True)
        nores = prefix_string_ref(c.call, c.result, markers, separator, False)
        assert (s.prefix_plus, s.prefix_no_result) == (plus, nores)
        assert s.loss_plus == pytest.approx(loss_ref(model, bos, encode(tok, plus), ids, c.token_pos), abs=TOL)
        assert s.loss_no_call == pytest.approx(loss_ref(model, bos, [], ids, c.token_pos), abs=TOL)
        assert s.loss_call_no_result == pytest.approx(loss_ref(model, bos, encode(tok, nores), ids, c.token_pos),
                                                      abs=TOL)


def test_kept_set_matches_reference_end_to_end(tiny):
    """Sample with the annotator, fill results, score; the kept set equals the reference's decisions."""
    model, tok = tiny.model, tiny.tokenizer
    markers = Markers()
    bos = bos_ids(tok)
    docs = make_docs()
    tds = {d.doc_id: tokenize_doc(tok, d.text) for d in docs}
    cands = _random_candidates(docs, list(tds.values()), random.Random(5), n_per_doc=8)
    cands = [c for c in cands if c.result is not None]
    ref_useful = []
    for c in cands:
        ids = tds[c.doc_id].ids
        lp = loss_ref(model, bos, encode(tok, prefix_string_ref(c.call, c.result, markers, "\n", True)), ids,
                      c.token_pos)
        le = loss_ref(model, bos, [], ids, c.token_pos)
        ln = loss_ref(model, bos, encode(tok, prefix_string_ref(c.call, c.result, markers, "\n", False)), ids,
                      c.token_pos)
        ref_useful.append(min(le, ln) - lp)
    # a threshold in the middle of the widest gap, so float noise cannot flip a decision
    vals = sorted(ref_useful)
    gaps = [(vals[k + 1] - vals[k], (vals[k + 1] + vals[k]) / 2) for k in range(len(vals) - 1)]
    mid = max(gaps[len(gaps) // 4: 3 * len(gaps) // 4 + 1])[1]
    tau = {"Calculator": mid, "WikiSearch": mid, "Calendar": mid}
    scored = score_candidates(model, tok, tds, cands, markers, "\n", tau, bos, tok.pad_token_id)
    assert [s.passes for s in scored] == [u >= mid for u in ref_useful]
    assert 0 < sum(s.passes for s in scored) < len(scored)


def test_annotator_sample_is_deterministic_and_counts_funnel(tiny):
    model, tok = tiny.model, tiny.tokenizer
    tcfg = {"Calculator": ToolConfig(tau_s=0.0, k=3, m=4, prefilter=False)}
    ann = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1, max_call_tokens=8,
                    batch_docs=2, batch_rows=5)
    docs = make_docs()
    a = ann.sample(docs)
    b = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1, max_call_tokens=8,
                  batch_docs=5, batch_rows=64).sample(docs)
    # one document per pass, all passes pooled into one decoding batch (merge_passes)
    c = Annotator(model, tok, {"Calculator": PromptTool()}, tcfg, Markers(), seed=1, max_call_tokens=8,
                  batch_docs=1, batch_rows=1000).sample(docs)
    key = [(c.doc_id, c.token_pos, c.call) for c in a.candidates]
    assert key == [(c.doc_id, c.token_pos, c.call) for c in b.candidates]
    assert key == [(x.doc_id, x.token_pos, x.call) for x in c.candidates]
    assert [x.p_api for x in a.candidates] == pytest.approx([x.p_api for x in c.candidates], abs=1e-5)
    f = a.funnel["Calculator"]
    assert f["docs_seen"] == 5 and f["docs_prefiltered"] == 5
    assert f["positions_sampled"] == 15 and f["calls_sampled"] == 60
    assert f["calls_distinct"] == len(a.candidates) <= f["calls_well_formed"] <= 60
    usable = sum(sum(cp is not None for cp in tokenize_doc(tok, d.text).char_pos[1:]) for d in docs)
    assert len(a.p_api["Calculator"]) == usable  # every usable position (not position 0: no BOS)


def _scored(doc_id, tool, pos, char_pos, useful, inp="1+1", result="2"):
    c = Candidate(doc_id=doc_id, tool=tool, token_pos=pos, char_pos=char_pos, p_api=0.5,
                  call=ApiCall(tool, inp), result=result)
    return ScoredCall(cand=c, prefix_plus="", prefix_no_result="", loss_plus=1.0, loss_no_call=1.0 + useful,
                      loss_call_no_result=5.0, tau_f=1.0)


def test_merge_one_call_per_position_cap_in_document_order_and_round_trip():
    markers = Markers()
    docs = [Document("a", "It costs 12 dollars in total."), Document("b", "Then 7 more were added.")]
    scored = [
        _scored("a", "Calculator", 3, 8, 2.0, "3*4", "12"),
        _scored("a", "WikiSearch", 3, 8, 3.0, "dollar", "US currency"),  # same position, more useful: wins
        _scored("a", "Calculator", 5, 19, 0.5),  # below tau_f
        _scored("b", "Calculator", 2, 4, 1.5, "5+2", "7"),
        _scored("b", "Calculator", 4, 16, 1.2, "7", "7"),
    ]
    merged, used = merge_documents(docs, scored, markers, {"Calculator": 1, "WikiSearch": None})
    assert merged[0].augmented_text == "It costs [WikiSearch(dollar) -> US currency] 12 dollars in total."
    assert merged[1].augmented_text == "Then [Calculator(5+2) -> 7] 7 more were added."  # cap 1: first in order
    assert used == {"Calculator": 1, "WikiSearch": 1}
    for m in merged:
        assert strip_calls(m.augmented_text, markers) == m.doc.text
        assert [f.call for f in find_calls(m.augmented_text, markers)] == [s.cand.call for s in m.calls]
