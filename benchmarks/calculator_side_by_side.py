"""The calculator preset on the first N digit-bearing documents of an annotation corpus (issue 16):
where do calls get lost, in sampling (few well-formed calls), in the prompt, or in the filter (L- -
L+ < tau_f)?

    PYTHONPATH=. .venv/bin/python benchmarks/calculator_side_by_side.py \\
        --corpus /work/shared/data/corpus/annotation_corpus.jsonl --docs 10 \\
        --out benchmarks/results/calculator_side_by_side.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toolformer_ray.api_text import Markers
from toolformer_ray.config import ToolConfig
from toolformer_ray.core.annotate import Annotator
from toolformer_ray.core.types import Document
from toolformer_ray.models import load_model
from toolformer_ray.tools import build_tools


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    docs = []
    with open(args.corpus) as f:
        for line in f:
            r = json.loads(line)
            if r.get("has_digit"):
                docs.append(Document(doc_id=r["id"], text=r["text"], source_id=r["id"]))
            if len(docs) >= args.docs:
                break
    lm = load_model("default", dtype=args.dtype)
    # the paper's calculator preset
    tc = ToolConfig(tau_s=0.0, k=20, m=5, tau_f=0.5, prefilter=False)
    tools = build_tools({"Calculator": tc})
    ann = Annotator(lm.model, lm.tokenizer, tools, {"Calculator": tc}, Markers(), seed=0)
    t0 = time.time()
    sampled = ann.sample(docs)
    calc = tools["Calculator"]
    for c in sampled.candidates:
        c.result = calc.run([c.call.input])[0]
    scored = ann.score(docs, sampled.candidates)
    gains = sorted((s.usefulness for s in scored), reverse=True)
    funnel = dict(sampled.funnel["Calculator"])
    funnel["calls_with_result"] = sum(c.result is not None for c in sampled.candidates)
    funnel["kept_tau_f"] = sum(s.passes for s in scored)
    out = {"model": lm.path, "revision": lm.revision, "dtype": args.dtype, "corpus": args.corpus,
           "documents": [d.doc_id for d in docs],
           "preset": {"tau_s": 0.0, "k": 20, "m": 5, "tau_f": 0.5},
           "funnel": funnel, "usefulness_top10": gains[:10],
           "scored": [{"doc_id": s.cand.doc_id, "token_pos": s.cand.token_pos,
                       "call": s.cand.call.input,
                       "result": s.cand.result, "p_api": s.cand.p_api, "usefulness": s.usefulness}
                      for s in sorted(scored, key=lambda s: -s.usefulness)[:20]],
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("funnel", "usefulness_top10", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
