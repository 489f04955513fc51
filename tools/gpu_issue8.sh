#!/usr/bin/env bash
# Issue 8 on a 4-GPU machine (kind nvidia-h200-x4), one part per device call (each part fits the 10-minute
# limit of one call; the estimates are from one-H200 measurements, docs/performance.md). JSON and logs
# under $OUT.
#   ../shared/device/wheels.sh einops      # once, on this machine: the ALST peer's Ulysses code imports it
#   . .whl/env.sh && bash tools/gpu_issue8.sh longtrain|peer|alst|full|maxlen
# Parts:
#   longtrain  longtrain's 1M recipe depth-truncated to 4 layers: 1 warm-up + 2 timed + 1 profiled step
#   peer       the PyTorch-native peer, cp 4, the same shape and length
#   alst       the ALST peer, sp 4, the same shape and length
#   full       the full 32-layer model, one step at 1M tokens (the must-complete run)
#   maxlen     the longest sequence of the 4-layer model, longtrain then the torch-native peer (capped)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=recipes/llama3-8b-1m-4gpu.yaml
filter() { grep -v "^W1\|^\*\*\*\|OMP_NUM\|USDT\|UserWarning\|_warn_once" ; }
case "${1:-}" in
  longtrain)
    timeout 570 torchrun --nproc-per-node 4 tools/bench_train.py $R --steps 2 --warmup 1 --layers 4 \
      --json "$OUT/issue8.json" 2>&1 | filter | tee "$OUT/longtrain_1m.log" | tail -25 ;;
  peer)
    timeout 570 torchrun --nproc-per-node 4 tools/peers/torch_native.py --seq-len 1048576 --layers 4 --cp 4 \
      --steps 2 --warmup 1 --json "$OUT/issue8.json" 2>&1 | filter | tee "$OUT/peer_1m.log" | tail -25 ;;
  alst)
    timeout 570 torchrun --nproc-per-node 4 tools/peers/alst.py --seq-len 1048576 --layers 4 --sp 4 \
      --steps 1 --warmup 1 --json "$OUT/issue8.json" 2>&1 | filter | tee "$OUT/alst_1m.log" | tail -25 ;;
  full)
    timeout 580 torchrun --nproc-per-node 4 -m longtrain train $R train.steps=1 train.log_interval=1 \
      checkpoint.interval=0 train.output_dir=/tmp/full1m 2>&1 | filter | tee "$OUT/full_1m.log" | tail -25
    cp /tmp/full1m/metrics.jsonl "$OUT/full_1m_metrics.jsonl" 2>/dev/null ;;
  maxlen)
    timeout 580 python3 tools/bench_train.py $R --layers 4 --steps 1 --warmup 0 --no-profile-step --nproc 4 \
      --find-max-seq --seq-start 1048576 --seq-step 262144 --seq-max 3145728 --attempt-timeout 280 \
      --json "$OUT/maxlen.json" 2>&1 | filter | tee "$OUT/maxlen_longtrain.log" | tail -12 ;;
  *)
    echo "usage: bash tools/gpu_issue8.sh longtrain|peer|alst|full|maxlen" >&2; exit 2 ;;
esac
