"""Sequence-parallel attention benchmark: longtrain's methods x kernels side by side with PyTorch's
native context parallel and with the single-GPU kernel at the same per-GPU work, in one run.

    torchrun --nproc-per-node 4 tools/bench_attention.py --seqs 131072 262144 --json $OUT/attn4.json

Causal, bf16, head_dim 128, batch 1; head configs 32/8 (GQA) and 32/32 (MHA). TFLOP/s per GPU count
the causal attention FLOPs of the whole sequence (fwd 2 * 2 * S^2 * H * D / 2, fwd+bwd 3.5x fwd: the
backward's five matmuls against the forward's two) divided by the number of GPUs. The single-GPU
reference runs the same kernel at S_global / sqrt(N) tokens: the same causal FLOPs per GPU.
Prints a table on rank 0 and writes JSON. `--device cpu` runs a tiny smoke version on gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from longtrain.attention import block_attention
from longtrain.parallel.sp_attention import METHODS, sp_attention


def attn_flops(s: int, h: int, d: int, bwd: bool) -> float:
    fwd = 4.0 * s * s * h * d / 2  # causal: half the score matrix
    return fwd * (3.5 if bwd else 1.0)


def timeit(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up (cuda events on GPU; a barrier aligns the ranks)."""
    fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return t.item()


def make_inputs(s_local: int, h: int, hkv: int, d: int, dtype, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda heads: torch.randn(1, s_local, heads, d, generator=g, device=device, dtype=dtype)  # noqa: E731
    return mk(h).requires_grad_(), mk(hkv).requires_grad_(), mk(hkv).requires_grad_(), mk(h)


def bench_sp(method, kernel, s, h, hkv, d, args, device):
    n = dist.get_world_size()
    q, k, v, dout = make_inputs(s // n, h, hkv, d, args.dtype, device, seed=s + h + hkv)
    fwd = lambda: sp_attention(q, k, v, group=None, method=method, causal=True, layout="zigzag", kernel=kernel)  # noqa: E731

    def fwdbwd():
        out = fwd()
        torch.autograd.backward(out, dout)

    with torch.no_grad():
        t_f = timeit(fwd, args.iters, device)
    t_fb = timeit(fwdbwd, args.iters, device)
    return t_f, t_fb


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: how long the GPU ran at least one such kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_sp(method, kernel, s, h, hkv, d, args, device) -> dict:
    """Where one fwd+bwd's time goes on this rank (torch.profiler, CUDA kernels): wall time, time inside
    attention kernels, other compute kernels (merges, accumulations, copies), NCCL kernels, and the
    compute-idle time (wall minus the union of compute kernels: exposed communication, waits and launch
    gaps)."""
    from torch.profiler import ProfilerActivity, profile

    n = dist.get_world_size()
    q, k, v, dout = make_inputs(s // n, h, hkv, d, args.dtype, device, seed=s + h + hkv)

    def fwdbwd():
        out = sp_attention(q, k, v, group=None, method=method, causal=True, layout="zigzag", kernel=kernel)
        torch.autograd.backward(out, dout)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fwdbwd()
    dist.barrier()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fwdbwd()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = {"attention": [], "other": [], "nccl": []}
    for e in kernels:
        name = e.name.lower()
        cat = "nccl" if "nccl" in name else ("attention" if any(w in name for w in ("sdpa", "flash", "fmha", "attn"))
                                               else "other")
        spans[cat].append((e.time_range.start, e.time_range.end))
    busy = _union_us(spans["attention"] + spans["other"])
    return {"method": method, "kernel": kernel, "gpus": n, "s_global": s, "heads": h, "kv_heads": hkv,
            "wall_ms": wall_us / 1e3, "attention_ms": sum(b - a for a, b in spans["attention"]) / 1e3,
            "other_compute_ms": sum(b - a for a, b in spans["other"]) / 1e3,
            "nccl_ms": sum(b - a for a, b in spans["nccl"]) / 1e3, "compute_idle_ms": (wall_us - busy) / 1e3,
            "attention_kernel_calls": len(spans["attention"])}


def bench_native_cp(backend, s, h, hkv, d, args, device):
    """torch.distributed.tensor.experimental.context_parallel with SDPA on one backend. K/V are
    expanded to the query heads where SDPA's GQA path is not supported by the CP dispatcher."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = dist.get_world_size()
    mesh = init_device_mesh(device.type, (n,), mesh_dim_names=("cp",))
    g = torch.Generator(device=device).manual_seed(s)
    q = torch.randn(1, h, s, d, generator=g, device=device, dtype=args.dtype)
    k = torch.randn(1, h, s, d, generator=g, device=device, dtype=args.dtype)
    v = torch.randn(1, h, s, d, generator=g, device=device, dtype=args.dtype)
    dout = torch.randn(1, h, s, d, generator=g, device=device, dtype=args.dtype)
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]), sdpa_kernel([be]):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        fwd = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)  # noqa: E731

        def fwdbwd():
            torch.autograd.backward(fwd(), dout)

        with torch.no_grad():
            t_f = timeit(fwd, args.iters, device)
        t_fb = timeit(fwdbwd, args.iters, device)
    return t_f, t_fb


def bench_single(kernel, s, h, hkv, d, args, device):
    q, k, v, dout = make_inputs(s, h, hkv, d, args.dtype, device, seed=7)
    tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v))
    fwd = lambda: block_attention(tq, tk, tv, causal=True, kernel=kernel)  # noqa: E731

    def fwdbwd():
        torch.autograd.backward(fwd(), dout.transpose(1, 2))

    with torch.no_grad():
        t_f = timeit(fwd, args.iters, device)
    t_fb = timeit(fwdbwd, args.iters, device)
    return t_f, t_fb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[131072, 262144])
    ap.add_argument("--heads", type=str, nargs="+", default=["32/8", "32/32"], help="query/kv heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS))
    ap.add_argument("--kernels", nargs="+", default=["cudnn", "flash"])
    ap.add_argument("--native", nargs="*", default=["cudnn", "flash"], help="native context-parallel backends")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", nargs="*", default=[], metavar="METHOD",
                    help="also profile one fwd+bwd of these methods (first kernel) per length and head config")
    args = ap.parse_args()
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **({"device_id": device} if device.type == "cuda" else {}))
    n, rank = dist.get_world_size(), dist.get_rank()
    rows, profiles = [], []

    def record(impl, kernel, s, h, hkv, times, work_s=None):
        t_f, t_fb = times
        work = attn_flops(work_s or s, h, args.head_dim, False), attn_flops(work_s or s, h, args.head_dim, True)
        per = 1 if work_s else n
        row = dict(impl=impl, kernel=kernel, gpus=n, s_global=s, heads=h, kv_heads=hkv, fwd_s=t_f, fwdbwd_s=t_fb,
                   fwd_tflops_per_gpu=work[0] / per / t_f / 1e12, fwdbwd_tflops_per_gpu=work[1] / per / t_fb / 1e12)
        rows.append(row)
        if rank == 0:
            print(f"{impl:<22}{kernel:<7}{n:>3} {s:>8} {h:>3}/{hkv:<3} fwd {row['fwd_tflops_per_gpu']:7.1f}  "
                  f"fwd+bwd {row['fwdbwd_tflops_per_gpu']:7.1f} TFLOP/s/GPU", flush=True)

    for s in args.seqs:
        for hs in args.heads:
            h, hkv = map(int, hs.split("/"))
            for kernel in args.kernels:
                s1 = int(round(s / math.sqrt(n) / 256)) * 256
                record("single-gpu(same work)", kernel, s1, h, hkv, bench_single(kernel, s1, h, hkv, args.head_dim,
                                                                                  args, device), work_s=s1)
                for m in args.methods:
                    try:
                        record(m, kernel, s, h, hkv, bench_sp(m, kernel, s, h, hkv, args.head_dim, args, device))
                    except ValueError as e:  # e.g. ulysses with heads not divisible
                        if rank == 0:
                            print(f"{m:<22}{kernel:<7} skipped: {e}", flush=True)
                    torch.cuda.empty_cache() if device.type == "cuda" else None
            for m in args.profile:
                prof = profile_sp(m, args.kernels[0], s, h, hkv, args.head_dim, args, device)
                profiles.append(prof)
                if rank == 0:
                    print("profile " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in prof.items()), flush=True)
            for be in args.native:
                try:
                    record("torch-native-cp", be, s, h, hkv, bench_native_cp(be, s, h, hkv, args.head_dim, args,
                                                                               device))
                except Exception as e:  # report, keep measuring the rest
                    if rank == 0:
                        print(f"torch-native-cp {be} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if rank == 0:
        print("\n| impl | kernel | GPUs | S_global | heads | fwd TFLOP/s/GPU | fwd+bwd TFLOP/s/GPU |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['impl']} | {r['kernel']} | {r['gpus']} | {r['s_global']} | {r['heads']}/{r['kv_heads']} | "
                  f"{r['fwd_tflops_per_gpu']:.1f} | {r['fwdbwd_tflops_per_gpu']:.1f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "profiles": profiles, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}},
                          f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
