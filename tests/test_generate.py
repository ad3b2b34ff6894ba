"""The data job end to end: local Ray, --no-ray, a SIGKILLed driver resumed, nightly increments, malformed
records, S3 input and output. Uses a tiny model taught to write calculator calls (tests/caller_model.py)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from toolformer_ray.api_text import Markers, strip_calls
from toolformer_ray.config import load_config
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.models import load_model
from toolformer_ray.verify import verify_output

from caller_model import caller_model_dir, corpus_records
from toolformer_ray.core.reference import loss_ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caller():
    return str(caller_model_dir())


def write_jsonl(path: Path, records: list[dict], extra_lines: list[bytes] = ()) -> None:
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in extra_lines:
            f.write(line + b"\n")


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for k in range(3):
        write_jsonl(d / f"part-{k}.jsonl", corpus_records(6, seed=k, prefix=f"p{k}"))
    return d


def make_cfg(caller: str, corpus: Path | str, out: Path | str, **extra):
    overrides = [
        f"model.path={caller}", "model.dtype=float32", f"model.cache_dir={ROOT / '.cache/models'}",
        "tools={Calculator: {k: 3, m: 3, tau_f: -0.5, workers: 1, worker_cpus: 0.25}}",
        f"corpus.input={corpus}", f"run.output={out}", "ray.num_cpus=2", "ray.lm_actor_cpus=0.5",
        "ray.torch_threads=1", "ray.docs_per_task=4", "sampling.max_call_tokens=16",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def tables(version_dir: str) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("calls", "candidates", "documents", "quarantine"):
        df = pads.dataset(f"{version_dir}/{name}", format="parquet").to_table().to_pandas()
        keys = [c for c in ("doc_id", "tool", "token_pos", "call", "source_id") if c in df.columns]
        out[name] = df.sort_values(keys).reset_index(drop=True)
    return out


@pytest.mark.slow
def test_full_run_on_ray_writes_recomputable_rows(caller, corpus, tmp_path, ray_local):
    cfg = make_cfg(caller, corpus, tmp_path / "out")
    summary = run_generate(cfg, use_ray=True, progress=False)
    assert summary.shards_done == 3 and not summary.shards_failed
    t = tables(summary.output)
    assert len(t["documents"]) == 18 and len(t["calls"]) > 0
    assert set(t["calls"].columns) >= {"doc_id", "shard", "tool", "call", "result", "char_pos", "token_pos", "p_api",
                                       "prefix_plus", "prefix_no_result", "loss_plus", "loss_no_call",
                                       "loss_call_no_result", "tau_f", "model", "model_revision", "dtype",
                                       "config_hash", "schema_version"}
    # every kept call's losses can be recomputed from the row, the document's text and the model
    lm = load_model(t["calls"]["model"][0], dtype="float32")
    tok = lm.tokenizer
    texts = dict(zip(t["documents"]["doc_id"], t["documents"]["text"]))
    for row in t["calls"].head(6).itertuples():
        ids = tok(texts[row.doc_id], add_special_tokens=False)["input_ids"]
        plus = tok(row.prefix_plus, add_special_tokens=False)["input_ids"]
        nores = tok(row.prefix_no_result, add_special_tokens=False)["input_ids"]
        assert row.loss_plus == pytest.approx(loss_ref(lm.model, [], plus, ids, row.token_pos), abs=1e-4)
        assert row.loss_no_call == pytest.approx(loss_ref(lm.model, [], [], ids, row.token_pos), abs=1e-4)
        assert row.loss_call_no_result == pytest.approx(loss_ref(lm.model, [], nores, ids, row.token_pos), abs=1e-4)
        assert min(row.loss_no_call, row.loss_call_no_result) - row.loss_plus >= row.tau_f
    # `toolformer-ray verify` does the same from the output alone, and catches a tampered loss
    report, tol = verify_output(summary.output)
    assert report.ok and report.checked == len(t["calls"]) and tol == 1e-4 and report.max_abs_diff < 1e-4
    tampered_dir = tmp_path / "tampered"
    shutil.copytree(summary.output, tampered_dir / Path(summary.output).name)
    part = sorted((tampered_dir / Path(summary.output).name / "calls").glob("*.parquet"))[0]
    table = pq.read_table(part)
    losses = table.column("loss_plus").to_pylist()
    losses[0] += 0.01
    pq.write_table(table.set_column(table.schema.get_field_index("loss_plus"), "loss_plus",
                                    pa.array(losses, table.schema.field("loss_plus").type)), part)
    bad, _ = verify_output(str(tampered_dir / Path(summary.output).name))
    assert not bad.ok and len(bad.mismatches) == 1 and "loss_plus" in bad.mismatches[0]
    # the augmented text is the original plus the kept calls
    markers = Markers()
    for row in t["documents"].itertuples():
        assert strip_calls(row.augmented_text, markers) == row.text
    assert t["documents"]["n_calls"].sum() == len(t["calls"])
    manifest = json.loads(Path(summary.manifest).read_text())
    assert manifest["counts"]["shards_done"] == 3 and manifest["model"]["revision"]
    assert manifest["model"]["attention"]["mode"] == "fast"  # the path the LM actors served it by
    f = manifest["funnel"]["Calculator"]
    assert f["docs_seen"] == 18 and f["kept_after_cap"] == len(t["calls"])
    assert Path(summary.report).is_file()
    assert (Path(summary.report).parent / "p_api_positions.png").stat().st_size > 1000
    assert "p_api_positions.png" in Path(summary.report).read_text()
    # --no-ray runs the same scheduler in this process and gives the same rows
    cfg2 = make_cfg(caller, corpus, tmp_path / "out-noray")
    t2 = tables(run_generate(cfg2, use_ray=False, progress=False).output)
    cols = ["doc_id", "tool", "token_pos", "call", "result", "loss_plus"]
    pd.testing.assert_frame_equal(t["calls"][cols], t2["calls"][cols], atol=1e-5)


@pytest.mark.slow
def test_killed_driver_resumes_to_identical_rows(caller, tmp_path, ray_local):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(5):
        write_jsonl(corpus / f"part-{k}.jsonl", corpus_records(8, seed=10 + k, prefix=f"k{k}"))
    ref = run_generate(make_cfg(caller, corpus, tmp_path / "ref"), use_ray=True, progress=False)
    out = tmp_path / "out"
    cfg = make_cfg(caller, corpus, out)
    cmd = [sys.executable, "-m", "toolformer_ray.cli", "generate", "--no-ray",
           "-s", f"model.path={caller}", "-s", "model.dtype=float32",
           "-s", f"model.cache_dir={ROOT / '.cache/models'}",
           "-s", "tools={Calculator: {k: 3, m: 3, tau_f: -0.5}}", "-s", "ray.torch_threads=1",
           "-s", "ray.docs_per_task=4", "-s", "sampling.max_call_tokens=16",
           "-i", str(corpus), "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = out / ref.config_hash / "_committed"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if committed.is_dir() and len(list(committed.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # really killed, mid-run
    proc.wait()
    n_before = len(list(committed.glob("*.json")))
    assert 2 <= n_before < 5, "the run should have been killed part-way"
    resumed = run_generate(cfg, use_ray=True, progress=False)
    assert resumed.shards_skipped == n_before and resumed.shards_done == 5 - n_before
    a, b = tables(ref.output), tables(resumed.output)
    for name in ("calls", "documents"):
        drop = ["model"] if name == "calls" else []
        pd.testing.assert_frame_equal(a[name].drop(columns=drop), b[name].drop(columns=drop), atol=1e-5)
    assert len(b["documents"]) == 40  # no loss, no duplicates


@pytest.mark.slow
def test_nightly_increment_and_config_change(caller, corpus, tmp_path, ray_local):
    out = tmp_path / "out"
    first = run_generate(make_cfg(caller, corpus, out), use_ray=False, progress=False)
    assert first.shards_done == 3
    write_jsonl(corpus / "part-new.jsonl", corpus_records(5, seed=99, prefix="new"))
    (corpus / "part-0.jsonl").touch()  # a newer file time alone changes nothing: shards are known by content
    second = run_generate(make_cfg(caller, corpus, out), use_ray=True, progress=False)
    assert (second.shards_skipped, second.shards_done) == (3, 1)
    docs = tables(second.output)["documents"]
    assert len(docs) == 23 and docs["doc_id"].is_unique
    # a changed result-affecting setting starts a new output version; a resource setting does not
    same = make_cfg(caller, corpus, out, **{"ray.docs_per_task": 2})
    changed = make_cfg(caller, corpus, out, **{"tools.Calculator.k": 2})
    assert same.config_hash() == first.config_hash != changed.config_hash()


@pytest.mark.slow
def test_malformed_records_are_quarantined(caller, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "mixed.jsonl", corpus_records(3, seed=5),
                [b'{"id": "bad-json", "text": ', b'{"id": "no-text"}', b'{"id": "empty", "text": ""}',
                 b'{"id": "bad-utf8", "text": "caf\xe9 \xff"}', b'["a", "list"]',
                 b'{"id": "long", "text": "' + b"x" * 600 + b'"}'])
    cfg = make_cfg(caller, corpus, tmp_path / "out", **{"corpus.max_record_chars": 500})
    summary = run_generate(cfg, use_ray=False, progress=False)
    assert summary.shards_done == 1 and summary.documents == 3 and summary.quarantined == 6
    q = tables(summary.output)["quarantine"]
    reasons = " | ".join(q["reason"])
    for word in ("bad JSON", "no 'text'", "empty text", "UTF-8", "list", "over-long"):
        assert word in reasons
    assert any(b"\xff" in raw for raw in q["raw"])  # the raw bytes are kept


@pytest.mark.slow
def test_s3_input_and_output(caller, s3_endpoint, tmp_path):
    fs = s3_endpoint.fs()
    for k in range(2):
        local = tmp_path / f"part-{k}.jsonl"
        write_jsonl(local, corpus_records(4, seed=20 + k, prefix=f"s{k}"))
        fs.put(str(local), s3_endpoint.uri("corpus", local.name))
    cfg = make_cfg(caller, s3_endpoint.uri("corpus"), s3_endpoint.uri("runs"))
    summary = run_generate(cfg, use_ray=True, progress=False)  # starts its own Ray with the AWS_* env
    assert summary.output.startswith("s3://") and summary.shards_done == 2
    version = summary.output[len("s3://"):]
    docs = pads.dataset(f"{version}/documents", format="parquet", filesystem=s3_endpoint.pyarrow_fs()).to_table()
    assert docs.num_rows == 8
    manifest = json.loads(fs.cat(f"{version}/manifest.json"))
    assert manifest["counts"]["shards_done"] == 2
    again = run_generate(cfg, use_ray=False, progress=False)  # resume on S3: everything is done
    assert again.shards_skipped == 2 and again.shards_done == 0
