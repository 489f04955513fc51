#!/usr/bin/env bash
# On the GPU machine: the GPU tests, then the 1B / 32K recipe; logs and metrics under $OUT.
#   . .whl/env.sh && bash tools/gpu_smoke.sh [steps]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${1:-12}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
python3 -m longtrain train recipes/llama3-1b-32k-1gpu.yaml train.steps="$STEPS" train.output_dir=/tmp/run1b \
  train.log_interval=1 2>&1 | tee "$OUT/train_1b.log" | tail -20
cp /tmp/run1b/metrics.jsonl "$OUT/metrics_1b.jsonl" 2>/dev/null
python3 - <<'PY'
import json, statistics
recs = [json.loads(l) for l in open("/tmp/run1b/metrics.jsonl") if '"loss"' in l]
steady = recs[3:] or recs
print(f"1B @ 32K, steps {len(recs)}: median step {statistics.median(r['step_time_s'] for r in steady):.3f} s, "
      f"{statistics.median(r['tflops_per_device'] for r in steady):.1f} TFLOP/s, "
      f"MFU {100*statistics.median(r['mfu'] for r in steady):.1f}% (989 basis), peak {max(r['peak_mem_gib'] for r in recs):.1f} GiB, "
      f"loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
PY
