"""Every model family is served exactly or refused (core/lm.py: prepare_model and the two paths).

Tiny random models of each family, in fp32, with the default model's tokenizer. For each: the path
prepare_model picks (fast shared-prefix attention, or plain forwards for a feature the fast path
lacks); then p_i (log space), a multi-token marker's later tokens, a few greedy decoding steps and
the three losses of that path against plain full forwards of the same token sequences (no cache, no
packing, one sequence at a time). The fast path runs with FUSED_EVERYWHERE: the code path a GPU runs
(masks in the model's dtype, fused attention for every part, merge by log-sum-exp).
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from toolformer_ray.api_text import ApiCall, Markers
from toolformer_ray.core import lm
from toolformer_ray.core.filtering import score_candidates
from toolformer_ray.core.lm import AttentionPlan, UnsupportedModel, bos_ids, encode, prepare_model
from toolformer_ray.core.sampling import (Candidate, DecodeRow, ToolPrompt, decode_calls,
                                          start_pass, tokenize_doc)
from toolformer_ray.core.scoring import WEIGHTS
from toolformer_ray.models import load_tokenizer, tiny_model_dir

TOL = 1e-4
PROMPT = ("Add calls to a Calculator API.\nInput: The sum is 5 + 7 = 12.\n"
          "Output: The sum is 5 + 7 = [Calculator(5 + 7)] 12.\nInput: {text}\nOutput: ")
TEXTS = ["Out of 1400 people, 400 (29%) passed the test.", "Tokyo became the capital in 1868."]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = {  # name: (config, the path prepare_model must pick, the feature its reason names)
    "llama_gqa": (lambda: T.LlamaConfig(num_key_value_heads=2, **SMALL), "fast", ""),
    "qwen2": (lambda: T.Qwen2Config(num_key_value_heads=2, **SMALL), "fast", ""),
    "mistral_window16": (lambda: T.MistralConfig(num_key_value_heads=2, sliding_window=16, **SMALL),
                         "plain", "sliding-window"),
    "gemma2": (lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=16,
                                      **SMALL),
               "plain", "soft-capping"),
    "phi3": (lambda: T.Phi3Config(num_key_value_heads=2, **SMALL), "fast", ""),
    "gpt_neox": (lambda: T.GPTNeoXConfig(rotary_pct=0.25, **SMALL), "fast", ""),
    "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4), "fast", ""),
    "mpt_alibi": (lambda: T.MptConfig(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2),
                  "plain", "ALiBi"),
    "falcon": (lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               "plain", "does not go through the attention interface"),
    "bloom": (lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4), "plain", "ALiBi"),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_model_dir())


def build(config, tok):
    config.vocab_size = len(tok)
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # peaked predictions, so a wrong context shows in the numbers
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return model


@torch.no_grad()
def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:t+1]) for every t, from one plain forward of the whole sequence, no cache."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def ctx_len(sp, b: int, i: int) -> int | None:
    """Row tokens before document position i (the one place that reads the StartPass layout)."""
    return sp.ctx_at[b][i]


def token_rows(model, tok, prompt, docs, texts, start_id) -> list[list[int]]:
    """The token sequences (prompt + row) start_pass reads, as the plain path records them."""
    plan = lm.attention_plan(model)
    model._toolformer_attention = AttentionPlan("plain", "reference", None, None)
    try:
        return start_pass(model, tok, prompt, docs, texts, start_id, tok.pad_token_id).tokens
    finally:
        model._toolformer_attention = plan


def run_paths(model, tok, monkeypatch):
    """p_i, later-marker log-probs, greedy continuations and losses through the chosen path, each
    against the plain full forward it must equal."""
    monkeypatch.setattr(lm, "FUSED_EVERYWHERE", True)
    markers, bos = Markers(), bos_ids(tok)
    start_id, marker_ids = encode(tok, " [")[0], encode(tok, " <API>")
    prompt = ToolPrompt.build("Calculator", PROMPT, tok, markers, bos)
    docs = [tokenize_doc(tok, t) for t in TEXTS]
    sp = start_pass(model, tok, prompt, docs, TEXTS, start_id, tok.pad_token_id)
    rows = token_rows(model, tok, prompt, docs, TEXTS, start_id)
    P = len(prompt.prefix_ids)
    for b, d in enumerate(docs):
        ref = full_logprobs(model, rows[b])
        for i in range(len(d.ids)):
            if ctx_len(sp, b, i) is None:  # no boundary there: never sampled
                continue
            want = float(ref[P + ctx_len(sp, b, i) - 1, start_id])
            assert math.log(sp.probs[b][i]) == pytest.approx(want, abs=TOL), (b, i)
    positions = [(0, 1), (0, len(docs[0].ids) - 2), (1, 3)]
    dec = [DecodeRow(doc=b, ctx_len=ctx_len(sp, b, i), seed_key="") for b, i in positions]
    greedy_args = dict(seed=0, temperature=0.0, top_p=1.0, eos_id=None)
    outs = decode_calls(model, tok, sp, dec, marker_ids, markers, max_tokens=0, sample=False,
                        **greedy_args)
    greedy = decode_calls(model, tok, sp, dec, [start_id], markers, max_tokens=4, **greedy_args)
    for r, out, g in zip(dec, outs, greedy):
        ctx = rows[r.doc][:P + r.ctx_len]
        ref = full_logprobs(model, ctx + marker_ids)
        want = sum(float(ref[len(ctx) + t - 1, marker_ids[t]]) for t in range(1, len(marker_ids)))
        assert out.marker_logprob == pytest.approx(want, abs=TOL)
        seq = ctx + [start_id]
        for _ in range(4):  # greedy, one full forward per token
            seq.append(int(full_logprobs(model, seq)[-1].argmax()))
        assert g.text == tok.decode(seq[len(ctx) + 1:])
    cands = [Candidate(doc_id=f"d{b}", tool="Calculator", token_pos=i, char_pos=0, p_api=0.5,
                       call=ApiCall("Calculator", f"{b} + {i}"), result=str(b + i))
             for b, i in positions]
    scored = score_candidates(model, tok, {f"d{b}": d for b, d in enumerate(docs)}, cands, markers,
                              "\n", {"Calculator": 1.0}, bos, tok.pad_token_id, batch_tokens=256)
    assert len(scored) == len(cands)
    for s in scored:
        ids = docs[int(s.cand.doc_id[1:])].ids
        for prefix, got in ((s.prefix_plus, s.loss_plus), ("", s.loss_no_call),
                            (s.prefix_no_result, s.loss_call_no_result)):
            head = bos + (encode(tok, prefix) if prefix else [])
            ref = full_logprobs(model, head + ids)
            want = -sum(w * float(ref[len(head) + j - 1, ids[j]])
                        for w, j in zip(WEIGHTS, range(s.cand.token_pos, len(ids))))
            assert got == pytest.approx(want, abs=TOL), prefix


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_path_equals_plain_forwards(family, tok, monkeypatch):
    make_config, mode, feature = FAMILIES[family]
    model = build(make_config(), tok)
    plan = prepare_model(model)
    assert plan.mode == mode, plan
    assert (plan.reason == "") == (mode == "fast") and feature in plan.reason
    assert plan.self_check_max_diff < 1e-3
    lm.KERNELS_USED.clear()
    run_paths(model, tok, monkeypatch)
    if mode == "fast":  # the fused kernel served every attention part (the GPU's code path)
        assert lm.KERNELS_USED == {"cpu-flash"}


@pytest.mark.slow
def test_family_forcing_the_fast_path_on_a_windowed_model_is_caught(tok, monkeypatch):
    """The guard is what keeps Mistral's window exact: forced onto the fast path it is wrong, and
    the self-check alone also sends it to plain forwards (its config's window ignored)."""
    model = build(FAMILIES["mistral_window16"][0](), tok)
    model._toolformer_attention = AttentionPlan("fast", "", None, None)
    with pytest.raises(AssertionError):
        run_paths(model, tok, monkeypatch)
    monkeypatch.setattr(lm, "fast_path_obstacle", lambda config: None)
    plan = prepare_model(model)
    assert plan.mode == "plain" and "self-check" in plan.reason


def test_family_rope_switch_refused_in_one_line(tok, monkeypatch):
    """LongRoPE changes every frequency past its original length: a context beyond it is refused."""
    config = T.Phi3Config(num_key_value_heads=2, max_position_embeddings=4096,
                          original_max_position_embeddings=64,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                        "long_factor": [2.0] * 4,
                                        "original_max_position_embeddings": 64},
                          **SMALL)
    model = build(config, tok)
    assert prepare_model(model).max_context == 64
    with pytest.raises(UnsupportedModel) as err:
        run_paths(model, tok, monkeypatch)
    assert "RoPE" in str(err.value) and "\n" not in str(err.value)


def test_family_unservable_model_refused_in_one_line(tok, monkeypatch):
    """A family neither path serves (here: the plain path broken on purpose) is refused."""
    model = build(FAMILIES["bloom"][0](), tok)
    monkeypatch.setattr(lm, "_self_check_plain", lambda m: 0.5)
    with pytest.raises(UnsupportedModel) as err:
        prepare_model(model)
    assert "ALiBi" in str(err.value) and "\n" not in str(err.value)
