#!/usr/bin/env bash
# On a 4-GPU machine: the NCCL bf16 correctness test of every sp method and kernel, then the attention
# benchmark on 4 GPUs and on 2 (CUDA_VISIBLE_DEVICES=0,1). Logs and JSON under $OUT.
#   . .whl/env.sh && bash tools/gpu_sp_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest tests/gpu/test_sp_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/sp_gpu_test.log" | tail -4
timeout 200 torchrun --nproc-per-node 4 tools/bench_attention.py --seqs 131072 262144 --iters 2 \
  --json "$OUT/attn_4gpu.json" 2>&1 | grep -v "^W1\|^\*\*\*\|OMP_NUM" | tee "$OUT/attn_4gpu.log" | grep -v "^|"
CUDA_VISIBLE_DEVICES=0,1 timeout 170 torchrun --nproc-per-node 2 tools/bench_attention.py --seqs 131072 262144 \
  --kernels cudnn --iters 2 --json "$OUT/attn_2gpu.json" 2>&1 | grep -v "^W1\|^\*\*\*\|OMP_NUM" \
  | tee "$OUT/attn_2gpu.log" | grep -v "^|"
