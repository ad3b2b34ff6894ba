#!/usr/bin/env bash
# The throughput (compute floor, naive HF baseline) and brute-force benchmarks of
# benchmarks/RESULTS.md (default model, bf16). Document counts can be lowered for a quick run, e.g.
#   DOCS_DEFAULT=12 DOCS_CALC=6 BRUTEFORCE=0 OUT=/tmp/bench bash benchmarks/run_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TR=${TR:-.venv/bin/toolformer-ray}
PY=${PY:-.venv/bin/python}
DOCS_DEFAULT=${DOCS_DEFAULT:-32}
DOCS_CALC=${DOCS_CALC:-16}
BRUTEFORCE=${BRUTEFORCE:-1}
OUT=${OUT:-benchmarks/results}
$TR index data/passages.jsonl runs/index/passages >/dev/null
# the paper's default preset (tau_s 0.05, k 5, m 5) on WikiSearch, bundled documents
$PY benchmarks/throughput.py -s 'tools={WikiSearch: {options: {index: runs/index/passages}}}' \
  -s ray.torch_threads=2 --docs "$DOCS_DEFAULT" --which throughput --output "$OUT"
# the calculator preset as the competitor ran it (tau_s 0, k 20, m 5), every document annotated
# (no pre-filter)
$PY benchmarks/throughput.py -s 'tools={Calculator: {k: 20, m: 5, prefilter: false}}' \
  -s ray.torch_threads=2 --docs "$DOCS_CALC" --which throughput --output "$OUT"
if [ "$BRUTEFORCE" = 1 ]; then
  # fast path vs the brute-force reference on the same documents (k 5, m 2 keeps the reference
  # affordable)
  $PY benchmarks/throughput.py -s 'tools={Calculator: {k: 5, m: 2, prefilter: false}}' \
    -s ray.torch_threads=2 --docs 2 --which bruteforce --output "$OUT"
fi
