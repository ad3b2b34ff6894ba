"""Tool-aware decoding: tokens/s with KV-cache resume vs re-encoding after each call (issue 10, item 3).

    .venv/bin/python benchmarks/decoding.py [--config FILE] [-s key=value ...] [--output benchmarks/results]

The same as `toolformer-ray bench --which decoding`; the implementation and what is timed are in
toolformer_ray/bench_decoding.py. Useful overrides: inference.batch_size (prompts, default 16),
inference.max_calls (default 1; 3 is always run too), inference.max_new_tokens, inference.torch_threads.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--output", default="benchmarks/results")
    args = ap.parse_args()

    from toolformer_ray.bench import run_bench
    from toolformer_ray.config import load_config

    run_bench(load_config(args.config, args.overrides), which=["decoding"], docs=0, output=args.output)


if __name__ == "__main__":
    main()
