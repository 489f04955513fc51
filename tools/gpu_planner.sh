#!/usr/bin/env bash
# Issue 6 on one H200 (kind nvidia-h200): the planned allocator against torch's caching allocator and
# expandable segments, in the same training steps. JSON and logs under $OUT.
#   . .whl/env.sh && bash tools/gpu_planner.sh check [fallback[:reuse_after]...] | side [variants] | fits BUDGET V:SEQ... | maxlen BUDGET STEP V:START:CAP...
# The device tool brings back at most 8 files: run a part with OUT set to a scratch folder and pack it, e.g.
#   R=$OUT; OUT=/tmp/res timeout 560 bash tools/gpu_planner.sh side; tar czf $R/res.tgz -C /tmp/res .
# Parts:
#   check   tools/planner_gpu_check.py: a planned and a normal training give the same losses and gradients,
#           for each fallback[:reuse_after] named (default "pool caching"; e.g. caching:release)
#   side    the 8B shape, 4 layers, 128K tokens (per GPU, with SP=N), swap auto, ZeRO-3 with the optimizer offloaded: the three
#           allocators side by side (4 warm-up steps: the third is recorded and the fourth plans, or with
#           planned-early the second and the third; 3 timed steps replay). Variants: caching expandable
#           planned planned-early planned-check (check mode: the record lists lifetime breaks) planned-noside
#           (side streams' requests left to the fallback: memory.planner.side_streams=false) planned-caching
#           (torch's caching allocator behind the plan: memory.planner.fallback=caching, the default),
#           planned-pool (memory.planner.fallback=pool) and planned-release (a tensor other streams still
#           read is reused from where the recording saw them done: memory.planner.reuse_after=release;
#           planned-pass: from the end of the next layer pass, or that release if sooner: =next_pass, the
#           default; planned-free: at its free, =free);
#           default the first three. A planned variant's saved plans (JSON) and their pictures land in $OUT
#           too, level 2 beside the caching run's snapshot of one step (bench_train --memory-snapshot) when
#           caching ran first
#   fits    within a GPU budget (GiB; a ballast takes the rest), one attempt per allocator:length pair
#   maxlen  BUDGET STEP V:START:CAP...: the longest sequence each allocator trains (fresh process per attempt)
#           within a GPU budget; an attempt near 128K costs 80-100 s of device time, so bracket each search
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=recipes/llama3-8b-1m-4gpu.yaml
ONE="parallel.sp.degree=1 launch.nproc=1"
# side with SP=N (kind nvidia-h200-xN): sequence parallelism over N GPUs (SP_METHOD, default ring), 128K
# tokens per GPU (or SEQ tokens in all); each rank plans its own requests and the record lists every rank's plan (planner_ranks)
SP=${SP:-1}
SEQ=${SEQ:-$((131072 * SP))}  # side: the tokens of a sequence (all GPUs together)
LAUNCH="python3"
if [ "$SP" -gt 1 ]; then
  ONE="parallel.sp.degree=$SP launch.nproc=$SP parallel.sp.method=${SP_METHOD:-ring}"
  LAUNCH="torchrun --standalone --nproc-per-node $SP"
fi
filter() {  # drops launcher noise; each line gets the time it was read (where a run spends its time, a hang at exit)
  grep --line-buffered -v "^W1\|^\*\*\*\|OMP_NUM\|USDT\|UserWarning\|_warn_once" | while IFS= read -r l; do printf '%(%T)T %s\n' -1 "$l"; done
}
variant() {  # name -> overrides
  case $1 in
    caching) echo "memory.allocator=default" ;;
    expandable) echo "memory.allocator=expandable" ;;
    planned) echo "memory.planner.enabled=true memory.planner.time_limit_s=20" ;;
    planned-noside) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.side_streams=false" ;;
    planned-pool) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.fallback=pool" ;;
    planned-early) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.record_iteration=1" ;;
    planned-check) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.check=true" ;;
    planned-caching) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.fallback=caching" ;;
    planned-release) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.reuse_after=release" ;;
    planned-pass) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.reuse_after=next_pass" ;;
    planned-free) echo "memory.planner.enabled=true memory.planner.time_limit_s=20 memory.planner.reuse_after=free" ;;
  esac
}
case "${1:-}" in
  check)  # both fallbacks (or those named); fails if any does
    rc=0
    for fr in ${2:-pool caching}; do  # fallback[:reuse_after], e.g. caching:release
      fb=${fr%%:*}; ra=free; [ "$fr" != "$fb" ] && ra=${fr#*:}; n=${fb}_$ra
      python3 tools/planner_gpu_check.py --out /tmp/planner_check_$n --fallback $fb --reuse-after $ra \
        --json "$OUT/planner_check_$n.json" > "$OUT/planner_check_$n.raw" 2>&1 || rc=1
      filter < "$OUT/planner_check_$n.raw" | tee "$OUT/planner_check_$n.log" | tail -12
    done
    exit $rc ;;
  side)
    PROF="--no-profile-step"; [ "${PROFILE:-0}" = 1 ] && PROF="--profile-step"  # PROFILE=1: one more step profiled (the record's time split)
    SNAP="$OUT/snapshot_caching.pickle"  # the caching allocator's step, drawn beside the plans (name it first)
    for v in ${2:-caching expandable planned}; do
      extra=""; [ "$v" = caching ] && extra="--memory-snapshot $SNAP"
      timeout ${SIDE_TIMEOUT:-300} $LAUNCH tools/bench_train.py $R $ONE data.seq_len=$SEQ $(variant $v) \
        train.output_dir="$OUT/run_$v" --layers 4 --steps 3 --warmup 4 $PROF $extra \
        --json "$OUT/planner_side.json" 2>&1 | filter \
        | tee "$OUT/side_$v.log" | tail -14
      for lv in level2 level1_largest; do  # the plans the runtime saved, drawn (time x, address y)
        P="$OUT/run_$v/memory_plan_runtime_rank0_$lv.json"
        with=""; [ "$lv" = level2 ] && [ -f "$SNAP" ] && with="--snapshot $SNAP"
        if [ -f "$P" ]; then python3 tools/plan_memory.py --png "$OUT/plan_${v}_$lv.png" --plan "$P" $with | tail -2; fi
      done
    done ;;
  fits)  # budget GiB, then allocator:seq pairs: one attempt each (a fresh process), fits or runs out of memory
    B=$2; shift 2
    for vs in "$@"; do
      v=${vs%%:*}; S=${vs##*:}
      timeout ${FITS_TIMEOUT:-230} python3 tools/bench_train.py $R $ONE $(variant $v) --layers 4 --steps 1 --warmup 3 \
        --no-profile-step --gpu-budget-gib "$B" --find-max-seq --seq-start "$S" --seq-step "$S" --seq-max "$S" \
        --json "$OUT/planner_fits_${B}gib_${v}_$S.json" 2>&1 | filter | tee "$OUT/fits_${B}gib_${v}_$S.log" | tail -3
    done ;;
  maxlen)  # budget GiB, step, then allocator:start:cap triples: the search from start (doubling, capped, then
           # bisecting to step), so a known bracket costs 2-3 attempts
    B=$2; T=$3; shift 3
    for vsm in "$@"; do
      IFS=: read -r v S M <<< "$vsm"
      timeout 560 python3 tools/bench_train.py $R $ONE $(variant $v) --layers 4 --steps 1 --warmup 3 \
        --no-profile-step --gpu-budget-gib "$B" --find-max-seq --seq-start "$S" --seq-step "$T" \
        --seq-max "$M" --attempt-timeout 200 --json "$OUT/planner_maxlen_${B}gib_$v.json" 2>&1 | filter \
        | tee "$OUT/maxlen_${B}gib_$v.log" | tail -6
    done ;;
  *)
    echo "usage: bash tools/gpu_planner.sh check [fallback[:reuse_after]...] | side [variants] | fits BUDGET V:SEQ... | maxlen BUDGET STEP V:START:CAP..." >&2
    exit 2 ;;
esac
