"""Throughput, MFU and memory of a recipe: K timed optimizer steps of the real trainer.

    python tools/bench_train.py RECIPE [key=value ...] [--steps 10] [--warmup 3] [--layers N] [--json PATH]
                                [--profile-step | --no-profile-step] [--trace-dir DIR] [--memory-snapshot PATH]
    torchrun --nproc-per-node 8 tools/bench_train.py RECIPE [...]     # several ranks: rank 0 prints and writes
    python tools/bench_train.py RECIPE [...] --find-max-seq --seq-start 32768 --seq-step 8192 [--nproc 8]

RECIPE and the overrides are those of `longtrain train`. Reported (the step of median time among the
timed ones):
  - tokens/s (all ranks) and model TFLOP/s per GPU, from the trainer's own step records (FLOPs are
    counted once, in longtrain/train/metrics.py);
  - MFU against train.peak_tflops (989 = H100/H200 SXM dense bf16 datasheet) and against a bf16
    matmul measured on this device before training (8192^3 by default: what a GPU can actually do);
  - peak GPU memory allocated and reserved, host buffers of the activation swap pool (pinned) and the
    process's peak RSS: maxima over ranks, including the warm-up steps;
  - the step time and, with activation swapping on CUDA, the copy streams' busy time per step;
  - the time split of one more step, profiled after the timed ones (--profile-step, on by default on
    CUDA; the profiler's overhead keeps it out of the median): the GPU timeline of each rank from
    torch.profiler, split into compute (every kernel but NCCL's, device-local copies and memsets),
    communication (NCCL kernels, peer-to-peer copies) and host<->device copies, then measured over
    the step's wall interval: compute_s (union of compute), exposed_comm_s (communication not under
    compute), exposed_copy_s (copies under neither), idle_s (the GPU doing none of these: host
    overhead, launch gaps, waits), and comm_s / copy_s in all, hidden or not. Maxima over ranks, and
    each rank's split in the JSON. --trace-dir keeps each rank's chrome trace of that step.
On CPU (`debug`, `quickstart`) it runs as a smoke test: no MFU basis exists there, and no GPU timeline
to split (--profile-step still profiles a step there, with the CPU activity only); it says so.

--layers N keeps the width and trains N decoder layers (model.num_hidden_layers=N); the output and
the JSON say the model is depth-truncated. --json appends one record per run to a JSON list, which
`longtrain report --bench` plots against sequence length.

--find-max-seq searches the longest data.seq_len that trains the K steps: each attempt runs this
script in a fresh process (under torchrun when --nproc > 1, or when launched by torchrun: then rank 0
searches and starts its attempts on this node), from --seq-start doubling until an attempt fails,
then bisecting down to --seq-step. An attempt ran out of memory when it exits non-zero after printing
the OOM marker; any other failure stops the search and is reported as a failure, not as OOM.
--gpu-budget-gib B leaves each run B GiB of its GPU (one ballast allocation takes the rest first), so the
search compares allocators or policies for a smaller memory in shorter attempts. With
memory.planner.enabled the record also holds the plan's summary, its counters and its refusals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OOM_MARKER = "BENCH_TRAIN_OOM"  # printed by an attempt that ran out of memory (with a non-zero exit)
EXIT_USAGE, EXIT_OOM = 2, 3
# Set by torchrun for its workers: an attempt started from a torchrun worker must not inherit them.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCHELASTIC_ERROR_FILE")


class UsageError(ValueError):
    """A bad flag or file: one line on stderr, exit code 2 (like the recipe errors of `longtrain`)."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(*lines: str) -> None:
    if _rank() == 0:
        print("\n".join(lines), flush=True)


# ---- one benchmark, on every rank -------------------------------------------------------------
def bench_overrides(overrides: list[str], steps: int, warmup: int, layers: int | None) -> list[str]:
    """The recipe's overrides plus the bench's own: the LR schedule spans the steps run, nothing is
    resumed (the run directory may hold checkpoints of another depth), nothing goes to W&B."""
    out = [*overrides, f"train.steps={warmup + steps}", "checkpoint.resume=null", "logging.wandb.mode=disabled"]
    return out + ([f"model.num_hidden_layers={layers}"] if layers else [])


def matmul_tflops(device, n: int, iters: int = 20) -> float:
    """The bf16 matmul rate this device achieves (n x n x n, after a warm-up), in TFLOP/s."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


# ---- the time split of a profiled step -------------------------------------------------------
STEP_ANNOTATION = "bench_train::profiled_step"  # record_function around the profiled step: its wall interval
SPLIT_KEYS = ("compute_s", "exposed_comm_s", "exposed_copy_s", "idle_s", "comm_s", "copy_s")
Interval = tuple[float, float]


def _union(intervals: list[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points (empty ones dropped)."""
    out: list[list[float]] = []
    for s, e in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in _union(intervals))


def split_intervals(step: Interval, compute: list[Interval], comm: list[Interval],
                    copy: list[Interval]) -> dict[str, float]:
    """Where the time of `step` (start, end) went, from the busy intervals of each class of GPU work
    (any order, overlapping or nested, clipped to the step). Compute has priority, then
    communication, then copies: exposed_comm_s is communication under no compute, exposed_copy_s
    copies under neither, idle_s the step under none of them, so compute_s + exposed_comm_s +
    exposed_copy_s + idle_s = step_s. comm_s and copy_s are the unions of their own class, hidden
    or not. Same unit as the input."""
    lo, hi = step

    def clip(intervals: list[Interval]) -> list[Interval]:
        return _union([(max(s, lo), min(e, hi)) for s, e in intervals])

    compute, comm, copy = clip(compute), clip(comm), clip(copy)
    busy_compute, busy_comm = _length(compute), _length(compute + comm)
    busy = _length(compute + comm + copy)
    return {"step_s": hi - lo, "compute_s": busy_compute,
            "exposed_comm_s": max(0.0, busy_comm - busy_compute),  # max: float rounding, never below 0
            "exposed_copy_s": max(0.0, busy - busy_comm), "idle_s": max(0.0, (hi - lo) - busy),
            "comm_s": _length(comm), "copy_s": _length(copy)}


def device_activity_class(event: dict) -> str | None:
    """compute | comm | copy for a GPU activity of a chrome trace exported by torch.profiler (kineto),
    None for anything else (CPU ops, runtime calls, the GPU side of record_function ranges, syncs).
    Kineto names the kind of activity in `cat`: kernel, gpu_memcpy, gpu_memset. NCCL's kernels
    (collectives and send/recv) are communication, as are peer-to-peer copies between GPUs; copies
    that have the host at one end are copies; device-local copies and memsets use the GPU's own
    memory bandwidth like any kernel, so they count as compute."""
    cat, name = str(event.get("cat", "")).lower(), str(event.get("name", ""))
    if cat == "kernel":
        return "comm" if name.removeprefix("void ").startswith("nccl") else "compute"
    if cat == "gpu_memcpy":  # "Memcpy HtoD (Pinned -> Device)", "Memcpy DtoD (Device -> Device)", ...
        kind = next((w for w in name.split() if len(w) == 4 and w[1:3] == "to"), "")  # HtoD, DtoH, DtoD, PtoP, ...
        if kind == "PtoP":
            return "comm"
        return "copy" if "H" in kind else "compute"  # HtoD, DtoH, HtoH (and the CUDA-array kinds HtoA, AtoH)
    if cat == "gpu_memset":
        return "compute"
    return None


def split_from_trace(trace: dict) -> dict:
    """The time split of the profiled step from one rank's chrome trace (torch.profiler's
    export_chrome_trace): its wall interval is the STEP_ANNOTATION range on the host, its GPU work
    the complete ("X") device activities, in microseconds as the trace keeps them. Returns
    {"profiled_step_s", "events": counts per class, "split": split_intervals' dict in seconds, or
    None with "why"}."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == STEP_ANNOTATION]
    if len(steps) != 1:
        return {"profiled_step_s": None, "events": {}, "split": None,
                "why": f"the trace holds {len(steps)} '{STEP_ANNOTATION}' ranges, not one"}
    t0 = float(steps[0]["ts"])  # times relative to the step's start: the absolute ones are ~1e12 us
    step = (0.0, float(steps[0]["dur"]) / 1e6)
    classes: dict[str, list[Interval]] = {"compute": [], "comm": [], "copy": []}
    for e in events:
        c = device_activity_class(e)
        if c is not None:
            s = (float(e["ts"]) - t0) / 1e6
            classes[c].append((s, s + float(e["dur"]) / 1e6))
    counts = {c: len(v) for c, v in classes.items()}
    out = {"profiled_step_s": step[1], "events": counts, "split": None, "why": None}
    if not any(counts.values()):
        out["why"] = "the profiler recorded no GPU activity in the step"
    else:
        out["split"] = split_intervals(step, classes["compute"], classes["comm"], classes["copy"])
    return out


def profile_step(trainer, cuda: bool, rank: int, trace_dir: str | None) -> dict:
    """One more training step under torch.profiler (CPU and, on CUDA, GPU activities); its split
    (split_from_trace). The step is not one of the timed ones: the profiler slows the host."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function(STEP_ANNOTATION):
            rec = trainer.train_step()
    with tempfile.TemporaryDirectory(prefix="bench_train_trace_") as tmp:
        path = Path(trace_dir or tmp) / f"profiled_step_rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        out = split_from_trace(json.loads(path.read_text()))
    out.update(rank=rank, step=rec["step"], step_time_s=rec["step_time_s"])
    if not cuda:  # the CPU activity alone: the step's interval is known, there is no GPU timeline
        out.update(split=None, why="CPU: the profiler sees no GPU timeline to split")
    return out


def combine_splits(ranks: list[dict]) -> tuple[dict, str | None]:
    """The time_split fields from every rank's profile_step result: each field's maximum over ranks
    and the ranks' own splits; with the reason when any rank has no split."""
    missing = [r for r in ranks if r["split"] is None]
    out = {"profiled_step": ranks[0]["step"],
           "profiled_step_s": max((r["profiled_step_s"] for r in ranks if r["profiled_step_s"] is not None),
                                  default=None),
           "per_rank": [{"rank": r["rank"], "profiled_step_s": r["profiled_step_s"], "events": r["events"],
                         **{k: r["split"][k] for k in SPLIT_KEYS if r["split"]}} for r in ranks]}
    if missing:
        whys = sorted({r["why"] for r in missing})
        return out, "; ".join(whys) + f" (rank(s) {', '.join(str(r['rank']) for r in missing)})"
    out.update({k: max(r["split"][k] for r in ranks) for k in SPLIT_KEYS})
    return out, None


def profile_all_ranks(stepper, cuda: bool, rank: int, world: int, trace_dir: str | None) -> list[dict]:
    """`profile_step` on every rank, and every rank's split on every rank (all-gathered)."""
    prof = [profile_step(stepper, cuda, rank, trace_dir)]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, prof[0])
        prof = gathered
    return prof


def median_step_split(recs: list[dict], prof: list[dict] | None, cuda: bool,
                      copies: list[dict] = ()) -> tuple[dict, dict, str | None]:
    """The timed step of median time, its time split (the copy streams' busy time from `copies`, the rest
    from the profiled step's ranks `prof` when a step was profiled) and why the split's missing parts are."""
    mid = sorted(recs, key=lambda r: r["step_time_s"])[len(recs) // 2]
    split = {"step_s": mid["step_time_s"]}
    if copies:  # busy time of the copy streams per step: copies overlapped with compute count as well
        split.update({f"swap_{k}_busy_s": statistics.median(c[f"{k}_s"] for c in copies) for k in ("d2h", "h2d")})
        split.update({f"swap_{k}_bytes": copies[0][f"{k}_bytes"] for k in ("d2h", "h2d")})
    if prof is None:
        why = ("CPU: no GPU timeline to split" if not cuda else "no step profiled") + " (--profile-step profiles one)"
    else:
        measured, why = combine_splits(prof)
        split.update(measured)
    split["profiled"] = prof is not None
    return mid, split, why


def record_snapshot_step(trainer, path: str, rank: int) -> str:
    """One training step with the CUDA allocator's history recorded (actions only, no stack frames: the
    pickle stays small), its `torch.cuda.memory._snapshot()` pickled to `path` (`.rankR` added for R > 0)."""
    import pickle

    import torch

    out = Path(path if rank == 0 else f"{path}.rank{rank}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(context=None, max_entries=2_000_000)
    try:
        trainer.train_step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(snap, f)
    tmp.replace(out)
    return str(out)


def run_bench(recipe: str, overrides: list[str], steps: int, warmup: int, layers: int | None,
              matmul_n: int, profiled: bool | None = None, trace_dir: str | None = None,
              gpu_budget_gib: float = 0.0, memory_snapshot: str | None = None) -> dict | None:
    """Every rank trains warmup + steps steps, and one more under the profiler when `profiled` (None:
    on CUDA only); rank 0 returns the record (the others None). `gpu_budget_gib` > 0: one ballast
    allocation first takes all but that much of each GPU's free memory (the peaks reported leave it out).
    `memory_snapshot`: one more step after the timed ones with torch's allocator history recorded, its
    snapshot pickled there (rank R > 0 adds `.rankR`): `tools/plan_memory.py --snapshot` draws it."""
    import torch
    import torch.distributed as dist

    from longtrain.config import load_config
    from longtrain.models import model_args
    from longtrain.parallel import init_mesh
    from longtrain.train.logger import setup_logging
    from longtrain.train.metrics import host_peak_rss_gib
    from longtrain.train.preflight import model_shape, preflight
    from longtrain.train.trainer import Trainer, git_sha

    cfg = load_config(recipe, bench_overrides(overrides, steps, warmup, layers))
    full_depth = model_args(cfg.model.preset, cfg.model.pretrained).num_hidden_layers
    if layers and layers > full_depth:
        raise UsageError(f"--layers {layers} is more than the model's {full_depth} layers: give at most "
                         f"{full_depth} (the flag truncates, it does not deepen)")
    preflight(cfg)
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if memory_snapshot and (not on_cuda or cfg.memory.planner.enabled):
        raise UsageError("--memory-snapshot records torch's CUDA caching allocator: "
                         + ("this run is not on CUDA" if not on_cuda else
                            "memory.planner.enabled=true replaces it (snapshot a run without the planner)"))
    if "WORLD_SIZE" not in os.environ and cfg.launch.nproc > 1:
        _say(f"note: launch.nproc={cfg.launch.nproc} is not used: bench_train.py runs the ranks it is started "
             f"with (torchrun --nproc-per-node {cfg.launch.nproc} tools/bench_train.py ...)")
    from longtrain.memory.arena import configure_cuda_allocator

    allocator = configure_cuda_allocator(cfg)  # before CUDA starts, as the trainer does
    try:
        mesh = init_mesh(cfg.train.device, cfg.launch.backend, cfg.launch.timeout_s,
                         need_group=cfg.parallel.engine == "deepspeed", sp_degree=cfg.parallel.sp.degree)
    except ValueError as e:  # e.g. sp.degree=2 in a single process: say how to start more ranks
        raise UsageError(f"{e} (bench_train.py runs the ranks it is started with: use torchrun --nproc-per-node N)") \
            from None
    setup_logging(mesh.rank)
    torch.manual_seed(cfg.train.seed)
    cuda = mesh.device.type == "cuda"
    matmul = None
    if cuda:  # before the model exists, so its memory is free; its buffers are not in the peaks below
        matmul = matmul_tflops(mesh.device, matmul_n)
        torch.cuda.empty_cache()
    ballast = None
    if cuda and gpu_budget_gib > 0:
        free = torch.cuda.mem_get_info(mesh.device)[0]
        take = free - int(gpu_budget_gib * 2**30)
        if take <= 0:
            raise UsageError(f"--gpu-budget-gib {gpu_budget_gib} is not below the {free / 2**30:.1f} GiB free on "
                             f"{mesh.device}: give less")
        ballast = torch.empty(take, dtype=torch.uint8, device=mesh.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(mesh.device)
    trainer = Trainer(cfg, mesh)
    trainer.begin_stage(0)
    streams = trainer.model.swap_streams
    time_copies = cuda and streams is not None
    profiled = cuda if profiled is None else profiled
    recs, copies = [], []
    held = ballast.numel() if ballast is not None else 0

    def gpu_peaks() -> tuple[float, float]:
        return (((torch.cuda.max_memory_allocated(mesh.device) - held) / 2**30,
                 (torch.cuda.max_memory_reserved(mesh.device) - held) / 2**30) if cuda else (-1.0, -1.0))

    warm_peaks = (-1.0, -1.0)
    warmup_s = []  # the warm-up steps' times (the planner's recorded iteration, a managed-memory overflow: slower)
    for i in range(warmup + steps):
        timed = i >= warmup
        if cuda and i == warmup:  # the timed steps' own peaks (an allocator's steady state), then the run's
            warm_peaks = gpu_peaks()
            torch.cuda.reset_peak_memory_stats(mesh.device)
        if time_copies:
            streams.reset_stats()
            streams.timing = timed
        rec = trainer.train_step()
        if mesh.is_main:  # progress: a long step, or one that stalls, shows here
            print(f"  step {i + 1}/{warmup + steps} ({'timed' if timed else 'warm-up'}): {rec['step_time_s']:.3f} s",
                  flush=True)
        if not timed:
            warmup_s.append(rec["step_time_s"])
        if timed:
            recs.append(rec)
            if time_copies:
                d2h_s, h2d_s = streams.copy_time_s()
                copies.append({"d2h_s": d2h_s, "h2d_s": h2d_s, "d2h_bytes": streams.stats.d2h_bytes,
                               "h2d_bytes": streams.stats.h2d_bytes})
    # read before the profiled step: the profiler's own host memory is not the recipe's
    timed_peaks = gpu_peaks()
    peaks = tuple(max(w, t) for w, t in zip(warm_peaks, timed_peaks))
    plan_rt = getattr(trainer.model, "plan_runtime", None)
    planner = None if plan_rt is None else plan_rt.report()  # rank 0's; every rank's when there are several
    planner_ranks = None
    if planner is not None and mesh.distributed:  # each rank plans its own requests (sp: its own shard's)
        planner_ranks = [None] * mesh.world_size
        dist.all_gather_object(planner_ranks, planner)
    mem = torch.tensor([peaks[0], peaks[1],
                        streams.stats.host_bytes_pinned / 2**30 if streams is not None else 0.0,
                        host_peak_rss_gib(), timed_peaks[0], timed_peaks[1]], dtype=torch.float64, device=mesh.device)
    snapshot_file = None
    if memory_snapshot:  # beyond train.steps, like the profiled step; not timed: recording slows the host
        snapshot_file = record_snapshot_step(trainer, memory_snapshot, mesh.rank)
    prof = None
    if profiled:  # beyond train.steps: the LR schedule stays at its end (lr_lambda clamps), as for any step
        if time_copies:
            streams.reset_stats()
            streams.timing = False
        prof = profile_all_ranks(trainer, cuda, mesh.rank, mesh.world_size, trace_dir)
    if mesh.distributed:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    trainer.engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    if not mesh.is_main:
        return None

    mid, split, why = median_step_split(recs, prof, cuda, copies)
    args = model_shape(cfg)
    tflops = mid["tflops_per_device"]
    return {
        "kind": "bench", "recipe": recipe, "overrides": list(overrides), "seq_len": trainer.stages[0].data.seq_len,
        "world_size": mesh.world_size, "dp": mesh.dp_size, "sp": mesh.sp_size,
        "sequences_per_step": trainer.per_rank * mesh.dp_size,
        "layers": args.num_hidden_layers, "model_layers": full_depth,
        "depth_truncated": args.num_hidden_layers < full_depth,
        "device": mesh.device.type, "device_name": torch.cuda.get_device_name(mesh.device) if cuda else "cpu",
        "precision": cfg.train.precision, "attention_kernel": cfg.train.attention_kernel,
        "engine": cfg.parallel.engine, "activation_policy": cfg.memory.activation.policy,
        "steps": steps, "warmup": warmup, "warmup_step_s": warmup_s,
        "step_time_s": mid["step_time_s"], "step_time_s_mean": statistics.fmean(r["step_time_s"] for r in recs),
        "tokens_per_s": mid["tokens_per_s"], "tflops_per_device": tflops,
        "peak_tflops": cfg.train.peak_tflops if cuda else None, "mfu": mid["mfu"] if cuda else None,
        "matmul_tflops": matmul, "matmul_n": matmul_n if cuda else None,
        "mfu_measured": tflops / matmul if matmul else None,
        "mfu_note": None if cuda else "CPU: no peak FLOP rate to compare with (datasheet or measured matmul)",
        "peak_mem_allocated_gib": mem[0].item() if cuda else None,
        "peak_mem_reserved_gib": mem[1].item() if cuda else None,
        # the timed steps only (peaks reset after the warm-up): what an allocator holds once it is warm
        "timed_mem_allocated_gib": mem[4].item() if cuda else None,
        "timed_mem_reserved_gib": mem[5].item() if cuda else None,
        "swap_host_gib": mem[2].item(), "host_peak_rss_gib": mem[3].item(),
        "time_split": split,
        "not_measured": [k for k in SPLIT_KEYS if k not in split],
        "not_measured_why": why,
        "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
        "git_sha": git_sha(), "torch_version": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cuda_allocator": allocator, "planner": planner, "planner_ranks": planner_ranks,
        "memory_snapshot": snapshot_file,
        "gpu_budget_gib": gpu_budget_gib or None,
    }


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _split_lines(r: dict) -> list[str]:
    """The profiled step's split, as lines of the table: its maxima over ranks, then each rank's when
    there are several (the maxima may come from different ranks)."""
    split, pad = r["time_split"], " " * 22
    if not split.get("profiled"):
        return []
    head = (f"{pad}profiled step {split['profiled_step']}: one more step after the timed ones, not in the median; "
            + (f"{1e3 * split['profiled_step_s']:.1f} ms under the profiler" if split["profiled_step_s"] is not None
               else "no step interval in its trace"))
    if "compute_s" not in split:
        return [head]

    def line(x: dict) -> str:
        pct = (lambda k: f"{1e3 * x[k]:.1f} ms ({100 * x[k] / x['profiled_step_s']:.0f}%)")
        return (f"compute {pct('compute_s')}, exposed comm {pct('exposed_comm_s')}, exposed copies "
                f"{pct('exposed_copy_s')}, idle {pct('idle_s')}; comm {1e3 * x['comm_s']:.1f} ms and copies "
                f"{1e3 * x['copy_s']:.1f} ms in all (hidden or not)")

    out = [head, f"{pad}" + ("max over ranks: " if len(split["per_rank"]) > 1 else "") + line(split)]
    if len(split["per_rank"]) > 1:
        out += [f"{pad}  rank {x['rank']}: " + line(x) for x in split["per_rank"]]
    return out


def print_record(r: dict) -> None:
    depth = (f"DEPTH-TRUNCATED: {r['layers']} of the model's {r['model_layers']} layers (same width)"
             if r["depth_truncated"] else f"{r['layers']} layers")
    mfu = (f"{100 * r['mfu']:.2f}% of {r['peak_tflops']:.0f} TFLOP/s (train.peak_tflops)" if r["mfu"] is not None
           else f"n/a ({r['mfu_note']})")
    mfu_m = (f"{100 * r['mfu_measured']:.2f}% of {r['matmul_tflops']:.0f} TFLOP/s (bf16 matmul "
             f"{r['matmul_n']}^3 measured here)" if r["mfu_measured"] is not None else f"n/a ({r['mfu_note']})")
    split = r["time_split"]
    plans = r.get("planner_ranks") or ([r["planner"]] if r.get("planner") else [])
    copies = (f"; swap copy streams busy {1e3 * split['swap_d2h_busy_s']:.1f} ms D2H, "
              f"{1e3 * split['swap_h2d_busy_s']:.1f} ms H2D (hidden or not)" if "swap_d2h_busy_s" in split else "")
    missing = (f"; not measured: {', '.join(r['not_measured'])} ({r['not_measured_why']})" if r["not_measured"]
               else "")
    print("\n".join([
        f"{r['recipe']}: seq_len {r['seq_len']}, {r['sequences_per_step']} sequence(s) per step, {depth}, "
        f"{r['world_size']} rank(s) (dp {r['dp']} x sp {r['sp']}) on {r['device_name']}, "
        f"{r['steps']} timed steps after {r['warmup']} warm-up",
        f"  step time           {r['step_time_s']:.4f} s (median; mean {r['step_time_s_mean']:.4f} s)",
        f"  tokens/s            {r['tokens_per_s']:,.0f} (all ranks)",
        f"  TFLOP/s per GPU     {r['tflops_per_device']:.4g}",
        f"  MFU                 {mfu}",
        f"  MFU (measured)      {mfu_m}",
        f"  peak GPU memory     allocated {_gib(r['peak_mem_allocated_gib'])}, "
        f"reserved {_gib(r['peak_mem_reserved_gib'])}"
        + (f"; timed steps only: allocated {_gib(r['timed_mem_allocated_gib'])}, "
           f"reserved {_gib(r['timed_mem_reserved_gib'])}" if r.get("timed_mem_reserved_gib") is not None else "")
        + (f" (a budget of {r['gpu_budget_gib']:g} GiB: a ballast holds the rest)" if r.get("gpu_budget_gib") else ""),
        f"  host memory         swap pool {_gib(r['swap_host_gib'])}, peak RSS {_gib(r['host_peak_rss_gib'])}",
        f"  time split          step {1e3 * split['step_s']:.1f} ms (median){copies}{missing}",
        *_split_lines(r),
        f"  loss                {r['loss_first']:.4f} -> {r['loss_last']:.4f}",
        *[f"  memory plan{'' if len(plans) == 1 else ' rank ' + str(p['rank']):<8} {p['state']}: {p['summary']}; "
          f"requests served from the plan {p['served']:,}, by the fallback {p['fallback']:,}, misses "
          f"{p['miss_size'] + p['miss_length'] + p['miss_stream']}, refused {p['refused_overlap']}, carved from the "
          f"region's gaps {p['carved']}, region given back {p['region_given_back']}, in managed memory before the "
          f"plan {p['overflowed']} (peak {_gib(p['overflow_peak'] / 2**30)})" for p in plans],
    ]), flush=True)


def read_json_list(path: str | Path) -> list:
    """The records already in a --json file ([] when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        old = None
    if not isinstance(old, list):
        raise UsageError(f"--json {path} exists and is not a JSON list of records: give a new file")
    return old


def append_json(path: str | Path, records: list[dict]) -> None:
    """Append to the JSON list in `path` (created if missing), written whole then renamed."""
    path = Path(path)
    old = read_json_list(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(old + records, indent=2) + "\n")
    tmp.replace(path)


# ---- the longest sequence that fits ----------------------------------------------------------
@dataclass
class Attempt:
    seq_len: int
    outcome: str  # ok | oom | failed
    record: dict | None = None  # the attempt's bench record, when ok
    detail: str = ""  # why it failed: the exit status and the output's last lines


def search_max_seq(attempt: Callable[[int], Attempt], start: int, step: int, cap: int | None = None,
                   on_attempt: Callable[[Attempt], None] = lambda a: None) -> tuple[int | None, list[Attempt]]:
    """The largest multiple of `step` (start a multiple of it) that is ok: double from `start` until an
    attempt runs out of memory (or `cap` is reached), then bisect between the last ok and the first OOM
    length. Returns (the largest ok length or None, the attempts); a failed attempt ends the search."""
    tried: list[Attempt] = []

    def run(s: int) -> str:
        a = attempt(s)
        tried.append(a)
        on_attempt(a)
        return a.outcome

    ok, oom, s = None, None, start
    while True:  # doubling
        s = min(s, cap) if cap else s
        outcome = run(s)
        if outcome == "failed":
            return ok, tried
        if outcome == "oom":
            oom = s
            break
        ok = s
        if cap and s >= cap:
            return ok, tried
        s *= 2
    if ok is None:
        return None, tried
    while oom - ok > step:  # bisection: both are multiples of step, so mid lies strictly between them
        mid = ok + (oom - ok) // 2 // step * step
        outcome = run(mid)
        if outcome == "failed":
            return ok, tried
        if outcome == "oom":
            oom = mid
        else:
            ok = mid
    return ok, tried


def classify(returncode: int, output: str) -> str:
    """An attempt's outcome from its exit status and output: OOM needs both a failure and the marker."""
    if returncode == 0:
        return "ok"
    return "oom" if OOM_MARKER in output else "failed"


def run_attempt(script: str, argv: list[str], nproc: int, seq: int, out: Path, timeout: int,
                check: Callable[[dict], str | None] = lambda rec: None) -> Attempt:
    """One --find-max-seq attempt of `script` in a fresh process (torchrun with nproc ranks when nproc > 1),
    its record read from `out`; `check(record)` may name a reason the record does not count. On the
    timeout the launcher is asked to stop (torchrun passes SIGTERM on to its ranks, which run in their
    own sessions and would outlive a plain kill), then killed."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    p = subprocess.Popen([*launcher, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env)
    try:
        text, _ = p.communicate(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        return Attempt(seq, "failed", detail=f"no result within --attempt-timeout {timeout} s (stopped)")
    outcome = classify(p.returncode, text)
    tail = "\n".join(text.strip().splitlines()[-6:])
    if outcome != "ok":
        how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit status {p.returncode}"
        return Attempt(seq, outcome, detail=f"{how}:\n{tail}")
    recs = json.loads(out.read_text()) if out.is_file() else []
    if not recs:
        return Attempt(seq, "failed", detail=f"exit status 0 but no record in {out}:\n{tail}")
    why = check(recs[-1])
    return Attempt(seq, "failed", detail=why) if why else Attempt(seq, "ok", record=recs[-1])


def profile_step_argv(ns) -> list[str]:
    """An attempt's profiled-step flag, when one was given (the attempts' traces are not kept: one directory
    would hold them all)."""
    return [] if ns.profile_step is None else ["--profile-step" if ns.profile_step else "--no-profile-step"]


def attempt_runner(script: str, argv_of, check: Callable[[dict, int], str | None] = lambda rec, seq: None):
    """`make_runner` for run_search: each attempt runs `script` with `argv_of(ns, seq, out)` in a fresh
    process and reads its record from `out`; `check(record, seq)` may name a reason it does not count.
    This benchmark's and the peers' (tools/peers/)."""
    def make(ns, nproc: int, workdir: Path) -> Callable[[int], Attempt]:
        def run(seq: int) -> Attempt:
            out = workdir / f"seq_{seq}.json"
            return run_attempt(script, argv_of(ns, seq, out), nproc, seq, out, ns.attempt_timeout,
                               lambda rec: check(rec, seq))

        return run

    return make


def attempt_argv(ns, seq: int, out: Path) -> list[str]:
    """This benchmark's flags for one attempt: the recipe and its overrides at `seq` tokens."""
    args = [ns.recipe, *ns.overrides, f"data.seq_len={seq}", "--steps", str(ns.steps), "--warmup", str(ns.warmup),
            "--matmul-n", str(ns.matmul_n), "--json", str(out)]
    args += ["--layers", str(ns.layers)] if ns.layers else []
    args += ["--gpu-budget-gib", str(ns.gpu_budget_gib)] if ns.gpu_budget_gib else []
    return args + profile_step_argv(ns)


def trained_seq_len(rec: dict, seq: int) -> str | None:
    if rec["seq_len"] != seq:
        return f"trained seq_len {rec['seq_len']}, not {seq}: the recipe's first stage sets its own data.seq_len"
    return None


child_runner = attempt_runner(str(Path(__file__).resolve()), attempt_argv, trained_seq_len)


def describe(a: Attempt) -> str:
    if a.outcome == "ok":
        r = a.record
        mem = (f"peak {r['peak_mem_allocated_gib']:.2f} GiB allocated" if r["peak_mem_allocated_gib"] is not None
               else f"peak RSS {r['host_peak_rss_gib']:.2f} GiB")
        return f"data.seq_len={a.seq_len}: ok, {r['tokens_per_s']:,.0f} tokens/s, {mem}"
    if a.outcome == "oom":
        return f"data.seq_len={a.seq_len}: out of memory"
    return f"data.seq_len={a.seq_len}: FAILED (not out of memory), " + a.detail.replace("\n", "\n    ")


def find_max_seq(ns) -> int:
    from longtrain.config import load_config

    if _rank() != 0:  # under torchrun: rank 0 searches, each attempt starting its own ranks
        return 0
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world != local:
        raise UsageError(f"--find-max-seq starts each attempt's {world} ranks on this node, but torchrun spans "
                         "several nodes: run the search on one node")
    if ns.seq_start <= 0 or ns.seq_step <= 0 or ns.seq_start % ns.seq_step:
        raise UsageError(f"--seq-start {ns.seq_start} must be a positive multiple of --seq-step {ns.seq_step}")
    if ns.seq_max and (ns.seq_max < ns.seq_start or ns.seq_max % ns.seq_step):
        raise UsageError(f"--seq-max {ns.seq_max} must be a multiple of --seq-step {ns.seq_step}, "
                         f">= --seq-start {ns.seq_start}")
    # typos in the recipe or overrides are refused here (ConfigError), not by every attempt
    cfg = load_config(ns.recipe, bench_overrides(ns.overrides, ns.steps, ns.warmup, ns.layers)
                      + [f"data.seq_len={ns.seq_start}"])
    nproc = ns.nproc or (world if "WORLD_SIZE" in os.environ else cfg.launch.nproc)
    best, attempts, failed = run_search(ns, child_runner, nproc, what="data.seq_len", who=ns.recipe,
                                        tmp_prefix="bench_train_")
    if ns.json:
        summary = {"kind": "find_max_seq", "recipe": ns.recipe, "overrides": ns.overrides, "layers": ns.layers,
                   "world_size": nproc, "seq_start": ns.seq_start, "seq_step": ns.seq_step, "seq_max": ns.seq_max,
                   "max_seq_len": best, "stopped_by_failure": failed,
                   "attempts": [{"seq_len": a.seq_len, "outcome": a.outcome, "detail": a.detail} for a in attempts]}
        append_json(ns.json, [a.record for a in attempts if a.record] + [summary])
    return 1 if failed else 0


def run_search(ns, make_runner, nproc: int, *, what: str, who: str, tmp_prefix: str):
    """--find-max-seq: print the plan, search with fresh processes (`make_runner(ns, nproc, tmp)`),
    print each attempt and the result; returns (longest that trains or None, attempts, stopped by failure)."""
    print(f"searching the longest {what} for {who} on {nproc} rank(s): from {ns.seq_start}, doubling, "
          f"then bisecting to {ns.seq_step}" + (f", at most {ns.seq_max}" if ns.seq_max else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
        best, attempts = search_max_seq(make_runner(ns, nproc, Path(tmp)), ns.seq_start, ns.seq_step, ns.seq_max,
                                        on_attempt=lambda a: print("  " + describe(a), flush=True))
    failed = attempts[-1].outcome == "failed"
    ooms = [a.seq_len for a in attempts if a.outcome == "oom"]
    if best is None:
        result = (f"no length could be tested: {what}={ns.seq_start} failed" if failed
                  else f"even {what}={ns.seq_start} runs out of memory")
    else:
        bound = (f"{min(x for x in ooms if x > best)} runs out of memory" if ooms
                 else f"the cap --seq-max {ns.seq_max} reached" if ns.seq_max and best >= ns.seq_max else "")
        result = f"longest {what} that trains {ns.steps} steps: {best}" + (f" ({bound})" if bound else "")
        if failed:
            result += f"; the search stopped at a failure at {attempts[-1].seq_len}, so longer ones may fit"
    print(result, flush=True)
    return best, attempts, failed


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Throughput, MFU and memory of K training steps of a recipe.")
    p.add_argument("recipe", help="YAML path or recipe name (as for `longtrain train`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=131072")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--layers", type=int, default=None,
                   help="train only N decoder layers of the same width (depth-truncated; default: all)")
    p.add_argument("--json", default=None, help="append the record(s) to this JSON list (default: none)")
    p.add_argument("--memory-snapshot", default=None, metavar="PATH",
                   help="after the timed steps, one more step with the CUDA caching allocator's history recorded, "
                        "its snapshot pickled to PATH for tools/plan_memory.py --snapshot (default: none)")
    p.add_argument("--gpu-budget-gib", type=float, default=0.0,
                   help="leave the run only this much GPU memory (a ballast allocation takes the rest of what is "
                        "free first): finds the longest sequence for a smaller memory, in shorter attempts "
                        "(default 0: all of it)")
    add_measure_args(p, seq_what="data.seq_len", seq_start=4096, seq_step=1024,
                     nproc_default="the recipe's launch.nproc")
    return p


def add_measure_args(p: argparse.ArgumentParser, *, seq_what: str, seq_start: int, seq_step: int,
                     nproc_default: str) -> None:
    """The options this benchmark shares with the peers' (tools/peers/): matmul basis, profiled step,
    longest-sequence search."""
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the measured bf16 matmul (default 8192)")
    p.add_argument("--profile-step", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one more step after the timed ones and split its time into compute, exposed "
                        "communication, exposed copies and idle (default: on CUDA yes, on CPU no: no GPU timeline)")
    p.add_argument("--trace-dir", default=None,
                   help="keep each rank's chrome trace of the profiled step here (default: not kept)")
    p.add_argument("--find-max-seq", action="store_true", help=f"search the longest {seq_what} that trains")
    p.add_argument("--seq-start", type=int, default=seq_start, help=f"first length tried (default {seq_start})")
    p.add_argument("--seq-step", type=int, default=seq_step, help=f"granularity of the bisection (default {seq_step})")
    p.add_argument("--seq-max", type=int, default=0, help="longest length tried (default 0: no limit)")
    p.add_argument("--nproc", type=int, default=0,
                   help=f"ranks per attempt of --find-max-seq (default 0: those of the torchrun that started "
                        f"this, else {nproc_default})")
    p.add_argument("--attempt-timeout", type=int, default=0,
                   help="seconds before an attempt counts as failed (default 0: no limit)")


def check_run_flags(ns) -> None:
    """The refusals this benchmark and the peers share (steps, depth, --trace-dir); --trace-dir turns the
    profiled step on."""
    if ns.steps < 1 or ns.warmup < 0 or (ns.layers is not None and ns.layers < 1):
        raise UsageError(f"need --steps >= 1 (got {ns.steps}), --warmup >= 0 (got {ns.warmup}) and --layers >= 1 "
                         f"(got {ns.layers})")
    if ns.trace_dir and (ns.profile_step is False or ns.find_max_seq):
        raise UsageError("--trace-dir keeps the trace of the profiled step: it needs a profiled step (not "
                         "--no-profile-step) and a single run (not --find-max-seq)")
    if ns.trace_dir:
        ns.profile_step = True


def check_flags(ns) -> None:
    if ns.gpu_budget_gib < 0:
        raise UsageError(f"--gpu-budget-gib {ns.gpu_budget_gib} must be >= 0 (GiB; 0: all of the GPU)")
    if ns.memory_snapshot and ns.find_max_seq:
        raise UsageError("--memory-snapshot records one run's step: not with --find-max-seq")
    check_run_flags(ns)
    if ns.json:  # refused now rather than after the runs
        read_json_list(ns.json)


def run_cli(ns, prog: str, check, find_max_seq, run, show) -> int:
    """A parsed command line of this benchmark or a peer: the flags checked, then the longest-length search
    or one run printed (and appended to --json); a user error exits 2 with one line, an out-of-memory
    error with --find-max-seq's marker."""
    import torch

    from longtrain.config import ConfigError

    try:
        check(ns)
        if ns.find_max_seq:
            return find_max_seq(ns)
        rec = run(ns)
        if rec is not None:
            show(rec)
            if ns.json:
                append_json(ns.json, [rec])
                print(f"record appended to {ns.json}", flush=True)
    except (ConfigError, UsageError) as e:
        if _rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (torch.OutOfMemoryError, RuntimeError) as e:
        exit_if_oom(e)
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    def run(ns):
        return run_bench(ns.recipe, ns.overrides, ns.steps, ns.warmup, ns.layers, ns.matmul_n, ns.profile_step,
                         ns.trace_dir, ns.gpu_budget_gib, ns.memory_snapshot)

    return run_cli(build_parser().parse_intermixed_args(argv), "bench_train", check_flags, find_max_seq, run,
                   print_record)


def exit_if_oom(e: BaseException) -> None:
    """An out-of-memory error (CUDA, or the CPU allocator's refusal) ends this process at once with the
    marker --find-max-seq reads (peers blocked in a collective are ended by torchrun); others return."""
    import torch

    text = str(e)
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
        return
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                        for f in reversed(traceback.extract_tb(e.__traceback__)[-6:]))
    print(f"{OOM_MARKER} rank {_rank()}: out of memory: {text.strip().splitlines()[0][:300]}",
          f"(in {where})" if where else "", file=sys.stderr, flush=True)
    from longtrain.memory.planner.runtime import active_core

    core = active_core()
    if core is not None:  # the planned allocator: where its memory was when the request failed
        print(f"rank {_rank()}: memory plan at the failure: {core.holdings()}", file=sys.stderr, flush=True)
    if torch.cuda.is_available():  # the driver's count: what torch's figures leave out (context, NCCL, others)
        free, total = torch.cuda.mem_get_info()
        print(f"rank {_rank()}: the device at the failure: {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB "
              f"(torch reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB of it, the ballast included)",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_OOM)


if __name__ == "__main__":
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where each thread is, run on
    code = main()
    # the benchmarks run under time limits: a process that has not exited a minute after its work is
    # done prints where each of its Python threads is (interpreter shutdown included), then goes on
    faulthandler.dump_traceback_later(60, exit=False)
    sys.exit(code)
