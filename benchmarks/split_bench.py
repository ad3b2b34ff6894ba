"""Record splitting: seconds and tokenizer characters per input character on 1M-character
records (issue 17, item 5). The test (tests/test_hardening.py) bounds the encode count; this prints
the time.

    .venv/bin/python benchmarks/split_bench.py [--model default|tiny|DIR] [--chars 1000000] \\
        [--output DIR]

Writes <output>/split-<model name>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CASES = {
    "cjk_no_stops": "\u6f22\u5b57",  # one sentence-less run: cut at token boundaries
    "cjk_sentences": "\u6f22\u5b57\u3002",
    "ascii_words": "word ",
    "ascii_sentences": "A short sentence. ",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--max-doc-tokens", type=int, default=256)
    ap.add_argument("--output", default="benchmarks/results")
    args = ap.parse_args()

    from toolformer_ray.datajob.corpus import split_text
    from toolformer_ray.models import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(args.model))
    seen = {"chars": 0}

    def counting(text, **kw):
        seen["chars"] += len(text)
        return tok(text, **kw)

    rows = {}
    for name, unit in CASES.items():
        text = (unit * (args.chars // len(unit) + 1))[:args.chars].strip()
        seen["chars"] = 0
        t = time.perf_counter()
        pieces = split_text(text, counting, args.max_doc_tokens)
        seconds = time.perf_counter() - t
        rows[name] = {"chars": len(text), "pieces": len(pieces), "seconds": round(seconds, 3),
                      "us_per_char": round(1e6 * seconds / len(text), 3),
                      "encoded_chars_per_char": round(seen["chars"] / len(text), 2)}
        print(f"{name:16s} {len(text):>9d} chars  {len(pieces):>6d} pieces  {seconds:7.2f} s  "
              f"{rows[name]['us_per_char']:6.2f} us/char  "
              f"{rows[name]['encoded_chars_per_char']:5.2f} enc/char")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"split-{Path(args.model).name}.json"
    path.write_text(json.dumps({"model": args.model, "max_doc_tokens": args.max_doc_tokens,
                                "host": platform.node(),
                                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "cases": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
