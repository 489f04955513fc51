#!/usr/bin/env bash
# On a 2-GPU machine: the 1B / 32K recipe with each engine on one GPU (same process tree, ratios),
# then ZeRO-3 over 2 GPUs through launchers/torchrun.sh, checkpoint at step 4, and a resume from it.
#   . .whl/env.sh && bash tools/gpu_engine_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=recipes/llama3-1b-32k-1gpu.yaml
summ() { python3 - "$1" "$2" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l]
st = recs[2:] or recs
print(f"{sys.argv[1]:<28} steps {len(recs):>2} | {statistics.median(r['step_time_s'] for r in st):.3f} s/step | "
      f"{statistics.median(r['tflops_per_device'] for r in st):6.1f} TFLOP/s/GPU | MFU {100*statistics.median(r['mfu'] for r in st):.1f}% | "
      f"peak {max(r['peak_mem_gib'] for r in recs):5.1f} GiB | losses {' '.join(f'{r['loss']:.4f}' for r in recs)}")
PY
}
CUDA_VISIBLE_DEVICES=0 python3 -m longtrain train $R train.steps=10 train.output_dir=/tmp/ds1 > "$OUT/ds1.log" 2>&1; echo "ds1 rc=$?"
CUDA_VISIBLE_DEVICES=0 python3 -m longtrain train $R train.steps=10 parallel.engine=torch train.output_dir=/tmp/tc1 > "$OUT/tc1.log" 2>&1; echo "tc1 rc=$?"
NPROC=2 bash launchers/torchrun.sh $R parallel.zero_stage=3 train.steps=8 checkpoint.interval=4 checkpoint.export_hf=true \
  train.output_dir=/tmp/z3 > "$OUT/z3.log" 2>&1; echo "z3 rc=$?"
NPROC=2 bash launchers/torchrun.sh $R parallel.zero_stage=3 train.steps=8 checkpoint.resume=/tmp/z3/checkpoints/step_00000004 \
  train.output_dir=/tmp/z3r > "$OUT/z3r.log" 2>&1; echo "z3 resume rc=$?"
ls -la /tmp/z3/hf /tmp/z3/checkpoints /tmp/z3/checkpoints/step_00000008 2>&1 | tee "$OUT/z3_files.txt" | tail -12
for x in ds1 tc1 z3 z3r; do cp /tmp/$x/metrics.jsonl "$OUT/metrics_$x.jsonl" 2>/dev/null; done
echo "=== summary (median of steps 3+) ==="
summ "1 GPU deepspeed ZeRO-2 bf16" /tmp/ds1/metrics.jsonl
summ "1 GPU torch autocast bf16" /tmp/tc1/metrics.jsonl
summ "2 GPU ZeRO-3 (dp=2)" /tmp/z3/metrics.jsonl
summ "2 GPU ZeRO-3 resumed @4" /tmp/z3r/metrics.jsonl
grep -h "error\|Error\|resumed" "$OUT"/*.log | head -20
