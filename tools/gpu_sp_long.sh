#!/usr/bin/env bash
# On a 4-GPU machine: the NCCL bf16 correctness test (every sp method and kernel, and packed documents
# under ring/ring_bidir), then the attention benchmark at 512K and 1M tokens on 4 GPUs and at 512K on
# 2 (CUDA_VISIBLE_DEVICES=0,1), GQA 32/8, cuDNN, and a kernel-level profile of one ring fwd+bwd at 128K
# and 256K on 4 GPUs (where the time goes). Logs and JSON under $OUT.
#   . .whl/env.sh && bash tools/gpu_sp_long.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
filter() { grep -v "^W1\|^\*\*\*\|OMP_NUM\|USDT" ; }
timeout 200 python3 -m pytest tests/gpu/test_sp_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/sp_gpu_test.log" | tail -4
timeout 100 torchrun --nproc-per-node 4 tools/bench_attention.py --seqs 131072 262144 --heads 32/8 --kernels cudnn \
  --methods ring --native --iters 1 --profile ring ulysses --json "$OUT/attn_profile_4gpu.json" 2>&1 | filter \
  | tee "$OUT/attn_profile_4gpu.log" | grep -v "^|"
timeout 330 torchrun --nproc-per-node 4 tools/bench_attention.py --seqs 524288 1048576 --heads 32/8 --kernels cudnn \
  --methods ring ulysses --native cudnn --iters 1 --json "$OUT/attn_long_4gpu.json" 2>&1 | filter \
  | tee "$OUT/attn_long_4gpu.log" | grep -v "^|"
CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --nproc-per-node 2 tools/bench_attention.py --seqs 524288 --heads 32/8 \
  --kernels cudnn --methods ring ulysses --native cudnn --iters 1 --json "$OUT/attn_long_2gpu.json" 2>&1 | filter \
  | tee "$OUT/attn_long_2gpu.log" | grep -v "^|"
