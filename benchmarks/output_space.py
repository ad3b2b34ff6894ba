"""How much the space after "Output:" moves p_i (issue 16, item 1), on the bundled demo corpus.

Before the fix the document's copy after "\\nOutput:" was its own tokens encoded alone, so the model
read "Output:The truck" while every example in the prompt reads "Output: The truck". This computes
p_i for every usable position of the first N documents with each tool's prompt, both ways (the old
way is the same code with the prompt's space after "Output:" dropped), and counts the positions
above tau_s.

    PYTHONPATH=. .venv/bin/python benchmarks/output_space.py --docs 12 \\
        --tools WikiSearch Calculator --out benchmarks/results/output_space.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from toolformer_ray.api_text import Markers
from toolformer_ray.core.lm import bos_ids, encode
from toolformer_ray.core.sampling import ToolPrompt, start_pass, tokenize_doc
from toolformer_ray.models import load_model
from toolformer_ray.tools.base import Tool

TOOLS = ["Calculator", "WikiSearch", "QA", "Calendar", "MT"]
ROOT = Path(__file__).resolve().parents[1]


class _Prompt(Tool):
    def __init__(self, name: str):
        self.name = name
        super().__init__()


def probs(model, tok, prompt: ToolPrompt, texts: list[str], start_id: int,
          pad_id: int) -> list[list[float]]:
    """p_i at every usable position (as the annotator counts them: position 0 only with a BOS)."""
    min_pos = 0 if bos_ids(tok) else 1
    out = []
    for s in range(0, len(texts), 8):
        batch = texts[s:s + 8]
        tds = [tokenize_doc(tok, t) for t in batch]
        sp = start_pass(model, tok, prompt, tds, batch, start_id, pad_id)
        out += [[p for i, (p, cp) in enumerate(zip(ps, td.char_pos))
                 if cp is not None and i >= min_pos]
                for ps, td in zip(sp.probs, tds)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=30)
    ap.add_argument("--tools", nargs="+", default=TOOLS)
    ap.add_argument("--tau-s", type=float, default=0.05)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/output_space.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model("default", dtype=args.dtype)
    model = lm.model
    tok = lm.tokenizer
    texts = [json.loads(line)["text"] for line in open(ROOT / "data/demo_corpus.jsonl")][:args.docs]
    markers = Markers()
    start_id = encode(tok, markers.start)[0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.time()
    result = {"model": lm.path, "revision": lm.revision, "dtype": args.dtype,
              "documents": len(texts),
              "tau_s": args.tau_s, "corpus": "data/demo_corpus.jsonl (first N lines)", "tools": {}}
    for name in args.tools:
        fixed = ToolPrompt.build(name, _Prompt(name).prompt(), tok, markers, bos_ids(tok))
        assert fixed.output_lead == " ", fixed.output_lead
        old = replace(fixed, output_lead="")  # the copy encoded alone: "Output:The ..."
        new_p = probs(model, tok, fixed, texts, start_id, pad_id)
        old.kv = fixed.kv
        old_p = probs(model, tok, old, texts, start_id, pad_id)
        pairs = [(a, b) for xs, ys in zip(old_p, new_p) for a, b in zip(xs, ys)]
        rel = [abs(b - a) / a for a, b in pairs if a > 0]
        result["tools"][name] = {
            "positions": len(pairs),
            "above_tau_s_before": sum(a > args.tau_s for a, _ in pairs),
            "above_tau_s_after": sum(b > args.tau_s for _, b in pairs),
            "crossed_up": sum(a <= args.tau_s < b for a, b in pairs),
            "crossed_down": sum(b <= args.tau_s < a for a, b in pairs),
            "unmapped_after": sum(b == 0.0 for _, b in pairs),
            "median_rel_change": statistics.median(rel) if rel else math.nan,
            "max_abs_change": max(abs(b - a) for a, b in pairs),
        }
        print(name, result["tools"][name], flush=True)
        result["seconds"] = round(time.time() - t0, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        # after each tool: a cut run keeps its part
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
