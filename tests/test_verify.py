"""`toolformer-ray verify` checks what it says: on a tokenizer that adds BOS, from re-rendered
prefixes, at the stored positions, and on a seeded sample of the rejected candidates too. The output
comes from a real `generate --no-ray` run of the tiny caller model (tests/caller_model.py) given a
BOS-adding tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers.processors import TemplateProcessing

from toolformer_ray.config import load_config
from toolformer_ray.core.lm import bos_ids
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.models import load_tokenizer
from toolformer_ray.verify import verify_output

from caller_model import caller_model_dir, corpus_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bos_run(tmp_path_factory) -> str:
    """One output version, made by the caller model with a tokenizer that adds BOS (as Llama's
    does)."""
    tmp = tmp_path_factory.mktemp("verify")
    model = tmp / "caller-bos"
    shutil.copytree(caller_model_dir(), model, ignore=shutil.ignore_patterns("revision.json"))
    tok = load_tokenizer(model)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A",
                                                       pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.bos_token_id)])
    tok.save_pretrained(model)
    assert bos_ids(load_tokenizer(model)) == [tok.bos_token_id]
    corpus = tmp / "corpus"
    corpus.mkdir()
    with open(corpus / "part-0.jsonl", "w") as f:
        for r in corpus_records(6, seed=0):
            f.write(json.dumps(r) + "\n")
    cfg = load_config(None, [
        f"model.path={model}", "model.dtype=float32", f"model.cache_dir={ROOT / '.cache/models'}",
        "tools={Calculator: {k: 4, m: 3, tau_f: 0.0, workers: 1}}", f"corpus.input={corpus}",
        f"run.output={tmp / 'out'}", "sampling.max_call_tokens=16"])
    return run_generate(cfg, use_ray=False, progress=False).output


def _tamper(version: str, dest: Path, table: str, column: str, change,
            where=lambda row: True) -> str:
    """A copy of the version with `column` changed in the first row of `table` that `where`
    accepts."""
    out = dest / Path(version).name
    shutil.copytree(version, out)
    for part in sorted((out / table).glob("*.parquet")):
        t = pq.read_table(part)
        rows = t.to_pylist()
        hit = next((k for k, row in enumerate(rows) if where(row)), None)
        if hit is None:
            continue
        values = t.column(column).to_pylist()
        values[hit] = change(values[hit])
        idx = t.schema.get_field_index(column)
        pq.write_table(t.set_column(idx, column, pa.array(values, t.schema.field(column).type)),
                       part)
        return str(out)
    raise AssertionError(f"no row of {table} to tamper with")


@pytest.mark.slow
def test_verify_passes_on_a_bos_run_and_checks_rejected_calls(bos_run):
    report, tol = verify_output(bos_run)
    assert report.ok, report.describe(tol)
    assert report.checked > 0 and report.rejected_checked > 0 and report.max_abs_diff < 1e-4


@pytest.mark.slow
def test_verify_catches_tampered_rows(bos_run, tmp_path):
    cases = {
        # a rejected call's loss: a bug that under-keeps would look like this
        "rejected": ("candidates", "loss_plus",
                     lambda v: v + 0.01, lambda r: not r["kept"], "mismatches"),
        # the stored prefix is no longer the call's rendering (the losses still match the stored
        # text)
        "prefix": ("calls", "prefix_plus",
                   lambda v: v.replace("(", "( "), lambda r: True, "row_mismatches"),
        # the position no longer matches the token (char_pos one character later)
        "char_pos": ("calls", "char_pos", lambda v: v + 1, lambda r: True, "row_mismatches"),
    }
    for k, (table, column, change, where, field) in cases.items():
        bad, _ = verify_output(_tamper(bos_run, tmp_path / k, table, column, change, where))
        assert not bad.ok and getattr(bad, field), (k, bad.describe(1e-4))


@pytest.mark.slow
def test_code_version_is_recorded_in_manifest_records_and_rows(bos_run):
    import pyarrow.dataset as pads

    from toolformer_ray.version import code_version

    version = code_version()
    assert version.startswith("0.") and ("+git." in version or "+src." in version)
    manifest = json.loads((Path(bos_run) / "manifest.json").read_text())
    assert manifest["code_version"] == version and manifest["code_versions"] == [version]
    for table in ("calls", "candidates"):
        rows = pads.dataset(f"{bos_run}/{table}",
                            format="parquet").to_table().column("code_version")
        assert len(rows) and set(rows.to_pylist()) == {version}
