"""MT on a tiny random NLLB-architecture model with a locally built NLLB tokenizer (no hub): language
identification, src_lang / forced-BOS plumbing, batching by language, bad inputs, and the pre-filter."""
from __future__ import annotations

import string

import pytest

from toolformer_ray.core.types import Document
from toolformer_ray.errors import UserError
from toolformer_ray.tools import build_tool
from toolformer_ray.tools.mt import LANGID_TO_NLLB, mt_prefilter, source_language, text_chunks


def build_tiny_nllb(path) -> None:
    """An NLLB-style directory: M2M100 weights (random, tiny) + an NllbTokenizer over characters."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    chars = string.ascii_letters + string.digits + ".,;:!?'\"-() éèêàâçüöäßñíóúœ"
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in ["▁"] + list(chars) + ["▁" + c for c in chars]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", c) for c in chars]
    tok = NllbTokenizer(vocab=vocab, merges=merges)
    config = M2M100Config(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    M2M100ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-nllb")
    build_tiny_nllb(path)
    return path


@pytest.fixture(scope="module")
def mt(model_dir):
    tool = build_tool("MT", {"model": str(model_dir), "max_new_tokens": 8})
    tool.load()
    return tool


@pytest.mark.parametrize("text, code", [
    ("je ne sais quoi", "fra_Latn"),
    ("Der Zug kommt um acht Uhr an", "deu_Latn"),
    ("Il fait beau aujourd'hui et nous allons à la plage", "fra_Latn"),
    ("¿Dónde está la biblioteca de la universidad?", "spa_Latn"),
    ("Я люблю читать книги", "rus_Cyrl"),
    ("明天见，我们在学校门口集合", "zho_Hans"),
])
def test_source_language(text, code):
    assert source_language(text)[0] == code


def test_english_input_is_no_result():
    src, reason = source_language("The weather is lovely today and we are going to the beach.")
    assert src is None and "already English" in reason


def test_translation_plumbing(mt, monkeypatch):
    """src_lang is set per language group and generation is forced to start with eng_Latn."""
    tok, model = mt._tokenizer, mt._model
    seen = []
    real_generate = model.generate

    def spy(**kwargs):
        first_ids = kwargs["input_ids"][:, 0].tolist()
        seen.append(([tok.convert_ids_to_tokens(i) for i in first_ids], kwargs.get("forced_bos_token_id")))
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    inputs = ["je ne sais quoi", "Der Zug kommt um acht Uhr an", "C'est la vie, mon ami", "", "hello there, how are you today my friend?"]
    out = mt.run(inputs)
    assert len(out) == 5 and out[3] is None and out[4] is None  # empty; English
    for r in out[:3]:
        assert r is None or (isinstance(r, str) and "\n" not in r and "]" not in r)
    eng = tok.convert_tokens_to_ids("eng_Latn")
    groups = sorted(tuple(sorted(set(firsts))) for firsts, forced in seen)
    assert groups == [("deu_Latn",), ("fra_Latn",)]  # one batch per source language, tagged with it
    assert all(forced == eng for _, forced in seen)
    assert mt.run(["je ne sais quoi"]) == [out[0]]  # greedy: same answer alone or in a batch


@pytest.mark.parametrize("inp, reason", [
    ("", "no text"), ("12345 !!!", "no text"), ("x" * 500, "no text"),
    ("The cat sat on the mat and looked out of the window.", "already English"),
])
def test_mt_bad_input(mt, inp, reason):
    assert mt.run([inp]) == [None]
    assert reason in mt.diagnose(inp)


def test_mt_needs_a_model(tmp_path):
    with pytest.raises(UserError, match="options.model"):
        build_tool("MT").load()
    with pytest.raises(UserError):
        build_tool("MT", {"model": str(tmp_path / "missing")}).load()
    # English-only batches never need the model.
    assert build_tool("MT").run(["This is plainly an English sentence about nothing much."]) == [None]


def test_language_table_covers_nllb_codes():
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    assert set(LANGID_TO_NLLB.values()) <= set(FAIRSEQ_LANGUAGE_CODES)


# -- pre-filter (appendix A.1) ------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    'The French motto "liberté, égalité, fraternité" is written on town halls, and the words "Il fait beau '
    'aujourd\'hui et nous allons à la plage" mean that the weather is nice today.',
    "In the film, the hero whispers: Ich bin ein Berliner, und ich liebe diese Stadt. Then he walks away "
    "from the crowd and the scene ends.",
])
def test_prefilter_keeps_a_foreign_chunk_between_english(text):
    assert mt_prefilter(text)
    assert build_tool("MT").prefilter(Document("d", text))


@pytest.mark.parametrize("text", [
    "The weather is nice today. We are going to the beach with our friends and family.",
    "Il fait beau aujourd'hui. Nous allons à la plage avec nos amis et notre famille.",  # no English around
    "The sign at the entrance said: Bitte nicht rauchen und keine Hunde erlaubt.",  # nothing English after
    "",
])
def test_prefilter_rejects(text):
    assert not mt_prefilter(text)


def test_text_chunks():
    assert text_chunks('He said "je ne sais quoi" - then left. (Really!)') == [
        "He said", "je ne sais quoi", "then left", "Really"]
