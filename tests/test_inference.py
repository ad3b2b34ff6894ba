"""Tool-aware decoding against the tiny model, steered by a logits processor that follows a script.

The processor boosts the next scripted token whenever a row's full token sequence is a prefix of its
script, so the model writes exactly the call we want; everything after the script is the model's own
greedy choice. The reference for "resume is exact" is plain greedy decoding from scratch (no cache) of
the whole token sequence, with the same processor and the same start-token mask.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from benchmarks.decoding import make_decoder as decoder_for
from toolformer_ray.api_text import Markers
from toolformer_ray.config import InferenceConfig
from toolformer_ray.inference import ToolDecoder
from toolformer_ray.models import load_model
from toolformer_ray.tools.base import Tool


class AddTool(Tool):
    """Test-only tool: sums "a+b+..."; no result otherwise; counts its calls. Not registered: the decoder
    takes a plain dict of tools."""
    name = "TestAdd"

    def __init__(self, options=None, delay: float = 0.0):
        super().__init__(options)
        self.delay = delay
        self.inputs: list[str] = []
        self.lock = threading.Lock()

    def run(self, inputs, dates=None):
        time.sleep(self.delay)
        with self.lock:
            self.inputs += inputs
        out = []
        for s in inputs:
            try:
                total = sum(float(x) for x in s.split("+"))
                out.append(str(int(total)) if total.is_integer() else str(total))
            except ValueError:
                out.append(None)
        return out


class EchoTool(Tool):
    name = "TestEcho"

    def run(self, inputs, dates=None):
        return [f"echo {s}" for s in inputs]


class BrokenTool(Tool):
    name = "TestBroken"

    def run(self, inputs, dates=None):
        raise RuntimeError("boom")


class DateTool(Tool):
    name = "TestDate"
    uses_date = True
    takes_input = False

    def run(self, inputs, dates=None):
        return [f"Today is {d}." for d in dates]



@pytest.fixture(scope="module")
def lm():
    # One intra-op thread: the tiny model gains nothing from two, and on a shared 2-core machine two threads
    # per process oversubscribe the cores (a forward goes from ~6 ms to ~300 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("tiny", dtype="float32")
    torch.set_num_threads(threads)


def enc(lm, text):
    return lm.tokenizer.encode(text, add_special_tokens=False)


class Script:
    """Logits processor: at each prefix of a scripted sequence, make its next token the argmax (or rank r)."""

    def __init__(self, sequences: list[list[int]], start_rank: dict[int, int] | None = None, start_id: int = 933):
        self.sequences = sequences
        self.start_rank = start_rank or {}  # script index -> rank the start token gets instead of the argmax
        self.start_id = start_id
        self.seen: dict[tuple, torch.Tensor] = {}  # sequence -> the raw logits the decoder had for it

    def __call__(self, seqs, logits):
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            # The first logits seen for a sequence (later ones may come from placeholder steps of a waiting row).
            self.seen.setdefault(tuple(seq), logits[i].clone())
            for k, full in enumerate(self.sequences):
                if len(seq) < len(full) and full[:len(seq)] == seq:
                    tok = full[len(seq)]
                    if tok == self.start_id and k in self.start_rank:
                        r = self.start_rank[k]
                        top = logits[i].topk(r).values
                        logits[i, tok] = (top[r - 2] + top[r - 1]) / 2  # exactly rank r
                    else:
                        logits[i, tok] = logits[i].max() + 50.0
                    break
        return logits


def make_decoder(lm, tools, processor=None, resume="kv", **cfg):
    # resume "kv": the library's ToolDecoder; "reencode", "reencode_batch": benchmark baselines
    cfg.setdefault("max_new_tokens", 16)
    cfg.setdefault("top_k_start", 1)  # argmax only, unless a test is about the top-k rule
    return decoder_for(resume, lm.model, lm.tokenizer, {t.name: t for t in tools}, Markers(),
                       InferenceConfig(**cfg), logits_processor=processor)


def greedy_from_scratch(lm, ids, n, processor, start_id=933, eos=2):
    """Reference: n greedy tokens after `ids`, re-running the model on the full sequence each step."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids]), logits_to_keep=1).logits[:, -1].float()
            logits = processor([ids], logits) if processor else logits
            logits[0, start_id] = float("-inf")  # the call budget is used up: p(API-start) = 0
            tok = int(logits[0].argmax())
            if tok == eos:
                break
            ids.append(tok)
            out.append(tok)
    return out


PROMPTS = ["The sum of 3 and 4 is", "Here is a much longer prompt, with more words in it, about numbers:", "Hi"]


def scripted(lm, prompts=PROMPTS):
    a = enc(lm, prompts[0]) + enc(lm, " [TestAdd(3+4) ->")
    b = enc(lm, prompts[1]) + enc(lm, " so") + enc(lm, " we") + enc(lm, " [TestAdd(10+5+1) ->")
    return Script([a, b])


def check_logits_match_from_scratch(lm, processor, atol=2e-4):
    """Every next-token distribution the batched, cached decoder used equals a from-scratch forward pass."""
    by_len = sorted(processor.seen, key=len, reverse=True)
    checked = 0
    done: set[tuple] = set()
    with torch.no_grad():
        for seq in by_len:
            if seq in done:
                continue
            ref = lm.model(torch.tensor([list(seq)])).logits[0].float()  # position j predicts token j+1
            for j in range(len(seq)):
                prefix = seq[:j + 1]
                if prefix in processor.seen and prefix not in done:
                    diff = (processor.seen[prefix] - ref[j]).abs().max().item()
                    assert diff < atol, f"logits differ by {diff} after {len(prefix)} tokens"
                    done.add(prefix)
                    checked += 1
    return checked


def check_exact_resume(lm, transcripts, prompts, processor, max_new):
    for prompt, tr in zip(prompts, transcripts):
        ids = enc(lm, prompt)
        if not tr.calls:
            # No call: the whole continuation must be plain greedy decoding (with the start token allowed).
            continue
        text_ids = tr.token_ids
        close = next(i for i in range(1, len(text_ids) + 1)
                     if lm.tokenizer.decode(text_ids[:i]).endswith(tr.calls[0].text))
        prefix, rest = ids + text_ids[:close], text_ids[close:]
        assert rest, "the model should go on after the tool result"
        assert rest == greedy_from_scratch(lm, prefix, len(rest), processor)


def test_tool_runs_at_marker_and_resume_from_kv_cache_is_exact(lm):
    add = AddTool()
    proc = scripted(lm)
    # batch_size 2 < 3 prompts: the third prompt joins the running batch (continuous batching).
    dec = make_decoder(lm, [add], proc, batch_size=2, max_new_tokens=20)
    out = dec.generate(PROMPTS)
    assert sorted(add.inputs) == ["10+5+1", "3+4"]  # each tool ran exactly once per call
    a, b, c = out
    assert a.text.startswith(" [TestAdd(3+4) -> 7]")
    assert [(x.tool, x.input, x.result, x.status) for x in a.calls] == [("TestAdd", "3+4", "7", "ok")]
    assert b.text.startswith(" so we [TestAdd(10+5+1) -> 16]")
    assert b.calls[0].text == " [TestAdd(10+5+1) -> 16]"
    assert b.final_text == b.text.replace(" [TestAdd(10+5+1) -> 16]", "")
    assert a.called and b.called and not c.called
    assert all(t.n_generated == 20 for t in out)  # the tool result does not count against max_new_tokens
    check_exact_resume(lm, out, PROMPTS, proc, 20)
    assert check_logits_match_from_scratch(lm, proc) >= 3 * 20
    # The row without a call is plain greedy decoding from scratch.
    assert c.token_ids == greedy_from_scratch(lm, enc(lm, PROMPTS[2]), 20, proc)


def test_reencode_baseline_gives_the_same_tokens(lm):
    proc = scripted(lm)
    kv = make_decoder(lm, [AddTool()], proc, batch_size=3).generate(PROMPTS)
    for resume in ("reencode", "reencode_batch"):
        proc.seen.clear()
        re = make_decoder(lm, [AddTool()], proc, batch_size=3, resume=resume).generate(PROMPTS)
        assert [t.token_ids for t in kv] == [t.token_ids for t in re]
        assert [t.calls for t in kv] == [t.calls for t in re]
        assert check_logits_match_from_scratch(lm, proc) >= 3 * 16


def test_async_slow_tool_does_not_stall_others_and_stays_exact(lm):
    proc = scripted(lm)
    sync = make_decoder(lm, [AddTool()], proc, batch_size=3).generate(PROMPTS)
    slow = AddTool(delay=0.3)
    dec = make_decoder(lm, [slow], proc, batch_size=3, async_tools=True)
    out = dec.generate(PROMPTS)
    assert [t.token_ids for t in out] == [t.token_ids for t in sync]
    check_exact_resume(lm, out, PROMPTS, proc, 16)
    proc.seen.clear()
    out = make_decoder(lm, [slow], proc, batch_size=3, async_tools=True).generate(PROMPTS)
    assert check_logits_match_from_scratch(lm, proc) >= 3 * 16


def test_start_counts_when_in_top_k_not_only_argmax(lm):
    prompt = "Numbers:"
    full = enc(lm, prompt) + enc(lm, " [TestAdd(1+2) ->")
    proc = Script([full], start_rank={0: 5})  # the start token is the 5th most likely, never the argmax
    with_k10 = make_decoder(lm, [AddTool()], proc, top_k_start=10).generate([prompt])[0]
    with_k3 = make_decoder(lm, [AddTool()], proc, top_k_start=3).generate([prompt])[0]
    assert with_k10.calls and with_k10.calls[0].result == "3"
    assert not with_k3.calls and 933 not in with_k3.token_ids


def test_disabled_mode_never_starts_a_call(lm):
    proc = scripted(lm)
    add = AddTool()
    out = make_decoder(lm, [add], proc).generate(PROMPTS, mode="disabled")
    assert not add.inputs
    assert all(not t.calls and 933 not in t.token_ids for t in out)


def test_forced_mode_starts_with_a_call_to_an_allowed_tool(lm):
    add = AddTool()
    out = make_decoder(lm, [add, EchoTool()], max_call_tokens=6).generate(
        ["Hi", "What is it"], mode="forced", allowed_tools=["TestAdd"])
    for t in out:
        assert t.token_ids[0] == 933
        assert t.text.startswith(" [TestAdd(")  # the name is constrained to the allowed tool
        assert len(t.calls) == 1


def test_disallowed_tool_cannot_be_called(lm):
    add = AddTool()
    proc = scripted(lm)  # steers towards TestAdd, which is not allowed
    out = make_decoder(lm, [add, EchoTool()], proc, max_call_tokens=8).generate(PROMPTS[:1], allowed_tools=["TestEcho"])
    assert not add.inputs
    assert out[0].text.startswith(" [TestE")
    assert out[0].calls[0].tool in (None, "TestEcho")


@pytest.mark.parametrize("tool, status, suffix", [(BrokenTool(), "error", "]"), (AddTool(), "no_result", "]")])
def test_tool_error_or_no_result_appends_empty_result_and_goes_on(lm, tool, status, suffix):
    call = f" [{tool.name}(x) ->"
    proc = Script([enc(lm, "Go") + enc(lm, call)])
    t = make_decoder(lm, [tool], proc).generate(["Go"])[0]
    assert t.text.startswith(call + suffix)
    assert t.calls[0].status == status and t.calls[0].result is None
    assert len(t.text) > len(call + suffix) and t.n_generated == 16


def test_result_marker_split_across_tokens(lm):
    # ")->" is two tokens ")-" ">": the marker is found on the decoded text.
    proc = Script([enc(lm, "Go") + enc(lm, " [TestAdd(3+4)->")])
    t = make_decoder(lm, [AddTool()], proc).generate(["Go"])[0]
    assert t.text.startswith(" [TestAdd(3+4)-> 7]")
    assert t.calls[0].result == "7"


def test_end_marker_without_result_runs_no_tool(lm):
    # ")]" is one token: the call closes without asking for a result.
    add = AddTool()
    proc = Script([enc(lm, "Go") + enc(lm, " [TestAdd(3+4)]")])
    t = make_decoder(lm, [add], proc).generate(["Go"])[0]
    assert not add.inputs
    assert t.calls[0].status == "closed" and not t.called
    assert t.text.startswith(" [TestAdd(3+4)]") and t.final_text == t.text[len(" [TestAdd(3+4)]"):]


def test_max_calls(lm):
    two = enc(lm, "Go") + enc(lm, " [TestAdd(1+1) ->") + enc(lm, " 2]") + enc(lm, " and") + enc(lm, " [TestAdd(2+2) ->")
    proc = Script([two])
    one = make_decoder(lm, [AddTool()], proc, max_calls=1, max_new_tokens=24).generate(["Go"])[0]
    both = make_decoder(lm, [AddTool()], proc, max_calls=2, max_new_tokens=24).generate(["Go"])[0]
    assert [c.input for c in one.calls] == ["1+1"]
    assert [c.input for c in both.calls] == ["1+1", "2+2"]
    assert both.text.startswith(" [TestAdd(1+1) -> 2] and [TestAdd(2+2) -> 4]")


def test_multi_token_start_marker_is_forced_after_its_first_token(lm):
    markers = Markers(start=" <API>", result=" ->", end="</API>")
    first = enc(lm, " <API>")[0]
    proc = Script([enc(lm, "Go") + [first]], start_id=-1)  # only the marker's first token is steered
    dec = ToolDecoder(lm.model, lm.tokenizer, {"TestAdd": AddTool()}, markers,
                      InferenceConfig(max_new_tokens=12, top_k_start=1, max_call_tokens=6), logits_processor=proc)
    t = dec.generate(["Go"])[0]
    assert t.text.startswith(" <API>TestAdd(")
    assert len(t.calls) == 1


def test_dates_reach_tools_that_use_them(lm):
    proc = Script([enc(lm, "Go") + enc(lm, " [TestDate() ->")])
    t = make_decoder(lm, [DateTool()], proc).generate(["Go"], dates=["2023-01-30"])[0]
    assert t.text.startswith(" [TestDate() -> Today is 2023-01-30.]")


def test_stop_string_and_eos_end_an_output(lm):
    proc = Script([enc(lm, "Go") + enc(lm, " 42\nmore text")])
    t = make_decoder(lm, [], proc, stop=["\n"]).generate(["Go"])[0]
    assert t.finish_reason == "stop" and t.final_text == " 42"
    proc = Script([enc(lm, "Go") + enc(lm, " 42") + [2]])
    t = make_decoder(lm, [], proc).generate(["Go"])[0]
    assert t.finish_reason == "eos" and t.text == " 42"


def test_bad_arguments_are_clear_errors(lm):
    from toolformer_ray.errors import UserError

    dec = make_decoder(lm, [AddTool()])
    with pytest.raises(UserError, match="unknown decoding mode"):
        dec.generate(["x"], mode="sometimes")
    with pytest.raises(UserError, match="not available"):
        dec.generate(["x"], allowed_tools=["Nope"])
    with pytest.raises(UserError, match="forced"):
        dec.generate(["x"], mode="forced", allowed_tools=[])
    assert dec.generate([""], max_new_tokens=3)[0].n_generated == 3  # an empty prompt still decodes



def test_a_tool_that_hangs_times_out_with_an_empty_result(lm):
    proc = Script([enc(lm, "Go") + enc(lm, " [TestAdd(1+1) ->")])
    for async_tools in (False, True):
        slow = AddTool(delay=1.5)
        t0 = time.monotonic()
        t = make_decoder(lm, [slow], proc, tool_timeout_s=0.2, async_tools=async_tools).generate(["Go"])[0]
        assert time.monotonic() - t0 < 1.4
        assert t.calls[0].status == "error" and t.text.startswith(" [TestAdd(1+1) ->]")


def test_marker_token_with_text_after_it_is_cut_at_the_marker(lm):
    # With "=" as the result marker, the model's token "=(" carries text past the marker: the row keeps
    # "=" (re-tokenised) and the result follows; the cache holds exactly the tokens of the transcript.
    markers = Markers(start=" [", result=" =", end="]")
    proc = Script([enc(lm, "Go") + enc(lm, " [TestAdd(3+4)=(")])
    dec = ToolDecoder(lm.model, lm.tokenizer, {"TestAdd": AddTool()}, markers,
                      InferenceConfig(max_new_tokens=12, top_k_start=1), logits_processor=proc)
    t = dec.generate(["Go"])[0]
    assert t.text.startswith(" [TestAdd(3+4)= 7]")
    assert t.calls[0].result == "7"
    assert check_logits_match_from_scratch(lm, proc) >= 12


def test_results_are_cleaned_like_training_data(lm):
    class Messy(Tool):
        name = "TestMessy"

        def run(self, inputs, dates=None):
            return ["two\nlines [and] brackets"]

    proc = Script([enc(lm, "Go") + enc(lm, " [TestMessy(x) ->")])
    t = make_decoder(lm, [Messy()], proc).generate(["Go"])[0]
    assert t.calls[0].result == "two lines (and) brackets"
    assert t.text.startswith(" [TestMessy(x) -> two lines (and) brackets]")


def test_transcript_describe(lm):
    proc = Script([enc(lm, "Go") + enc(lm, " [TestAdd(3+4) ->")])
    t = make_decoder(lm, [AddTool()], proc).generate(["Go"])[0]
    lines = t.describe().splitlines()
    assert lines[0] == "prompt: Go"
    assert lines[1] == "  call 1: TestAdd(3+4) -> 7  [ok]"
    assert lines[2].startswith("output:  [TestAdd(3+4) -> 7]") and lines[3] == f"final:  {t.final_text}"
    t = make_decoder(lm, [AddTool()], max_call_tokens=3).generate(["Go"], mode="forced")[0]
    assert t.describe().splitlines()[1].startswith("  call 1: '[TestAdd(")
