"""GPU check: the fast path against plain forwards, sample + score throughput against the GPU's
compute floor, and tool-aware decoding (KV-cache resume vs re-encoding), on random-weight models of
two shapes.

Needs only torch + transformers (no Ray, DeepSpeed, pydantic, model weights or data files): the
models are built from configs (the default model's shape, SmolLM2-135M, and a ~1B Llama shape), the
text is synthetic and a word-level tokenizer is made up here. It imports only the Ray-free core
(toolformer_ray.core.*).

    python benchmarks/gpu_check.py                       # one CUDA GPU, within --budget-s (420)
    python benchmarks/gpu_check.py --device cpu --quick  # toy sizes (tests/test_gpu_check.py)

Prints a table and writes JSON (default benchmarks/results/gpu_check-<device>[-quick].json).
- exactness: in float32, p_i (log space) and the three losses of the path prepare_model picks,
  against one plain full forward per sequence (tolerance 1e-4); in the benchmark dtype the same max
  |diff| is reported.
- throughput: Annotator.sample + score on synthetic documents (tau_s = 0, k = 5, m = 5, 2 distinct
  calls scored per sampled position), docs/s and needed tokens/s, against the compute floor: every
  needed token (teacher-forced rows, generated call tokens, scored tokens) at this device's prefill
  speed (plain batched forwards of the decoder at a large batch, caches built outside the timer).
  floor / ours = 1.0 would be a decoder as fast as prefill, which no autoregressive decoder
  reaches.
- tool-aware decoding: B rows generate, get a tool result appended, and generate again; the result
  is fed from the kept KV cache ("kv") or the whole sequence is encoded again ("reencode");
  generated tokens/s.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolformer_ray.api_text import ApiCall, Markers  # noqa: E402
from toolformer_ray.core import lm  # noqa: E402
from toolformer_ray.core.annotate import Annotator  # noqa: E402
from toolformer_ray.core.filtering import score_candidates  # noqa: E402
from toolformer_ray.core.sampling import (  # noqa: E402
    Candidate, DecodeRow, ToolPrompt, decode_calls, start_pass, tokenize_doc)
from toolformer_ray.core.types import Document  # noqa: E402

# The default model's shape (SmolLM2-135M-Instruct's config.json) and a Llama-3.2-1B-like shape.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, rope_theta=100000.0),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, rope_theta=500000.0),
}
TOY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
SIZES = {  # prompt tokens, documents, words per document, call tokens, decoding rows/steps
    "full": dict(prompt=420, docs=64, words=160, call_tokens=12,
                 dec_rows=32, dec_prompt=256, dec_steps=48),
    "quick": dict(prompt=40, docs=4, words=24, call_tokens=4,
                  dec_rows=4, dec_prompt=32, dec_steps=6),
}


class WordTokenizer:
    """Each word with its leading spaces is one token (a stable id per word), so token counts follow
    the synthetic text; ids the text never produced decode to " w<id>"."""
    _piece = re.compile(r"\s*\S+|\s+$")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id = None
        self.eos_token_id = 1
        self.pad_token_id = 0
        self.by_id: dict[int, str] = {}

    def _id(self, piece: str) -> int:
        h = 2 + sum(ord(c) * 31 ** k for k, c in enumerate(piece)) % (self.vocab_size - 2)
        self.by_id.setdefault(h, piece)
        return h

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in self._piece.finditer(text)]
        out = {"input_ids": [self._id(text[a:b]) for a, b in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def decode(self, ids) -> str:
        return "".join(self.by_id.get(int(i), f" w{int(i)}") for i in ids)

    def __len__(self) -> int:
        return self.vocab_size


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "that", "with", "as",
             "by",
             "total", "number", "people", "city", "year", "percent", "river", "capital", "=", "+"]
    out = [rng.choice(vocab) if rng.random() < 0.7 else str(rng.randint(1, 2000)) for _ in range(n)]
    return " ".join(out).capitalize() + "."


def build_model(shape: dict, dtype, device, seed: int = 0):
    config = T.LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=True,
                           bos_token_id=None, eos_token_id=1, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # peaked predictions (logits of std ~4), so a wrong context shows; not huge, so float32
    # rounding of the logits stays far below the 1e-4 the paths must agree to
    std = min(1.0, 4.0 / shape["hidden_size"] ** 0.5)
    with torch.no_grad():
        for emb in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            emb.normal_(0.0, std)
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- exactness
def _run_path(model, tok, prompt_text: str, texts: list[str]):
    """p_i, a 3-token marker's later log-probs and the three losses, through the model's path."""
    markers = Markers()
    start_id = tok(" [")["input_ids"][0]
    prompt = ToolPrompt.build("Calculator", prompt_text, tok, markers, [])
    docs = [tokenize_doc(tok, t) for t in texts]
    sp = start_pass(model, tok, prompt, docs, texts, start_id, tok.pad_token_id)
    rng = random.Random(0)
    where = [(b, i) for b, d in enumerate(docs) for i in rng.sample(range(1, len(d.ids)), 3)]
    ctx = [sp.ctx_at[b][i] for b, i in where]
    rows = [DecodeRow(doc=b, ctx_len=c, seed_key="")
            for (b, _), c in zip(where, ctx) if c is not None]
    marker = decode_calls(model, tok, sp, rows, tok(" <A> <B> <C>")["input_ids"], markers, seed=0,
                          temperature=0.0, top_p=1.0, max_tokens=0, eos_id=None, sample=False)
    cands = [Candidate(doc_id=str(b), tool="Calculator", token_pos=i, char_pos=0, p_api=0.5,
                       call=ApiCall("Calculator", f"{i} + {b}"), result=str(i + b))
             for b, i in where]
    scored = score_candidates(model, tok, {str(b): d for b, d in enumerate(docs)}, cands, markers,
                              "\n", {"Calculator": 1.0}, [], tok.pad_token_id)
    losses = [x for s in scored for x in (s.loss_plus, s.loss_no_call, s.loss_call_no_result)]
    return sp.probs, [m.marker_logprob for m in marker], losses


@torch.inference_mode()
def exactness(model, tok, prompt_text: str, texts: list[str]) -> dict:
    """max |diff| of p_i (log space), of later marker tokens' log-probs and of the three losses: the
    path prepare_model picked vs the plain path (one plain full forward per sequence: no cache, no
    packing)."""
    got = _run_path(model, tok, prompt_text, texts)
    plan = lm.attention_plan(model)
    model._toolformer_attention = lm.AttentionPlan("plain", "reference", None, None)
    try:
        want = _run_path(model, tok, prompt_text, texts)
    finally:
        model._toolformer_attention = plan
    p_diff = max(abs(math.log(a) - math.log(b)) for pa, pb in zip(got[0], want[0])
                 for a, b in zip(pa, pb) if a > 0 and b > 0)
    m_diff = max(abs(a - b) for a, b in zip(got[1], want[1]))
    l_diff = max(abs(a - b) for a, b in zip(got[2], want[2]))
    return {"p_i_max_abs_log_diff": p_diff, "marker_max_abs_log_diff": m_diff,
            "loss_max_abs_diff": l_diff, "positions": sum(map(len, got[0])), "losses": len(got[2]),
            "path": plan.mode}


# --------------------------------------------------------------------------------------- throughput
@torch.inference_mode()
def prefill_seconds_per_token(model, device, past: int, batch: int, width: int,
                              repeat: int = 3) -> float:
    """Decoder-only forward of [batch, width] new tokens after `past` cached ones (the cache is
    built outside the timer)."""
    V = model.config.vocab_size
    ids = torch.randint(2, V, (batch, width), device=device)
    body = lm.decoder(model)
    best = float("inf")
    for r in range(repeat + 1):
        cache = None
        if past:
            cache = body(input_ids=torch.randint(2, V, (batch, past), device=device), use_cache=True
                         ).past_key_values
        sync(device)
        t = time.perf_counter()
        body(input_ids=ids, past_key_values=cache, use_cache=past > 0)
        sync(device)
        if r:  # the first is a warm-up
            best = min(best, time.perf_counter() - t)
    return best / (batch * width)


def needed_tokens(log: list) -> dict:
    out = {"start": 0, "decode": 0, "nll": 0, "start_past": 0, "decode_past": 0}
    for entry in log:
        if entry[0] == "start":
            out["start"] += sum(entry[1])
            out["start_past"] = entry[2]
        elif entry[0] == "decode":
            _, P, ctx, M, steps = entry
            out["decode"] += M * len(ctx) + sum(steps[1:])
            out["decode_past"] = max(out["decode_past"], P + sum(ctx) // max(1, len(ctx)))
        else:
            out["nll"] += sum(entry[1])
    return out


def throughput(model, tok, prompt_text: str, texts: list[str], call_tokens: int, device,
               floor_batch) -> dict:
    tool = SimpleNamespace(prompt=lambda: prompt_text, prefilter=lambda d: True, takes_input=True)
    tc = SimpleNamespace(tau_s=0.0, k=5, m=5, tau_f=1.0, prefilter=False)
    ann = Annotator(model, tok, {"Calculator": tool}, {"Calculator": tc}, Markers(), seed=0,
                    temperature=1.0, max_call_tokens=call_tokens, batch_docs=16, batch_rows=1024)
    docs = [Document(doc_id=f"d{i}", text=t, source_id=f"s{i}") for i, t in enumerate(texts)]
    ann.sample(docs[:2])  # warm-up: kernels, allocator, the prompt's KV cache (a live actor has it)
    rng = random.Random(1)
    tok_docs = ann.tokenize(docs)
    cands = [Candidate(doc_id=d.doc_id, tool="Calculator", token_pos=i, char_pos=0, p_api=0.5,
                       call=ApiCall("Calculator", f"{i} + {j}"), result=str(i + j))
             for d in docs for i in rng.sample(range(1, len(tok_docs[d.doc_id].ids)), 5)
             for j in (1, 2)]
    ann.score(docs[:2], [c for c in cands if c.doc_id in ("d0", "d1")])  # warm-up
    ann.work_log = []
    sync(device)
    t0 = time.perf_counter()
    ann.sample(docs)
    sync(device)
    t1 = time.perf_counter()
    ann.score(docs, cands)
    sync(device)
    t2 = time.perf_counter()
    need = needed_tokens(ann.work_log)
    # the floor: every needed token at prefill speed (teacher-forced rows and generated tokens after
    # their context, scored tokens from scratch), measured at a large batch
    b, w = floor_batch
    floor = (need["start"] * prefill_seconds_per_token(model, device, need["start_past"], b, w)
             + need["decode"] * prefill_seconds_per_token(model, device, need["decode_past"], b, w)
             + need["nll"] * prefill_seconds_per_token(model, device, 0, b, w))
    seconds = t2 - t0
    tokens = need["start"] + need["decode"] + need["nll"]
    return {"documents": len(docs),
            "seconds": {"sample": t1 - t0, "score": t2 - t1, "total": seconds},
            "docs_per_s": len(docs) / seconds,
            "needed_tokens": {k: need[k] for k in ("start", "decode", "nll")},
            "tokens_per_s": tokens / seconds, "compute_floor_seconds": floor,
            "floor_docs_per_s": len(docs) / floor, "floor_over_ours": floor / seconds,
            "candidates_scored": len(cands)}


# ------------------------------------------------------------------------------ tool-aware decoding
@torch.inference_mode()
def tool_decoding(model, device, rows: int, prompt_len: int, steps: int,
                  result_len: int = 4) -> dict:
    """Greedy decoding of `rows` rows: `steps` tokens, a tool result of `result_len` tokens
    appended, then `steps` more; the result fed from the kept cache vs the whole sequence encoded
    again."""
    V = model.config.vocab_size
    prompt = torch.randint(2, V, (rows, prompt_len), device=device)
    result = torch.randint(2, V, (rows, result_len), device=device)
    model_fwd = model

    def greedy(cache, last_logits, n):
        toks = []
        for _ in range(n):
            nxt = last_logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            out = model_fwd(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            last_logits = out.logits[:, -1]
        return cache, last_logits, torch.cat(toks, 1)

    def run(mode: str) -> float:
        sync(device)
        t = time.perf_counter()
        out = model_fwd(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, logits, gen = greedy(out.past_key_values, out.logits[:, -1], steps)
        if mode == "kv":
            out = model_fwd(input_ids=result, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
            cache = out.past_key_values
        else:
            out = model_fwd(input_ids=torch.cat([prompt, gen, result], 1), use_cache=True,
                            logits_to_keep=1)
            cache = out.past_key_values
        greedy(cache, out.logits[:, -1], steps)
        sync(device)
        return time.perf_counter() - t

    res = {}
    for mode in ("kv", "reencode"):
        run(mode)  # warm-up
        res[mode] = min(run(mode) for _ in range(2))
    gen_tokens = 2 * steps * rows
    return {"rows": rows, "prompt_tokens": prompt_len, "generated_tokens": gen_tokens,
            "kv_tokens_per_s": gen_tokens / res["kv"],
            "reencode_tokens_per_s": gen_tokens / res["reencode"],
            "kv_speedup": res["reencode"] / res["kv"]}


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CI smoke test)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="hard time budget (default 420, quick 150)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.time()
    lm.FUSED_EVERYWHERE = True  # on CPU too: the code path a GPU runs (on CUDA it is the only one)
    budget = args.budget_s or (150.0 if args.quick else 420.0)
    device = args.device
    size = SIZES["quick" if args.quick else "full"]
    shapes = {"toy": TOY} if args.quick else SHAPES
    bench_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    floor_batch = (2, 64) if args.quick else (16, 512)
    rng = random.Random(0)
    prompt_text = words(rng, size["prompt"] - 10) + "\nInput: {text}\nOutput: "
    texts = [words(rng, size["words"] + rng.randint(-size["words"] // 4, size["words"] // 4))
             for _ in range(size["docs"])]
    results: dict = {"device": device, "quick": args.quick, "host": platform.node(),
                     "gpu": (torch.cuda.get_device_name(0)
                             if torch.device(device).type == "cuda" else None),
                     "torch": torch.__version__, "transformers": T.__version__,
                     "bench_dtype": str(bench_dtype).replace("torch.", ""), "budget_s": budget,
                     "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}
    print(f"gpu_check on {device} ({results['gpu'] or platform.processor()}), "
          f"budget {budget:.0f} s")
    signal.signal(signal.SIGALRM, _out_of_time)  # a phase still running at the budget is cut short
    signal.alarm(int(budget))
    for name, shape in shapes.items():
        r = results["models"][name] = {"shape": shape}
        model = None
        for phase in ("exactness", "throughput", "decoding"):
            if time.time() - started > budget * (0.85 if phase == "exactness" else 0.7):
                r[phase] = "skipped: time budget"
                print(f"[{name}] {phase}: skipped (time budget)")
                continue
            t = time.time()
            try:
                tok = WordTokenizer(shape["vocab_size"])
                if phase == "exactness":  # float32: the path must equal plain forwards to 1e-4
                    model = build_model(shape, torch.float32, device)
                    plan = lm.prepare_model(model)
                    r["attention"] = plan.to_dict()
                    r["exactness_fp32"] = exactness(model, tok, prompt_text, texts[:2])
                    del model
                    model = build_model(shape, bench_dtype, device)
                    r["attention_bench_dtype"] = lm.prepare_model(model).to_dict()
                    lm.KERNELS_USED.clear()
                    r["exactness_bench_dtype"] = exactness(model, tok, prompt_text, texts[:2])
                    r["kernels"] = sorted(lm.KERNELS_USED)
                    continue
                if model is None:
                    model = build_model(shape, bench_dtype, device)
                if phase == "throughput":
                    r["throughput"] = throughput(model, tok, prompt_text, texts,
                                                 size["call_tokens"], device, floor_batch)
                else:
                    r["decoding"] = tool_decoding(model, device, size["dec_rows"],
                                                  size["dec_prompt"], size["dec_steps"])
            except Exception as e:  # report and go on: the other figures still come back
                r[phase] = f"error: {type(e).__name__}: {str(e)[:300]}"
            finally:
                r.setdefault("phase_seconds", {})[phase] = round(time.time() - t, 1)
                _report(name, phase, r)
        if torch.device(device).type == "cuda":
            del model
            torch.cuda.empty_cache()
    signal.alarm(0)
    results["seconds"] = round(time.time() - started, 1)
    exact = [m.get("exactness_fp32") for m in results["models"].values()]
    results["exact_fp32_ok"] = all(
        isinstance(e, dict) and max(e["p_i_max_abs_log_diff"], e["marker_max_abs_log_diff"],
                                    e["loss_max_abs_diff"]) < 1e-4 for e in exact)
    out = Path(args.out or Path(__file__).parent / "results" /
               f"gpu_check-{torch.device(device).type}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"exact in fp32: {results['exact_fp32_ok']}; {results['seconds']} s; wrote {out}")
    return results


def _out_of_time(signum, frame):
    raise TimeoutError("time budget spent")


def _report(name: str, phase: str, r: dict) -> None:
    if phase == "exactness" and "exactness_fp32" in r:
        e = r["exactness_fp32"]
        eb = r["exactness_bench_dtype"]
        print(f"[{name}] path {r['attention']['mode']} {r['attention']['reason']}; "
              f"kernels {r['kernels']}; fp32 max |diff| p_i(log) {e['p_i_max_abs_log_diff']:.2e} "
              f"marker {e['marker_max_abs_log_diff']:.2e} losses {e['loss_max_abs_diff']:.2e}; "
              f"bench dtype {eb['p_i_max_abs_log_diff']:.2e} / "
              f"{eb['marker_max_abs_log_diff']:.2e} / {eb['loss_max_abs_diff']:.2e}")
    elif phase == "throughput" and isinstance(r.get("throughput"), dict):
        t = r["throughput"]
        print(f"[{name}] sample+score {t['documents']} docs in {t['seconds']['total']:.2f} s: "
              f"{t['docs_per_s']:.2f} docs/s, {t['tokens_per_s']:.0f} tokens/s; compute floor "
              f"{t['floor_docs_per_s']:.2f} docs/s (floor/ours {t['floor_over_ours']:.2f})")
    elif phase == "decoding" and isinstance(r.get("decoding"), dict):
        d = r["decoding"]
        print(f"[{name}] tool-aware decoding: kv resume {d['kv_tokens_per_s']:.0f} tokens/s, "
              f"re-encode "
              f"{d['reencode_tokens_per_s']:.0f} tokens/s ({d['kv_speedup']:.2f}x)")
    else:
        print(f"[{name}] {phase}: {r.get(phase)}")


if __name__ == "__main__":
    main()
