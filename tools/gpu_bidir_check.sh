#!/usr/bin/env bash
# On a 4-GPU machine: NCCL bf16 correctness of every sp method (ring_bidir included), then ring vs the
# bidirectional ring vs TokenRing on 4 GPUs (cuDNN), GQA and MHA, 128K and 256K tokens.
#   . .whl/env.sh && bash tools/gpu_bidir_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 100 python3 -m pytest tests/gpu/test_sp_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/sp_gpu_test.log" | tail -3
timeout 170 torchrun --nproc-per-node 4 tools/bench_attention.py --seqs 131072 262144 --kernels cudnn \
  --methods ring ring_bidir token_ring --native --iters 3 --json "$OUT/attn_bidir_4gpu.json" 2>&1 \
  | grep -v "^W1\|^\*\*\*\|OMP_NUM" | tee "$OUT/attn_bidir_4gpu.log" | grep -v "^|"
