"""Scaling of the data job: documents/s with 1 and 2 LM actors in local Ray, the in-process run for reference,
per-stage costs and the cluster throughput model of benchmarks/README.md (issue 10, item 4).

    .venv/bin/python benchmarks/scaling.py [--config FILE] [-s key=value ...] [--docs 64] [--output benchmarks/results]

The same as `toolformer-ray bench --which scaling --docs N`; the implementation and what is timed are in
toolformer_ray/bench_scaling.py.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--docs", type=int, default=64, help="documents per run (corpus.limit)")
    ap.add_argument("--output", default="benchmarks/results")
    args = ap.parse_args()

    from toolformer_ray.bench import run_bench
    from toolformer_ray.config import load_config

    run_bench(load_config(args.config, args.overrides), which=["scaling"], docs=args.docs, output=args.output)


if __name__ == "__main__":
    main()
