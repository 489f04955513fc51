"""Activation memory policies side by side on one GPU: keep, full recompute, and token-wise swapping
(the cost model's alpha and a sweep), on a stack of Llama-3-8B-shaped decoder layers at long sequence.

    python3 tools/bench_memory.py --seq 131072 --layers 3 --json $OUT/memory.json --find-max

Per variant: step time (forward + backward of the stack, median of --iters after a warm-up), peak GPU
memory, bytes copied each way, and the overlap achieved: 1 - exposed copy time / total copy time,
where the exposed time is the step time minus that of the same variant with its copies switched off
(same row split and recomputation, tensors left on the GPU) and the total is the sum of the copies'
own durations (CUDA events on the copy streams). The swapped layers are all but the last
(--keep-last). --find-max then grows the sequence until out of memory for recompute and for swap
(the cost model's alpha, every layer swapped), one attempt per length in this process.
`--device cpu` runs a tiny smoke version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from longtrain.memory.checkpointing import apply_activation_checkpointing
from longtrain.memory.swap import apply_activation_swap
from longtrain.memory.swap_plan import link_alpha, measure_copy_gbps, measure_layer_bytes
from longtrain.models import model_args
from longtrain.models.llama import DecoderLayer, rope_cos_sin, rope_inv_freq


class Stack(nn.Module):
    """The decoder layers of a model, without embedding and head (what activation policies act on)."""

    def __init__(self, args, n_layers: int, kernel: str):
        super().__init__()
        self.args = args
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DecoderLayer(args, kernel) for _ in range(n_layers))
        self.model.norm = nn.Identity()

    def forward(self, x, cos, sin):
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)


def build(args, n_layers, kernel, device, dtype, policy, alpha=None, keep_last=1, copies=True):
    with torch.device("meta"):
        stack = Stack(args, n_layers, kernel).to(dtype)
    stack.to_empty(device=device)
    for p in stack.parameters():
        nn.init.normal_(p, std=0.02)
    streams = None
    if policy == "recompute":
        apply_activation_checkpointing(stack)
    elif policy == "swap":
        streams = apply_activation_swap(stack, {i: alpha for i in range(n_layers - keep_last)}, device)
        streams.copies = copies
        streams.timing = copies
    return stack, streams


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(stack, streams, args, s, device, dtype, iters):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, s, args.hidden_size, device=device, dtype=dtype, generator=g, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), torch.arange(s, device=device)[None], dtype)
    times = []
    for i in range(iters + 1):
        if streams is not None:
            streams.reset_stats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        stack(x, cos, sin).float().square().mean().backward()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        stack.zero_grad(set_to_none=True)
        x.grad = None
    res = {"step_s": statistics.median(times),
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
    if streams is not None:
        st = streams.stats
        res.update(d2h_gib=st.d2h_bytes / 2**30, h2d_gib=st.h2d_bytes / 2**30,
                   pinned_gib=st.host_bytes_pinned / 2**30)
        if device.type == "cuda" and streams.timing:
            d2h_s, h2d_s = streams.copy_time_s()
            res.update(copy_s=d2h_s + h2d_s)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=131072, help="tokens per GPU")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--keep-last", type=int, default=1)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--kernel", default="cudnn")
    ap.add_argument("--find-max", action="store_true")
    ap.add_argument("--max-seqs", type=int, nargs="*", default=[262144, 393216, 524288, 655360, 786432])
    ap.add_argument("--max-layers", type=int, default=8, help="layers of the stack for --find-max")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = model_args(a.preset)
    if device.type == "cpu":  # smoke: tiny widths
        args = model_args("debug")
        a.kernel = "math"
    lb = measure_layer_bytes(args, dtype, a.seq)
    gbps = measure_copy_gbps(device)
    probe, _ = build(args, 1, a.kernel, device, dtype, "none")
    cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), torch.arange(a.seq, device=device)[None], dtype)
    x = torch.randn(1, a.seq, args.hidden_size, device=device, dtype=dtype)
    with torch.no_grad():
        probe(x, cos, sin)
        sync(device)
        t0 = time.perf_counter()
        probe(x, cos, sin)
        sync(device)
    fwd_ms = (time.perf_counter() - t0) * 1e3
    del probe, x
    alpha_m = link_alpha(lb, gbps, fwd_ms)
    print(f"{a.preset} widths, {a.layers} layers, {a.seq} tokens: S_input {lb.input / 2**30:.2f} GiB, S_attn "
          f"{lb.attention / 2**30:.2f} GiB, S_other {lb.other / 2**30:.2f} GiB per layer; D2H {gbps:.1f} GB/s; "
          f"layer forward {fwd_ms:.0f} ms; cost model alpha {alpha_m:.3f}", flush=True)
    variants = [("keep", "none", None), ("recompute", "recompute", None), (f"swap(model {alpha_m:.2f})", "swap", alpha_m)]
    variants += [(f"swap({al:g})", "swap", al) for al in a.alphas]
    rows = []
    for name, policy, alpha in variants:
        res = {"variant": name, "policy": policy, "alpha": alpha}
        try:
            stack, streams = build(args, a.layers, a.kernel, device, dtype, policy, alpha, a.keep_last)
            res.update(run_steps(stack, streams, args, a.seq, device, dtype, a.iters))
            del stack, streams
            if policy == "swap":  # the same compute with the copies off: what the copies cost on top
                stack, streams = build(args, a.layers, a.kernel, device, dtype, policy, alpha, a.keep_last, copies=False)
                res["step_s_nocopy"] = run_steps(stack, streams, args, a.seq, device, dtype, a.iters)["step_s"]
                del stack, streams
                if res.get("copy_s"):
                    exposed = max(0.0, res["step_s"] - res["step_s_nocopy"])
                    res["overlap"] = max(0.0, 1.0 - exposed / res["copy_s"])
        except torch.cuda.OutOfMemoryError as e:
            res["error"] = f"OOM: {str(e)[:120]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(res)
        print(json.dumps(res), flush=True)
    base = next((r for r in rows if r["variant"] == "keep" and "step_s" in r), None)
    print("\n| variant | step s | vs keep | peak GiB | D2H GiB | H2D GiB | copy s | overlap |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" not in r:
            print(f"| {r['variant']} | {r.get('error', '')} | | | | | | |")
            continue
        rel = f"{r['step_s'] / base['step_s']:.3f}" if base else ""
        print(f"| {r['variant']} | {r['step_s']:.3f} | {rel} | {r['peak_gib']:.1f} | {r.get('d2h_gib', 0):.1f} | "
              f"{r.get('h2d_gib', 0):.1f} | {r.get('copy_s', 0):.2f} | "
              f"{'' if 'overlap' not in r else format(r['overlap'], '.2f')} |")
    maxlen = {}
    if a.find_max:
        for policy in ("recompute", "swap"):
            best = None
            for s in a.max_seqs:
                alpha = link_alpha(measure_layer_bytes(args, dtype, s), gbps, fwd_ms * (s / a.seq) ** 2)
                try:
                    stack, streams = build(args, a.max_layers, a.kernel, device, dtype, policy, alpha, keep_last=0)
                    r = run_steps(stack, streams, args, s, device, dtype, 1)
                    best = s
                    print(f"max-len {policy} {s}: ok, peak {r['peak_gib']:.1f} GiB", flush=True)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # GPU OOM, or pinned host memory
                    print(f"max-len {policy} {s}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    break
                finally:
                    stack = streams = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            maxlen[policy] = best
        print(f"longest sequence, {a.max_layers} layers: {maxlen}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "max_len": maxlen, "alpha_model": alpha_m, "gbps": gbps, "layer_fwd_ms": fwd_ms,
                       "layer_bytes": vars(lb), "args": vars(a), "torch": torch.__version__}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
