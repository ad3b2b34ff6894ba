"""The evaluation harness end to end on the tiny model: tasks x modes -> table, JSON, chart,
predictions; scoring of a steered output that calls the real Calculator; perplexity against a
brute-force reference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from toolformer_ray.api_text import Markers
from toolformer_ray.cli import app
from toolformer_ray.config import load_config
from toolformer_ray.errors import UserError
from toolformer_ray.evaluation import perplexity, read_task, run_eval
from toolformer_ray.evaluation.run import _evaluate
from toolformer_ray.inference import ToolDecoder, load_tools
from toolformer_ray.models import load_model

FIX = Path(__file__).parent / "fixtures" / "eval"
# Naming tools in the config replaces the default five: only the two that need no index or weights.
ONLY_LOCAL_TOOLS = ["tools.Calculator.enabled=true", "tools.Calendar.enabled=true"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more; two oversubscribe a shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny", dtype="float32")


def config(tmp_path, *extra):
    return load_config(None,
                       ["model.path=tiny", "model.dtype=float32", f"eval.output={tmp_path}/eval",
                              "eval.max_new_tokens=8", *ONLY_LOCAL_TOOLS, *extra])


def test_run_eval_writes_table_json_chart_and_predictions(tmp_path):
    cfg = config(tmp_path, "eval.limit=2")
    tasks = [("math", str(FIX / "mawps_single.json")), ("lama", str(FIX / "lama_trex.jsonl")),
             ("qa", str(FIX / "nq.dpr.tsv")), ("temporal", "dateset:3"),
             ("perplexity", str(FIX / "heldout.jsonl"))]
    report = run_eval(cfg, tasks, models=["tiny"], modes=["tools", "disabled"], progress=None)
    assert [(r.task, r.mode) for r in report.rows] == [
        ("math", "tools"), ("math", "disabled"), ("lama", "tools"), ("lama", "disabled"), ("qa", "tools"),
        ("qa", "disabled"), ("temporal", "tools"), ("temporal", "disabled"), ("perplexity", "disabled")]
    assert all(r.n == 2 for r in report.rows)  # --limit
    ppl = report.rows[-1].perplexity
    assert ppl is not None and ppl > 1
    assert report.rows[0].data == "mawps_single" and report.rows[6].data == "dateset"
    out = tmp_path / "eval"
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 9 and data["meta"]["tools_available"] == ["Calculator", "Calendar"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| math | mawps_single | tiny | tools | 2 |" in table
    preds = (out / "predictions" / "tiny__math-mawps_single__disabled.jsonl").read_text().splitlines()
    assert len(preds) == 2 and json.loads(preds[0])["answers"] == ["504"]
    assert "| task | data | model | mode |" in report.describe()
    # Greedy and deterministic: a second run gives the same outputs.
    again = run_eval(cfg, tasks[:1], models=["tiny"], modes=["disabled"], progress=None)
    assert (out / "predictions" / "tiny__math-mawps_single__disabled.jsonl").read_text().splitlines() == preds
    assert again.rows[0].correct == report.rows[1].correct


class Steer:
    """Make the tiny model write `text` after each prompt (the tool result itself is inserted by the
    decoder)."""

    def __init__(self, tok, prompts, texts):
        self.full = [tok.encode(p) + tok.encode(t, add_special_tokens=False)
                     for p, t in zip(prompts, texts)]

    def __call__(self, seqs, logits):
        for i, seq in enumerate(seqs):
            for full in self.full:
                if len(seq) < len(full) and full[:len(seq)] == seq:
                    logits[i, full[len(seq)]] = logits[i].max() + 50
        return logits


def test_scoring_reads_the_text_without_the_call_and_counts_calls(tmp_path, lm):
    cfg = config(tmp_path)
    data = read_task("math", str(FIX / "mawps_single.json"), limit=2)
    tools, failed = load_tools(cfg, ["Calculator"])
    assert not failed
    prompts = [f"Question: {e.question}\nAnswer:" for e in data.examples]
    # Example 1 calls the Calculator and then answers; example 2 answers 12 (wrong) without a call.
    calc = tok_text = " [Calculator(56*9) ->"
    suffix = " 504]"
    steer = Steer(lm.tokenizer, prompts, [calc + suffix + " It is 504 books.\n", " 12\n"])
    infer = cfg.inference.model_copy(update={"stop": ["\n"], "top_k_start": 1})
    dec = ToolDecoder(lm.model, lm.tokenizer, tools, Markers(), infer, logits_processor=steer)
    row, records = _evaluate("math", data, "tools", ["Calculator"], dec, cfg, "2024-01-01")
    assert records[0]["output"].startswith(tok_text + suffix)
    assert records[0]["calls"] == [{"tool": "Calculator", "input": "56*9", "result": "504", "status": "ok"}]
    assert records[0]["final"] == " It is 504 books." and records[0]["correct"]
    assert records[1]["final"] == " 12" and not records[1]["correct"]
    assert (row.n, row.correct, row.with_call) == (2, 1, 1)
    assert row.accuracy == 0.5 and row.call_rate == 0.5


def test_perplexity_matches_the_models_own_loss(lm):
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Numbers: 1, 2, 3, 4, 5 and then some more words."]
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        nll = sum(lm.model(torch.tensor([i]), labels=torch.tensor([i])).loss.item() * (len(i) - 1)
                  for i in ids)
    expected = math.exp(nll / sum(len(i) - 1 for i in ids))
    assert perplexity(lm.model, lm.tokenizer, texts, max_length=64, batch_size=2) == pytest.approx(expected, rel=1e-4)
    # Windows: each window's first token has no context and is not scored.
    short = perplexity(lm.model, lm.tokenizer, texts[:1], max_length=4, batch_size=3)
    w = [ids[0][k:k + 4] for k in range(0, len(ids[0]), 4)]
    with torch.no_grad():
        nll = sum(lm.model(torch.tensor([x]), labels=torch.tensor([x])).loss.item() * (len(x) - 1)
                  for x in w if len(x) > 1)
    assert short == pytest.approx(math.exp(nll / sum(len(x) - 1 for x in w if len(x) > 1)), rel=1e-4)


def test_perplexity_with_the_start_token_disabled(lm):
    text = "Plain text with no bracket at all, only words."
    ids = lm.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    logits[:, 933] = float("-inf")
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])
    expected = math.exp(-lp.mean().item())
    got = perplexity(lm.model, lm.tokenizer, [text], mask_token_ids=[933])
    assert got == pytest.approx(expected, rel=1e-4)
    assert got <= perplexity(lm.model, lm.tokenizer, [text])  # mass moves off " [" onto the other tokens
    # A text that does contain " [" still has a finite perplexity.
    assert math.isfinite(perplexity(lm.model, lm.tokenizer, ["a [b] c"], mask_token_ids=[933]))


def test_bad_requests_are_clear_errors(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        run_eval(cfg, [("poetry", "x")], models=["tiny"], progress=None)
    with pytest.raises(UserError, match="unknown mode"):
        run_eval(cfg, [("math", str(FIX / "gsm8k.jsonl"))], models=["tiny"], modes=["sometimes"],
                 progress=None)
    with pytest.raises(UserError, match="not found"):
        run_eval(cfg, [("math", str(tmp_path / "nope.json"))], models=["tiny"], progress=None)
    with pytest.raises(UserError, match="no data path"):
        run_eval(cfg, None, models=["tiny"], progress=None)
    with pytest.raises(UserError, match="no usable"):
        run_eval(config(tmp_path, "eval.limit=0"), [("math", str(FIX / "gsm8k.jsonl"))],
                 models=["tiny"],
                 progress=None)


def test_cli_eval_and_infer(tmp_path):
    runner = CliRunner()
    sets = [x
            for s in ["model.dtype=float32", "eval.max_new_tokens=4", "inference.max_new_tokens=4",
                        *ONLY_LOCAL_TOOLS] for x in ("--set", s)]
    res = runner.invoke(app,
                        ["eval", "--task", "math", "--data", str(FIX / "gsm8k.jsonl"), "--model",
                         "tiny",
                              "--limit", "1", "-o", str(tmp_path / "cli"), *sets])
    assert res.exit_code == 0, res.output
    assert "| math | gsm8k | tiny | tools | 1 |" in res.output
    assert (tmp_path / "cli" / "results.json").is_file()
    res = runner.invoke(app, ["eval", "--task", "math", "--task", "qa", "--data", "x"])
    assert res.exit_code == 2
    res = runner.invoke(app,
                        ["infer", "What is 2+2?", "--model", "tiny", "--mode", "disabled", *sets])
    assert res.exit_code == 0, res.output
    assert "prompt: What is 2+2?\noutput: " in res.output
    res = runner.invoke(app,
                        ["infer", "x", "--model", "tiny", "--tool", "Calculator", "--date",
                         "2023-13-40", *sets])
    assert res.exit_code != 0 and "ISO date" in str(res.exception or res.output)
