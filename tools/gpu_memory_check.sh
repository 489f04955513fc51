#!/usr/bin/env bash
# On one H200: activation swapping's CUDA test, then tools/bench_memory.py (keep / recompute / swap at the
# cost model's alpha and a sweep) on a stack of Llama-3-8B-shaped layers. Logs and JSON under $OUT.
#   . .whl/env.sh && bash tools/gpu_memory_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 python3 -m pytest tests/gpu/test_swap_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/swap_gpu_test.log" | tail -3
timeout ${BENCH_TIMEOUT:-400} python3 tools/bench_memory.py --seq ${SEQ:-131072} --layers 3 --iters 2 \
  --json "$OUT/memory_128k.json" ${EXTRA:-} 2>&1 | tee "$OUT/memory_128k.log" | grep -v "^{"
