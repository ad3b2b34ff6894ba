"""MT: translate a non-English phrase to English with an NLLB-style seq2seq model.

The paper used NLLB-200 (600M, distilled). The model is a configured directory (`options.model`: a
local directory or s3:// URI with config.json, tokenizer files and .safetensors weights), loaded
with AutoModelForSeq2SeqLM; point it at facebook/nllb-200-distilled-600M saved with
`save_pretrained` (see docs/tools.md). The source language comes from py3langid; with an NLLB
tokenizer it is set as `src_lang` and generation starts with the `eng_Latn` token (forced BOS), as
NLLB expects. No PyPI package ships such a model in its files, so the tests run this same code on a
tiny random model of the NLLB architecture.

The pre-filter (appendix A.1) keeps English documents that contain a chunk in another language
between English text.
"""
from __future__ import annotations

import re
import threading

from pydantic import Field

from toolformer_ray.core.types import Document
from toolformer_ray.errors import UserError
from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, ToolOptions, clean_result, unquote

# py3langid (ISO 639-1 and a few 639-3) -> NLLB-200 (FLORES-200) codes, for the languages both know.
LANGID_TO_NLLB = {
    "af": "afr_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "as": "asm_Beng", "az": "azj_Latn",
    "be": "bel_Cyrl", "bg": "bul_Cyrl", "bn": "ben_Beng", "bs": "bos_Latn", "ca": "cat_Latn",
    "cs": "ces_Latn", "cy": "cym_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek",
    "en": "eng_Latn", "eo": "epo_Latn", "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn",
    "fa": "pes_Arab", "fi": "fin_Latn", "fr": "fra_Latn", "ga": "gle_Latn", "gd": "gla_Latn",
    "gl": "glg_Latn", "gu": "guj_Gujr", "ha": "hau_Latn", "he": "heb_Hebr", "hi": "hin_Deva",
    "hr": "hrv_Latn", "ht": "hat_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn",
    "ig": "ibo_Latn", "is": "isl_Latn", "it": "ita_Latn", "ja": "jpn_Jpan", "jv": "jav_Latn",
    "ka": "kat_Geor", "kk": "kaz_Cyrl", "km": "khm_Khmr", "kn": "kan_Knda", "ko": "kor_Hang",
    "ku": "kmr_Latn", "ky": "kir_Cyrl", "lg": "lug_Latn", "ln": "lin_Latn", "lo": "lao_Laoo",
    "lt": "lit_Latn", "lv": "lvs_Latn", "mg": "plt_Latn", "mk": "mkd_Cyrl", "ml": "mal_Mlym",
    "mn": "khk_Cyrl", "mr": "mar_Deva", "ms": "zsm_Latn", "mt": "mlt_Latn", "my": "mya_Mymr",
    "ne": "npi_Deva", "nl": "nld_Latn", "nn": "nno_Latn", "no": "nob_Latn", "oc": "oci_Latn",
    "om": "gaz_Latn", "or": "ory_Orya", "pa": "pan_Guru", "pl": "pol_Latn", "ps": "pbt_Arab",
    "pt": "por_Latn", "qu": "quy_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "rw": "kin_Latn",
    "sa": "san_Deva", "si": "sin_Sinh", "sk": "slk_Latn", "sl": "slv_Latn", "sn": "sna_Latn",
    "so": "som_Latn", "sq": "als_Latn", "sr": "srp_Cyrl", "st": "sot_Latn", "sv": "swe_Latn",
    "sw": "swh_Latn", "ta": "tam_Taml", "te": "tel_Telu", "tg": "tgk_Cyrl", "th": "tha_Thai",
    "tk": "tuk_Latn", "tl": "tgl_Latn", "tr": "tur_Latn", "tt": "tat_Cyrl", "ug": "uig_Arab",
    "uk": "ukr_Cyrl", "ur": "urd_Arab", "uz": "uzn_Latn", "vi": "vie_Latn", "xh": "xho_Latn",
    "yo": "yor_Latn", "zh": "zho_Hans", "zu": "zul_Latn", "ace": "ace_Latn", "kab": "kab_Latn",
    "lb": "ltz_Latn", "lij": "lij_Latn", "ltg": "ltg_Latn", "vec": "vec_Latn", "fo": "fao_Latn",
    "crh": "crh_Latn", "ba": "bak_Cyrl", "ary": "ary_Arab", "arz": "arz_Arab", "fuv": "fuv_Latn",
    "kik": "kik_Latn", "nso": "nso_Latn", "yue": "yue_Hant",
}
TARGET_LANG = "eng_Latn"

_IDENTIFIER = None
_IDENTIFIER_LOCK = threading.Lock()


def language_identifier():
    """py3langid's model with normalised probabilities (loaded once per process)."""
    global _IDENTIFIER
    with _IDENTIFIER_LOCK:
        if _IDENTIFIER is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _IDENTIFIER


def identify(text: str) -> list[tuple[str, float]]:
    """Languages of a text, most probable first, with probabilities."""
    return [(lang, float(p)) for lang, p in language_identifier().rank(text)]


def source_language(text: str, english_threshold: float = 0.9) -> tuple[str | None, str]:
    """(NLLB source code, reason): the most probable non-English language that NLLB knows; None with
    a reason when the text is confidently English or in no language NLLB knows."""
    ranked = identify(text)
    if not ranked:
        return None, "language not identified"
    p_en = dict(ranked).get("en", 0.0)
    if p_en >= english_threshold:
        return None, f"already English (p={p_en:.2f})"
    for lang, _ in ranked[:5]:
        if lang != "en" and lang in LANGID_TO_NLLB:
            return LANGID_TO_NLLB[lang], lang
    return None, f"language {ranked[0][0]!r} is not one the translation model knows"


# Chunks for the pre-filter: split at sentence punctuation, quotes, brackets, dashes and line
# breaks.
_CHUNK_SPLIT_RE = re.compile(r"[.!?;:()\[\]{}\"\u201c\u201d\u00ab\u00bb\u201e]+"
                             r"|\s[-\u2013\u2014]+\s|\n+")


def text_chunks(text: str) -> list[str]:
    return [c.strip() for c in _CHUNK_SPLIT_RE.split(text) if c.strip()]


def mt_prefilter(text: str, min_chunk_letters: int = 8, min_confidence: float = 0.8) -> bool:
    """Appendix A.1: a chunk confidently in another language, with English text before and after
    it."""
    chunks = [c for c in text_chunks(text) if sum(ch.isalpha() for ch in c) >= 3]
    if len(chunks) < 3:
        return False
    ident = language_identifier()
    labels = [ident.classify(c) for c in chunks]
    english = [lang == "en" for lang, _ in labels]
    for i in range(1, len(chunks) - 1):
        lang, prob = labels[i]
        if (lang != "en" and prob >= min_confidence
                and sum(ch.isalpha() for ch in chunks[i]) >= min_chunk_letters
                and any(english[:i]) and any(english[i + 1:])):
            return True
    return False


class MTOptions(ToolOptions):
    model: str | None = None  # seq2seq model directory or s3:// URI (e.g. nllb-200-distilled-600M)
    dtype: str = "float32"
    max_chars: int = Field(400, gt=0)  # longer inputs are not a phrase to translate
    max_new_tokens: int = Field(64, gt=0)
    num_beams: int = Field(1, gt=0)  # greedy by default (deterministic, cheap)
    batch_size: int = Field(8, gt=0)
    # inputs at least this surely English: no result
    english_threshold: float = Field(0.9, gt=0.0, le=1.0)
    model_cache_dir: str | None = None  # where a remote model is downloaded
    # "auto" = the GPU this worker has (tools.MT.worker_gpus), else the CPU; "cuda" without CUDA is
    # an error.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Pre-filter.
    min_chunk_letters: int = Field(8, gt=0)
    min_confidence: float = Field(0.8, ge=0.0, le=1.0)


@register
class MT(Tool):
    name = "MT"
    version = "1"
    Options = MTOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._model = None
        self._tokenizer = None

    def load(self) -> None:
        if self._model is not None:
            return
        if not self.options.model:
            raise UserError("MT needs tools.MT.options.model: a seq2seq model directory such as "
                            "facebook/nllb-200-distilled-600M saved locally (see docs/tools.md)")
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from toolformer_ray.models import pick_device, resolve_model_dir

        device = pick_device(self.options.device)
        model_dir = resolve_model_dir(self.options.model, self.options.model_cache_dir)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.options.dtype not in dtypes:
            raise UserError(f"MT: unknown dtype {self.options.dtype!r}")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir),
                                                          dtype=dtypes[self.options.dtype],
                                                          use_safetensors=True,
                                                          trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"MT: cannot load a seq2seq model from "
                            f"{self.options.model}: {e}") from None
        model.to(device)
        model.eval()
        self._model = model

    def _phrase(self, inp) -> str | None:
        text = unquote(inp) if isinstance(inp, str) else ""
        return (text if text and len(text) <= self.options.max_chars
                and any(c.isalpha() for c in text) else None)

    def _translate(self, texts: list[str], src_langs: list[str]) -> list[str]:
        import torch

        tok, model = self._tokenizer, self._model
        forced_bos = (tok.convert_tokens_to_ids(TARGET_LANG) if TARGET_LANG in tok.get_vocab()
                      else None)
        kwargs = dict(max_new_tokens=self.options.max_new_tokens, num_beams=self.options.num_beams,
                      do_sample=False)
        if forced_bos is not None:
            kwargs["forced_bos_token_id"] = forced_bos
        by_lang: dict[str, list[int]] = {}
        for i, lang in enumerate(src_langs):
            by_lang.setdefault(lang, []).append(i)
        results: list[str] = [""] * len(texts)
        # One batch per source language: an NLLB tokenizer writes src_lang as the first source
        # token.
        for lang, idxs in sorted(by_lang.items()):
            if hasattr(tok, "src_lang"):
                tok.src_lang = lang
            for start in range(0, len(idxs), self.options.batch_size):
                chunk = idxs[start:start + self.options.batch_size]
                enc = tok([texts[i] for i in chunk], return_tensors="pt", padding=True,
                          truncation=True, max_length=256)
                with torch.inference_mode():
                    generated = model.generate(**enc.to(model.device), **kwargs)
                for i, text in zip(chunk, tok.batch_decode(generated, skip_special_tokens=True)):
                    results[i] = text
        return results

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        results: list[str | None] = [None] * len(inputs)
        todo, langs = [], []
        for i, inp in enumerate(inputs):
            phrase = self._phrase(inp)
            if phrase is None:
                continue
            src, _ = source_language(phrase, self.options.english_threshold)
            if src is not None:
                todo.append(i)
                langs.append(src)
        if not todo:
            return results
        self.load()
        texts = [self._phrase(inputs[i]) for i in todo]
        for i, text in zip(todo, self._translate(texts, langs)):
            results[i] = clean_result(text)
        return results

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        phrase = self._phrase(inp)
        if phrase is None:
            return (f"no text to translate (empty, no letters, or longer than "
                    f"{self.options.max_chars} characters)")
        src, reason = source_language(phrase, self.options.english_threshold)
        if src is None:
            return reason
        if self.run([inp])[0] is None:
            return f"the model produced no translation (source {src})"
        return None

    def prefilter(self, doc: Document) -> bool:
        return mt_prefilter(doc.text, self.options.min_chunk_letters, self.options.min_confidence)
