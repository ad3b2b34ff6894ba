"""Fine-tuning data and the pure parts of the training loop (no Ray, no DeepSpeed engine): fast."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from toolformer_ray.api_text import ApiCall, Markers, insert_calls, render
from toolformer_ray.finetune import (FinetuneError, _check_resumable, deepspeed_config, load_metrics, lr_factor,
                                     plot_loss_curve, token_nll, warmup_steps_for)
from toolformer_ray.finetune.data import (BatchPlan, FinetuneDataError, batch_plan, gather_rows, pack,
                                          prepare_data, read_documents, result_spans, rows_at, select_texts,
                                          split_dev, tokenize_texts)
from toolformer_ray.models import load_tokenizer, resolve_model_dir

MARKERS = Markers()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny"))


def make_docs(n: int, every: int = 2) -> list[dict]:
    """Documents with a Calculator call inserted into every `every`-th one."""
    rows = []
    for i in range(n):
        a, b = 10 + 7 * i, 20 + 3 * i
        text = f"Shop {i} sold {a} apples and {b} pears, {a + b} fruits in all."
        aug = text
        if i % every == 0:
            pos = text.index(f" {a + b} fruits")
            aug = insert_calls(text, [(pos, render(ApiCall("Calculator", f"{a}+{b}"), MARKERS, str(a + b)))])
        rows.append({"doc_id": f"d{i:04d}", "text": text, "augmented_text": aug, "n_calls": int(aug != text)})
    return rows


def write_table(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ------------------------------------------------------------------------------------------------ reading

def test_read_documents_folder_and_file(tmp_path):
    rows = make_docs(10)
    write_table(tmp_path / "run" / "documents" / "a.parquet", rows[:6])
    write_table(tmp_path / "run" / "documents" / "b.parquet", rows[4:])  # d0004, d0005 twice: kept once
    write_table(tmp_path / "run" / "documents" / ".tmp-c.parquet", make_docs(30)[20:])  # hidden: ignored
    table = read_documents(str(tmp_path / "run"))
    assert sorted(table.column("doc_id").to_pylist()) == [r["doc_id"] for r in rows]
    one = read_documents(str(tmp_path / "run" / "documents" / "a.parquet"))
    assert one.num_rows == 6


def test_read_documents_committed_output(tmp_path):
    from toolformer_ray.storage import OutputStore

    rows = make_docs(8)
    store = OutputStore(str(tmp_path / "out"), "abc123")
    docs = pa.Table.from_pylist([{**r, "source_id": r["doc_id"], "shard": "s1", "date": None, "meta": "{}"}
                                 for r in rows])
    store.write_shard("s1", {"documents": docs}, {})
    # An uncommitted leftover of a killed run is never read.
    write_table(tmp_path / "out" / "abc123" / "documents" / "s2.parquet", make_docs(20)[10:])
    for uri in (tmp_path / "out" / "abc123", tmp_path / "out"):
        table = read_documents(str(uri))
        assert sorted(table.column("doc_id").to_pylist()) == [r["doc_id"] for r in rows]
    OutputStore(str(tmp_path / "out"), "def456").write_shard("s1", {"documents": docs}, {})
    with pytest.raises(FinetuneDataError, match="2 output versions"):
        read_documents(str(tmp_path / "out"))


def test_read_documents_errors(tmp_path):
    with pytest.raises(FinetuneDataError, match="not found"):
        read_documents(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneDataError, match="no documents table"):
        read_documents(str(tmp_path / "empty"))
    write_table(tmp_path / "bad" / "x.parquet", [{"doc_id": "a", "text": "t"}])
    with pytest.raises(FinetuneDataError, match="augmented_text"):
        read_documents(str(tmp_path / "bad"))


def test_read_documents_s3(s3_endpoint):
    rows = make_docs(5)
    fs = s3_endpoint.fs()
    with fs.open(f"{s3_endpoint.bucket}/gen/documents/part.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    table = read_documents(s3_endpoint.uri("gen"))
    assert table.column("doc_id").to_pylist() == [r["doc_id"] for r in rows]


# ---------------------------------------------------------------------------------------- split and pick

def test_dev_split_is_stable_and_nonempty():
    ids = [f"doc{i}" for i in range(2000)]
    mask = split_dev(ids, 0.1)
    assert 150 < mask.sum() < 250
    assert (split_dev(list(reversed(ids)), 0.1)[::-1] == mask).all()  # per document, not per position
    assert split_dev(ids[:3], 0.01).sum() == 1  # a tiny table still gets one dev document
    assert split_dev(ids, 0.0).sum() == 0


def test_select_texts_mixes_originals_without_calls_first():
    rows = make_docs(40, every=4)  # 10 with calls
    table = pa.Table.from_pylist(rows)
    sel = select_texts(table, original_text_ratio=0.5, dev_fraction=0.0, seed=0)
    assert sel.n_augmented == 10
    assert all("[Calculator(" in t for t in sel.train_texts[:10])
    originals = sel.train_texts[10:]
    assert len(originals) == 5 and not any("[" in t for t in originals)
    assert {r["text"] for r in rows if r["n_calls"] == 0} >= set(originals)
    sel_dev = select_texts(table, 0.0, dev_fraction=0.3, seed=0)
    dev_ids = {r["doc_id"] for r, d in zip(rows, split_dev([r["doc_id"] for r in rows], 0.3)) if d}
    assert sorted(sel_dev.dev_texts) == sorted(r["text"] for r in rows if r["doc_id"] in dev_ids)  # originals
    assert not set(sel_dev.train_texts) & {r["augmented_text"] for r in rows if r["doc_id"] in dev_ids}


# ----------------------------------------------------------------------------------- tokenize and pack

def test_result_spans_and_masked_tokens(tokenizer):
    text = "It costs 400 of 1400 [Calculator(400/1400) -> 0.29] or so. Plain [brackets] stay."
    spans = result_spans(text, MARKERS)
    assert [text[a:b] for a, b in spans] == [" 0.29]"]
    [(ids, keep)] = tokenize_texts([text], tokenizer, MARKERS, mask_results=True)
    masked = tokenizer.decode(ids[keep == 0])
    assert masked == " 0.29]"
    assert tokenizer.decode(ids) == text
    [(_, keep_all)] = tokenize_texts([text], tokenizer, MARKERS, mask_results=False)
    assert keep_all.all()


def test_pack_layout():
    docs = [(np.array([5, 6, 7], np.int32), np.array([1, 0, 1], np.uint8)),
            (np.array([8, 9], np.int32), np.ones(2, np.uint8))]
    p = pack(docs, max_length=4, eos_id=2, pad_id=0, bos_id=1)
    # stream: 1 5 6 7 2 1 8 9 2 -> rows of 4, last padded
    assert p.input_ids.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9], [2, 0, 0, 0]]
    assert p.loss_mask.tolist() == [[0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert p.lengths.tolist() == [4, 4, 1]
    batch = gather_rows(p, np.array([2, 0]))
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


def test_prepare_data(tokenizer):
    table = pa.Table.from_pylist(make_docs(30))
    data = prepare_data(table, tokenizer, markers=MARKERS, max_length=24, original_text_ratio=0.0,
                        mask_tool_results=False, dev_fraction=0.2, dev_max_sequences=3, seed=0)
    s = data.stats
    assert s["train_augmented_texts"] + s["dev_documents"] >= 15 and len(data.dev) <= 3
    assert data.train.input_ids.shape[1] == 24 and s["train_rows"] == len(data.train)
    assert s["train_tokens"] == int(data.train.lengths.sum())
    again = prepare_data(table, tokenizer, markers=MARKERS, max_length=24, original_text_ratio=0.0,
                         mask_tool_results=False, dev_fraction=0.2, dev_max_sequences=3, seed=0)
    assert again.digest() == data.digest()
    masked = prepare_data(table, tokenizer, markers=MARKERS, max_length=24, original_text_ratio=0.0,
                          mask_tool_results=True, dev_fraction=0.2, dev_max_sequences=3, seed=0)
    assert masked.stats["masked_result_tokens"] > 0
    # Same rows; exactly the result tokens (" 57]") leave the loss (a few may sit in column 0 already).
    assert (masked.train.input_ids == data.train.input_ids).all()
    dropped = (data.train.loss_mask == 1) & (masked.train.loss_mask == 0)
    assert 0 < dropped.sum() <= masked.stats["masked_result_tokens"]
    assert set(tokenizer.decode(data.train.input_ids[dropped])) <= set(" 0123456789]")
    assert not ((data.train.loss_mask == 0) & (masked.train.loss_mask == 1)).any()
    with pytest.raises(FinetuneDataError, match="nothing to train on"):
        prepare_data(pa.Table.from_pylist(make_docs(4, every=100)[1:]), tokenizer, markers=MARKERS,
                     max_length=24, original_text_ratio=0.0, mask_tool_results=False, dev_fraction=0.0,
                     dev_max_sequences=3, seed=0)


# ------------------------------------------------------------------------------------------------- order

def test_rows_at_is_a_permutation_per_epoch_and_deterministic():
    n = 7
    first = rows_at(np.arange(3 * n), n, seed=1)
    for e in range(3):
        assert sorted(first[e * n:(e + 1) * n]) == list(range(n))
    assert (rows_at(np.arange(5, 12), n, seed=1) == first[5:12]).all()  # any window: same rows (resume)
    assert not (rows_at(np.arange(n), n, seed=2) == first[:n]).all()


def test_batch_plan_covers_each_global_batch_once():
    plan = batch_plan(global_batch=8, micro=2, workers=2)
    assert plan == BatchPlan(micro=2, accumulation=2, workers=2)
    rows = plan.step_rows(3, n_rows=100, seed=0)
    assert rows.shape == (2, 2, 2)
    assert (rows.ravel() == rows_at(np.arange(24, 32), 100, 0)).all()
    assert (plan.micro_rows(3, 1, 0, 100, 0) == rows[1, 0]).all()
    with pytest.raises(FinetuneDataError, match="multiple of"):
        batch_plan(global_batch=10, micro=4, workers=2)


# ------------------------------------------------------------------------------------- training helpers

def test_lr_schedule():
    warm = warmup_steps_for(100, 0.1)
    assert warm == 10
    assert lr_factor(0, warm, 100) == pytest.approx(0.1)
    assert lr_factor(9, warm, 100) == 1.0 and lr_factor(99, warm, 100) == 1.0  # paper: constant after warm-up
    assert lr_factor(55, warm, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(55, warm, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 0, 10) == 1.0


def test_token_nll_against_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.tensor([[1, 3, 4, 3, 0], [2, 2, 3, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 1, 1, 1]])
    nll, m = token_nll(logits, ids, mask)
    nll_off, _ = token_nll(logits, ids, mask, disabled_token=3)
    for b in range(2):
        for t in range(1, 5):
            logp = torch.log_softmax(logits[b, t - 1], -1)
            assert nll[b, t - 1] == pytest.approx(-logp[ids[b, t]].item(), abs=1e-5)
            if ids[b, t] == 3:  # the text itself has the start token: its own probability
                expected = -logp[3].item()
            else:  # p(start) = 0, renormalised over the other tokens
                expected = -(logp[ids[b, t]] - torch.log1p(-logp[3].exp())).item()
            assert nll_off[b, t - 1] == pytest.approx(expected, abs=1e-5)
    assert m.tolist() == mask[:, 1:].float().tolist()


def test_deepspeed_config_fills_and_validates(tmp_path):
    plan = batch_plan(128, 1, 2)
    ds = deepspeed_config("configs/ds_zero3.json", plan)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and "bf16" not in ds
    assert deepspeed_config("configs/ds_zero2.json", plan)["zero_optimization"]["stage"] == 2

    def bad(cfg: dict, match: str):
        p = tmp_path / "ds.json"
        p.write_text(json.dumps(cfg))
        with pytest.raises(FinetuneError, match=match):
            deepspeed_config(str(p), plan)

    zero2 = {"zero_optimization": {"stage": 2}}
    bad({**zero2, "optimizer": {"type": "Adam"}}, "optimizer")
    bad({"zero_optimization": {"stage": 1}}, "stage must be 2 or 3")
    bad({**zero2, "train_batch_size": 64}, "train_batch_size is 64")
    bad({**zero2, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "reduce_bucket_size")
    with pytest.raises(FinetuneError, match="not found"):
        deepspeed_config(str(tmp_path / "nope.json"), plan)


def test_resume_check_refuses_other_settings(tmp_path):
    out = tmp_path / "ft"
    parts = {"data": "abc", "lr": 1e-5, "deepspeed": {"zero_optimization": {"stage": 2}}}
    assert _check_resumable(str(out), parts) is False  # nothing there
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    with pytest.raises(FinetuneError, match="no run.json"):
        _check_resumable(str(out), parts)
    (out / "run.json").write_text(json.dumps({"fingerprint": parts}))
    assert _check_resumable(str(out), parts) is True
    with pytest.raises(FinetuneError, match=r"lr: 1e-05 -> 2e-05"):
        _check_resumable(str(out), {**parts, "lr": 2e-5})
    with pytest.raises(FinetuneError, match="deepspeed config"):
        _check_resumable(str(out), {**parts, "deepspeed": {"zero_optimization": {"stage": 3}}})


def test_metrics_log_and_loss_curve(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "dev_loss": 2.7}, {"step": 3, "loss": 2.4},
             {"step": 3, "loss": 2.2}, {"step": 4, "loss": 2.0, "dev_loss": 2.1}]  # step 3 redone after a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = load_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] == 2.2
    plot_loss_curve(records, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert math.isfinite(records[-1]["loss"])


def test_worker_model_dir_resolves_on_a_node_without_the_drivers_copy(tmp_path):
    from dataclasses import replace

    from toolformer_ray.finetune import TrainSpec, _worker_model_dir
    from toolformer_ray.models import directory_revision

    tiny = resolve_model_dir("tiny")
    spec = TrainSpec(model_dir=str(tiny), model_source="tiny", model_cache=str(tiny.parent),
                     model_revision=directory_revision(tiny), tiny_seed=0, ds_config={}, plan=batch_plan(2, 1, 2),
                     lr=1e-5, warmup_steps=0, lr_decay="none", weight_decay=0.0, max_steps=1, checkpoint_every=1,
                     log_every=1, seed=0, bf16=False, gradient_checkpointing=False, use_gpu=False,
                     cpus_per_worker=1, fingerprint="x", api_start_token=None, probe_ids=[1])
    assert _worker_model_dir(spec) == str(tiny)
    elsewhere = replace(spec, model_dir=str(tmp_path / "not-on-this-node"))
    assert _worker_model_dir(elsewhere) == str(tiny)
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        _worker_model_dir(replace(elsewhere, model_revision="0" * 16))
