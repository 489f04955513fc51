#!/usr/bin/env bash
# On a 4-GPU machine: what only a GPU can settle about the PyTorch-native peer (tools/peers/torch_native.py),
# at a short length with one layer (each line ~30-60 s, mostly start-up), then a 1-GPU run at 256K tokens.
#   . .whl/env.sh && bash tools/peers/gpu_peer_check.sh
# Each run prints its record (the `checks` line: SDPA calls unmasked and causal, shards consistent, and with cp > 1
# the context-parallel attention against single-device SDPA) or fails loudly; JSON and logs under $OUT.
#   1. auto backend choice and cp 4 with HF's enable_gqa through PyTorch's context-parallel SDPA, per backend;
#   2. the same with K/V repeated to the query heads (--gqa repeat), and the efficient kernel (always repeats);
#   3. the alltoall rotation;
#   4. one GPU, cp 1, 4 layers at 256K tokens (the single-GPU peer number).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P=tools/peers/torch_native.py
filter() { grep -v "^W1\|^\*\*\*\|OMP_NUM\|USDT" ; }
run4() {  # name, flags...
  local name=$1; shift
  echo "== $name: $*"
  timeout 240 torchrun --nproc-per-node 4 $P --seq-len 65536 --layers 1 --steps 1 --warmup 1 --cp 4 \
    --json "$OUT/peer_check.json" "$@" 2>&1 | filter > "$OUT/peer_$name.log"
  echo "   exit ${PIPESTATUS[0]}"; grep -E "tokens/s |TFLOP/s|checks|configuration|Error|error:" "$OUT/peer_$name.log" | head -8
}
run4 auto
run4 flash --sdpa-backend flash
run4 cudnn_repeat --sdpa-backend cudnn --gqa repeat
run4 efficient --sdpa-backend efficient
run4 alltoall --rotate-method alltoall
echo "== 1 GPU, cp 1, 4 layers, 256K tokens"
CUDA_VISIBLE_DEVICES=0 timeout 400 torchrun --nproc-per-node 1 $P --seq-len 262144 --layers 4 --steps 3 --warmup 2 \
  --json "$OUT/peer_1gpu.json" 2>&1 | filter | tee "$OUT/peer_1gpu.log" | grep -v "^  step"
