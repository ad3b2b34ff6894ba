"""Iterative bootstrapping: another model samples the calls (`sampling.model`), the configured
model's losses keep or drop them, so the criterion stays the paper's."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from caller_model import caller_model_dir, corpus_records

from toolformer_ray.config import load_config
from toolformer_ray.core.reference import loss_ref
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.models import load_model, tiny_model_dir
from toolformer_ray.verify import verify_output

ROOT = Path(__file__).resolve().parents[1]


def _cfg(corpus: Path, out: Path, sampler: str | None):
    overrides = [
        "model.path=tiny", "model.dtype=float32", f"model.cache_dir={ROOT / '.cache/models'}",
        "tools={Calculator: {k: 3, m: 3, tau_f: -0.5}}", f"corpus.input={corpus}",
        f"run.output={out}", "ray.torch_threads=1", "sampling.max_call_tokens=16",
    ] + ([f"sampling.model={sampler}"] if sampler else [])
    return load_config(None, overrides)


def test_sampler_model_samples_and_base_model_scores(tmp_path):
    caller = caller_model_dir(ROOT / ".cache/models")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "part.jsonl", "w") as f:
        for r in corpus_records(6, seed=3):
            f.write(json.dumps(r) + "\n")

    # the premise: the random tiny model alone never writes a well-formed call
    alone = run_generate(_cfg(corpus, tmp_path / "alone", None), use_ray=False, progress=False)
    assert json.loads(Path(alone.manifest).read_text())["funnel"]["Calculator"][
        "calls_well_formed"] == 0

    summary = run_generate(_cfg(corpus, tmp_path / "boot", str(caller)), use_ray=False,
                           progress=False)
    manifest = json.loads(Path(summary.manifest).read_text())
    assert manifest["funnel"]["Calculator"]["calls_well_formed"] > 0
    assert manifest["model"]["sampler"]["revision"] and manifest["model"]["requested"] == "tiny"
    calls = pads.dataset(f"{summary.output}/calls", format="parquet").to_table().to_pandas()
    docs = pads.dataset(f"{summary.output}/documents", format="parquet").to_table().to_pandas()
    assert len(calls) > 0
    # the rows name the scoring model, and their losses are the scoring model's
    tiny = load_model(str(tiny_model_dir(ROOT / ".cache/models")), dtype="float32")
    assert calls["model_revision"].nunique() == 1
    tok = tiny.tokenizer
    texts = dict(zip(docs["doc_id"], docs["text"]))
    for row in calls.head(4).itertuples():
        ids = tok(texts[row.doc_id], add_special_tokens=False)["input_ids"]
        plus = tok(row.prefix_plus, add_special_tokens=False)["input_ids"]
        assert row.loss_plus == pytest.approx(loss_ref(tiny.model, [], plus, ids, row.token_pos),
                                              abs=1e-4)
    report, _ = verify_output(summary.output)
    assert report.ok and report.checked == len(calls)
