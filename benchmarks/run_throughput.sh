#!/usr/bin/env bash
# The throughput / roofline and brute-force benchmarks of benchmarks/RESULTS.md (default model, bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
TR=.venv/bin/toolformer-ray
$TR index data/passages.jsonl runs/index/passages >/dev/null
# the paper's default preset (tau_s 0.05, k 5, m 5) on WikiSearch, 32 bundled documents
$TR bench -s 'tools={WikiSearch: {options: {index: runs/index/passages}}}' -s ray.torch_threads=2 \
  --docs 32 --which throughput --output benchmarks/results
# the calculator preset as the competitor ran it (tau_s 0, k 20, m 5), every document annotated (no pre-filter)
$TR bench -s 'tools={Calculator: {k: 20, m: 5, prefilter: false}}' -s ray.torch_threads=2 \
  --docs 16 --which throughput --output benchmarks/results
# fast path vs the brute-force reference on the same documents (k 5, m 2 keeps the reference affordable)
$TR bench -s 'tools={Calculator: {k: 5, m: 2, prefilter: false}}' -s ray.torch_threads=2 \
  --docs 2 --which bruteforce --output benchmarks/results
