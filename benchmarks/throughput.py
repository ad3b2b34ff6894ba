"""Throughput of sample + filter against the compute floor, and the fast path against brute force.

    .venv/bin/python benchmarks/throughput.py [--config FILE] [-s key=value ...] [--docs 32]
        [--which throughput --which bruteforce] [--threads N] [--output benchmarks/results]

throughput  sample + filter on the configured model over a fixed set of corpus documents. The
            headline is achieved / *compute floor*: the forward tokens the method strictly needs
            (per doc x tool the input copy and the document after the cached prompt; the call tokens
            generated; L(empty) once per document; L+ and L-(no result) per distinct prefix, each
            cut at i + 5), all of them (the generated ones included) at teacher-forced (prefill)
            speed through the transformer body alone (`logits_to_keep=1`: no LM head at all), a
            bound no autoregressive decoder reaches. For scale it also times the same tokens through
            a *naive Hugging Face baseline* (not a bound): plain batched forwards with full logits,
            decoding as one-token DynamicCache steps that copy the prompt into every row, priced at
            the batch's longest context, at the best of batch 16/64/256; speed-up over it = its time
            / ours. Building the random caches these timings run on is outside the timers.
bruteforce  the same documents (at most 4) through the brute-force reference
            (toolformer_ray/core/reference.py: one sequence at a time, no cache, no truncation), as
            a ratio of times and of forward tokens.

Writes <output>/<which, sorted, joined by _>-<config hash>.json (e.g. throughput-<hash>.json).
"""
from __future__ import annotations

import math
import time

import torch
from transformers import DynamicCache

from toolformer_ray.config import Config
from toolformer_ray.core import reference as ref
from toolformer_ray.core.annotate import Annotator
from toolformer_ray.core.lm import encode
from toolformer_ray.core.sampling import select_positions, tokenize_doc
from toolformer_ray.datajob.corpus import list_shards, read_shard
from toolformer_ray.models import load_from_config
from toolformer_ray.tools import build_tools
from toolformer_ray.tools.executor import LocalToolExecutor

from harness import config, header, parser, print_table, write_results  # benchmarks/harness.py

WHICH = ("throughput", "bruteforce")


def _docs(cfg: Config, n: int, tokenizer):
    docs = []
    for shard in list_shards(cfg.corpus.input, cfg.corpus.format):
        got, _ = read_shard(shard, cfg.corpus, tokenizer, max_docs=n - len(docs))
        docs += got
        if len(docs) >= n:
            break
    return docs[:n]


def _timed(fn, repeat: int = 2, setup=None) -> float:
    """Best wall time of `fn(setup())` over `repeat` runs after a warm-up; `setup` (e.g. building a
    cache that the forward then extends) runs outside the timer."""
    setup = setup or (lambda: None)
    fn(setup())  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeat):
        arg = setup()
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return min(times)


def _bucket(x: int, step: int = 32) -> int:
    return max(step, (x + step - 1) // step * step)


class PlainForwards:
    """Plain batched forwards of the same model: seconds per token for each recorded batch shape,
    with full logits (the naive baseline) or none (`logits_to_keep=1`, the compute floor)."""

    def __init__(self, model):
        self.model = model
        self.memo: dict = {}
        cfg = model.config
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _cache(self, batch: int, length: int):
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.num_hidden_layers):
            shape = (batch, self.n_kv, length, self.head_dim)
            k = torch.randn(*shape, dtype=self.model.dtype) * 0.1
            cache.update(k, k.clone(), layer)
        return cache

    @torch.inference_mode()
    def prefill(self, batch: int, width: int, past: int, full_logits: bool = True) -> float:
        """Seconds per padded token of model(ids[batch, width]) after `past` cached tokens."""
        key = ("prefill", batch, _bucket(width), _bucket(past), full_logits)
        if key not in self.memo:
            ids = torch.randint(0, self.model.config.vocab_size, (batch, width))
            keep = 0 if full_logits else 1  # 0: every position's logits

            def run(cache):
                self.model(input_ids=ids, past_key_values=cache, use_cache=past > 0,
                           logits_to_keep=keep)

            def setup():
                return self._cache(batch, past) if past else None

            self.memo[key] = _timed(run, setup=setup) / (batch * width)
        return self.memo[key]

    @torch.inference_mode()
    def decode(self, batch: int, past: int) -> float:
        """Seconds per token of plain one-token decoding steps with `past` cached tokens, at the
        best of a few batch sizes up to `batch` (a plain implementation would pick its best batch
        size)."""
        best = float("inf")
        for b in sorted({min(batch, x) for x in (16, 64, 256)}):
            key = ("decode", b, _bucket(past))
            if key not in self.memo:
                ids = torch.randint(0, self.model.config.vocab_size, (b, 1))

                def step(cache):
                    self.model(input_ids=ids, past_key_values=cache, use_cache=True)

                def setup():
                    return self._cache(b, past)

                self.memo[key] = _timed(step, repeat=3, setup=setup) / b
            best = min(best, self.memo[key])
        return best


def costs_from_log(log: list, plain: PlainForwards, batch_tokens: int = 8192) -> dict:
    """Needed tokens per stage, with their seconds through the naive HF baseline and at the compute
    floor, from the annotator's work log. Scoring sequences are timed as padded batches of the same
    token budget (a plain implementation batches by length)."""
    out = {stage: {"tokens": 0, "naive_hf_seconds": 0.0, "floor_seconds": 0.0}
           for stage in ("start", "decode", "nll")}
    for entry in log:
        kind = entry[0]
        if kind == "start":
            _, lengths, P = entry
            shape = (len(lengths), max(lengths), P)
            needed = sum(lengths)
            naive = plain.prefill(*shape)
            floor = plain.prefill(*shape, full_logits=False)
        elif kind == "decode":
            _, P, ctx, M, steps = entry
            past = P + max(ctx)
            needed = M * len(ctx) + sum(steps[1:])
            naive = plain.decode(len(ctx), past)
            floor = plain.prefill(8, 64, past, full_logits=False)  # as if teacher-forced
        else:
            _, lengths = entry
            width = max(lengths)
            shape = (max(1, min(len(lengths), batch_tokens // width)), width, 0)
            needed = sum(lengths)
            naive = plain.prefill(*shape)
            floor = plain.prefill(*shape, full_logits=False)
        out[kind]["tokens"] += needed
        out[kind]["naive_hf_seconds"] += needed * naive
        out[kind]["floor_seconds"] += needed * floor
    return out


def bench_throughput(cfg: Config, n_docs: int) -> dict:
    lm = load_from_config(cfg.model)
    docs = _docs(cfg, n_docs, lm.tokenizer)
    tools_cfg = cfg.enabled_tools()
    ann = Annotator.from_config(lm, build_tools(tools_cfg), cfg)
    ann.sample(docs[:1])  # warm-up: builds the prompt caches once, as a long-running actor has them
    ann.work_log = []
    t0 = time.perf_counter()
    sampled = ann.sample(docs)
    t1 = time.perf_counter()
    with LocalToolExecutor(tools_cfg) as ex:
        by_tool: dict = {}
        for c in sampled.candidates:
            by_tool.setdefault(c.tool, []).append(c)
        dates = {d.doc_id: d.date for d in docs}
        for tool, cands in by_tool.items():
            results = ex.run(tool, [c.call.input for c in cands], [dates[c.doc_id] for c in cands])
            for c, r in zip(cands, results):
                c.result = r
    t2 = time.perf_counter()
    scored = ann.score(docs, sampled.candidates)
    t3 = time.perf_counter()
    log = ann.work_log
    ann.work_log = None
    stages = costs_from_log(log, PlainForwards(lm.model), cfg.filtering.batch_tokens)
    lm_seconds = (t1 - t0) + (t3 - t2)
    naive_seconds = sum(s["naive_hf_seconds"] for s in stages.values())
    floor_seconds = sum(s["floor_seconds"] for s in stages.values())
    tokens = sum(s["tokens"] for s in stages.values())
    funnel = {t: dict(c) for t, c in sampled.funnel.items()}
    presets = {t: {k: getattr(c, k) for k in ("tau_s", "k", "m", "tau_f")}
               for t, c in tools_cfg.items()}
    return {
        "documents": len(docs), "tools": sorted(tools_cfg), "presets": presets,
        "seconds": {"sample": t1 - t0, "execute": t2 - t1, "score": t3 - t2,
                    "lm_total": lm_seconds},
        "docs_per_s": len(docs) / lm_seconds, "docs_per_s_with_tools": len(docs) / (t3 - t0),
        "needed_tokens": tokens, "tokens_per_s": tokens / lm_seconds,
        "stages": stages,
        "compute_floor": {"seconds": floor_seconds, "docs_per_s": len(docs) / floor_seconds,
                          "achieved_over_floor": floor_seconds / lm_seconds},
        "naive_hf_baseline": {"seconds": naive_seconds, "docs_per_s": len(docs) / naive_seconds,
                              "speedup_over_naive_hf": naive_seconds / lm_seconds},
        "funnel": funnel, "kept": sum(s.passes for s in scored), "scored": len(scored),
    }


def _forward_tokens(entry: tuple) -> int:
    """Forward tokens of one work-log entry: start / nll rows, or a decode's rows and steps."""
    if entry[0] in ("start", "nll"):
        return sum(entry[1])
    return entry[3] * len(entry[2]) + sum(entry[4][1:])


def bench_bruteforce(cfg: Config, n_docs: int) -> dict:
    """The reference path on the same documents and candidate positions: p_i at every position, the
    same number of samples at the same positions, and the three losses of every candidate."""
    lm = load_from_config(cfg.model)
    model = lm.model
    tok = lm.tokenizer
    docs = _docs(cfg, n_docs, tok)
    tools_cfg = cfg.enabled_tools()
    ann = Annotator.from_config(lm, build_tools(tools_cfg), cfg)
    ann.sample(docs[:1])
    ann.work_log = []
    t = time.perf_counter()
    sampled = ann.sample(docs)
    for c in sampled.candidates:
        c.result = "0"  # the same scoring work whatever the tool says
    ann.score(docs, sampled.candidates)
    fast_seconds = time.perf_counter() - t
    fast_tokens = sum(_forward_tokens(e) for e in ann.work_log)
    ref_tokens = 0
    t = time.perf_counter()
    for name, tc in tools_cfg.items():
        prompt_text = ref.prompt_ref(ann.tools[name].prompt())
        for d in docs:
            if tc.prefilter and not ann.tools[name].prefilter(d):
                continue
            td = tokenize_doc(tok, d.text)
            probs = [0.0] * len(td.ids)
            for i in range(ann.min_pos, len(td.ids)):
                if td.char_pos[i] is not None:
                    logp = ref.start_logprob_ref(model, tok, prompt_text, d.text, i)
                    probs[i] = math.exp(logp)
                    ctx = ref.context_ids_ref(tok, prompt_text, d.text, i)
                    ref_tokens += len(ctx) + len(ann.marker_ids)
            for i in select_positions(probs, td, tc.tau_s, tc.k, ann.min_pos):
                ctx = ref.context_ids_ref(tok, prompt_text, d.text, i)
                for j in range(tc.m):
                    out = ref.sample_ref(model, tok, ctx, cfg.run.seed,
                                         f"{d.doc_id}|{name}|{i}|{j}",
                                         cfg.sampling.temperature, cfg.sampling.max_call_tokens)
                    n_gen = len(encode(tok, out))
                    ref_tokens += sum(len(ctx) + len(ann.marker_ids) + s for s in range(n_gen))
    for c in sampled.candidates:
        text = next(d.text for d in docs if d.doc_id == c.doc_id)
        n_doc = len(tokenize_doc(tok, text).ids)
        for result in ("0", None):
            prefix = ref.prefix_ref(c.call.tool, c.call.input, result, ann.prefix_separator)
            ref.loss_text_ref(model, tok, prefix, text, c.token_pos)
            ref_tokens += len(ann.bos) + len(encode(tok, prefix)) + n_doc
        ref.loss_text_ref(model, tok, "", text, c.token_pos)
        ref_tokens += len(ann.bos) + n_doc
    ref_seconds = time.perf_counter() - t
    return {"documents": len(docs), "fast_seconds": fast_seconds, "bruteforce_seconds": ref_seconds,
            "speedup": ref_seconds / fast_seconds, "fast_forward_tokens": fast_tokens,
            "bruteforce_forward_tokens": ref_tokens,
            "token_ratio": ref_tokens / max(1, fast_tokens)}


def print_throughput(r: dict) -> None:
    floor = r["compute_floor"]
    naive = r["naive_hf_baseline"]
    print_table(f"throughput ({r['documents']} docs, tools {', '.join(r['tools'])})", [
        ("sample + filter", f"{r['seconds']['lm_total']:.1f} s  ->  {r['docs_per_s']:.2f} docs/s, "
                            f"{r['tokens_per_s']:.0f} needed tokens/s"),
        ("compute floor", f"{floor['seconds']:.1f} s (every needed token at prefill speed, "
                          f"no LM head): achieved / floor {floor['achieved_over_floor']:.2f}"),
        ("naive HF baseline", f"{naive['seconds']:.1f} s (not a bound): speed-up over it "
                              f"{naive['speedup_over_naive_hf']:.2f}x"),
        ("tools (in-process)", f"{r['seconds']['execute']:.2f} s"),
        *[(f"  {k} tokens", f"{v['tokens']}  (floor {v['floor_seconds']:.1f} s, "
                            f"naive HF {v['naive_hf_seconds']:.1f} s)")
          for k, v in r["stages"].items()],
        ("kept / scored", f"{r['kept']} / {r['scored']}"),
    ])


def print_bruteforce(r: dict) -> None:
    print_table(f"fast vs brute force ({r['documents']} docs)", [
        ("fast", f"{r['fast_seconds']:.1f} s, {r['fast_forward_tokens']} forward tokens"),
        ("brute force", f"{r['bruteforce_seconds']:.1f} s, "
                        f"{r['bruteforce_forward_tokens']} forward tokens"),
        ("speed-up", f"{r['speedup']:.1f}x time, {r['token_ratio']:.1f}x tokens"),
    ])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--which", action="append", choices=WHICH,
                    help="throughput | bruteforce (repeatable; default both)")
    ap.add_argument("--docs", type=int, default=32,
                    help="documents to time (bruteforce: at most 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    which = args.which or list(WHICH)
    cfg = config(args)
    results = header(cfg, args.threads)
    if "throughput" in which:
        results["throughput"] = bench_throughput(cfg, args.docs)
        print_throughput(results["throughput"])
    if "bruteforce" in which:
        results["bruteforce"] = bench_bruteforce(cfg, max(1, min(args.docs, 4)))
        print_bruteforce(results["bruteforce"])
    write_results(results, which, cfg, args.output)


if __name__ == "__main__":
    main()
