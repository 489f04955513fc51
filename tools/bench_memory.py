"""Activation memory policies side by side on one GPU: keep, full recompute, and token-wise swapping
(the cost model's alpha and a sweep), on a stack of Llama-3-8B-shaped decoder layers at long sequence.

    python3 tools/bench_memory.py --seq 131072 --layers 3 --json $OUT/memory.json --find-max

Per variant: step time (forward + backward of the stack, median of --iters after a warm-up), peak GPU
memory, bytes copied each way, and the overlap achieved: 1 - exposed copy time / total copy time,
where the exposed time is the step time minus that of the same variant with its copies switched off
(same row split and recomputation, tensors left on the GPU) and the total is the sum of the copies'
own durations (CUDA events on the copy streams). The swapped layers are all but the last
(--keep-last); --chunk adds swap variants whose recomputed tokens run in chunks. --find-max then
measures the longest sequence per GPU for full recompute and for swap (alpha 0, recompute in chunks,
as many layers as this machine's host budget holds): see `find_max`.
`--device cpu` runs a tiny smoke version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from longtrain.memory.checkpointing import apply_activation_checkpointing, apply_tiled_mlp
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


def build(args, n_layers, kernel, device, dtype, policy, alpha=None, keep_last=1, copies=True, chunk=0, plan=None,
          mlp_chunk=0):
    with torch.device("meta"):
        stack = Stack(args, n_layers, kernel).to(dtype)
    stack.to_empty(device=device)
    for p in stack.parameters():
        nn.init.normal_(p, std=0.02)
    streams = None
    if mlp_chunk and policy in ("none", "recompute"):
        apply_tiled_mlp(stack, mlp_chunk)
    if policy == "recompute":
        apply_activation_checkpointing(stack)
    elif policy == "swap":
        streams = apply_activation_swap(stack, {i: alpha for i in range(n_layers - keep_last)}, device, chunk)
        streams.copies = copies
        streams.timing = copies
    elif policy == "plan":  # a SwapPlan's per-layer decisions (--find-max)
        if plan.recompute_layers():
            apply_activation_checkpointing(stack, plan.recompute_layers())
        streams = apply_activation_swap(stack, plan.swap_alphas(), device, chunk)
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
        out = stack(x, cos, sin)
        out.backward(torch.full_like(out, 1e-4))  # dL/dh as a tiled loss hands it over: one bf16 tensor
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
    ap.add_argument("--chunk", type=int, default=0, help="swap: recompute the (1 - alpha) tokens in chunks of this many")
    ap.add_argument("--no-variants", action="store_true", help="skip the side-by-side table (with --find-max)")
    ap.add_argument("--skip-sweep", action="store_true", help="only keep, recompute and the cost model's swap")
    ap.add_argument("--max-layers", type=int, default=3, help="layers of the stack for --find-max")
    ap.add_argument("--max-step", type=int, default=65536, help="--find-max: granularity of the attempts (tokens)")
    ap.add_argument("--max-attempts", type=int, default=3, help="--find-max: attempts per policy after the fit")
    ap.add_argument("--max-start", type=int, default=0, help="--find-max: first attempt (0: the prediction)")
    ap.add_argument("--max-chunk", type=int, default=16384,
                    help="--find-max: swap's recompute chunk, and recompute-tiled's MLP tile (tokens)")
    ap.add_argument("--max-policies", nargs="*", default=["recompute", "swap"],
                    choices=["recompute", "recompute-tiled", "swap"])
    ap.add_argument("--mlp-chunk", type=int, default=0, help="add keep and recompute variants with a tiled MLP")
    ap.add_argument("--host-budget-gib", type=float, default=0.0, help="--find-max: host budget (0: 80%% available)")
    ap.add_argument("--allocator", default="expandable", choices=["expandable", "default"],
                    help="CUDA allocator mode, as memory.allocator (a PYTORCH_CUDA_ALLOC_CONF in the environment wins)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from longtrain.memory.arena import set_cuda_allocator_mode

    allocator = set_cuda_allocator_mode(a.allocator)  # as the trainer does, before CUDA starts
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
    variants = [("keep", "none", None, 0, 0), ("recompute", "recompute", None, 0, 0),
                (f"swap(model {alpha_m:.2f})", "swap", alpha_m, 0, 0)]
    if a.mlp_chunk:
        variants += [(f"keep, tiled MLP {a.mlp_chunk}", "none", None, 0, a.mlp_chunk),
                     (f"recompute, tiled MLP {a.mlp_chunk}", "recompute", None, 0, a.mlp_chunk)]
    if not a.skip_sweep:
        variants += [(f"swap({al:g})", "swap", al, 0, 0) for al in a.alphas]
    if a.chunk:
        variants += [(f"swap(model {alpha_m:.2f}), chunks {a.chunk}", "swap", alpha_m, a.chunk, 0),
                     (f"swap(0), chunks {a.chunk}", "swap", 0.0, a.chunk, 0)]
    rows = []
    for name, policy, alpha, chunk, mlp_chunk in ([] if a.no_variants else variants):
        res = {"variant": name, "policy": policy, "alpha": alpha, "chunk": chunk, "mlp_chunk": mlp_chunk}
        try:
            stack, streams = build(args, a.layers, a.kernel, device, dtype, policy, alpha, a.keep_last, chunk=chunk,
                                   mlp_chunk=mlp_chunk)
            res.update(run_steps(stack, streams, args, a.seq, device, dtype, a.iters))
            del stack, streams
            if policy == "swap":  # the same compute with the copies off: what the copies cost on top
                stack, streams = build(args, a.layers, a.kernel, device, dtype, policy, alpha, a.keep_last,
                                       copies=False, chunk=chunk)
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
    result = {"rows": rows, "cuda_allocator": allocator, "alpha_model": alpha_m, "gbps": gbps, "layer_fwd_ms": fwd_ms, "layer_bytes": vars(lb),
              "args": vars(a), "torch": torch.__version__}
    if a.find_max:
        result["max_len"] = find_max(a, args, device, dtype, gbps, fwd_ms, lambda: dump(a.json, result))
    dump(a.json, result)


def dump(path, result) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=str)


def peak_attempt(args, a, device, dtype, s, policy, plan=None, partial=True, mlp_chunk=0) -> dict:
    """Forward of the --max-layers stack at s tokens, then backward of its top layer only (partial) or
    of the whole stack. Every parameter gradient is allocated first (the steady state of training),
    so the peak is reached in the top layer's backward: the layers below hold the most then, and
    the swapped layer below is being prefetched. The run checks this at --seq (partial vs full)."""
    chunk = a.chunk or a.max_chunk
    stack, streams = build(args, a.max_layers, a.kernel, device, dtype, policy, keep_last=0, chunk=chunk, plan=plan,
                           mlp_chunk=mlp_chunk)
    try:
        for p in stack.parameters():
            p.grad = torch.zeros_like(p)
        x = torch.randn(1, s, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
        cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), torch.arange(s, device=device)[None], dtype)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        layers = stack.model.layers
        h = top_in = x
        for layer in layers:
            top_in = h
            h = layer(h, cos, sin)
        grad = torch.full_like(h, 1e-4)
        inputs = [top_in, *layers[-1].parameters()] if partial else None
        torch.autograd.backward(h, grad, inputs=inputs)
        sync(device)
        out = {"s": s, "policy": policy, "partial": partial, "ok": True, "seconds": time.perf_counter() - t0}
        if device.type == "cuda":
            out.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                       reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
        if streams is not None:
            out["pinned_gib"] = streams.stats.host_bytes_pinned / 2**30
        return out
    finally:  # drop every device tensor of the attempt before returning the cached memory
        stack = streams = x = h = top_in = grad = layers = cos = sin = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()


def find_max(a, args, device, dtype, gbps, fwd_ms, save) -> dict:
    """Longest sequence per GPU for full recompute and for swap (alpha 0, per-token recompute in chunks,
    the host budget of this machine: the layers it cannot hold are recomputed). The peak is affine in
    the sequence length for a fixed plan, so a fit at --seq / 2 and --seq predicts the limit; attempts
    then step by --max-step from the prediction (up while they fit, down while they do not)."""
    from types import SimpleNamespace

    from longtrain.memory.swap_plan import decide, host_budget

    act = SimpleNamespace(policy="auto", alpha="0", keep_last_layers=0, layers=[], host_budget_gib=a.host_budget_gib)
    budget, budget_src = host_budget(act, 1)

    def plan_at(s):
        return decide(a.max_layers, act, measure_layer_bytes(args, dtype, s), gbps, fwd_ms * (s / a.seq) ** 2,
                      budget, {"bytes": "", "pcie": "", "fwd": "", "host": budget_src})

    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else 2**40
    out = {"layers": a.max_layers, "chunk": a.chunk or a.max_chunk, "host_budget_gib": budget / 2**30,
           "host_budget_source": budget_src, "gpu_total_gib": total / 2**30, "check": [], "attempts": [], "max": {}}
    for name in a.max_policies:
        policy = "plan" if name == "swap" else "recompute"
        mlp_chunk = a.max_chunk if name == "recompute-tiled" else 0
        peaks = {}
        for s, partial in ((a.seq // 2, True), (a.seq, True), (a.seq, False)):
            r = peak_attempt(args, a, device, dtype, s, policy, plan_at(s) if policy == "plan" else None, partial,
                             mlp_chunk)
            r["policy"] = name
            out["check"].append(r)
            peaks[(s, partial)] = r.get("peak_gib", 0.0)
            print(f"find-max check {name} {s} {'top-layer' if partial else 'full'} backward: "
                  f"peak {r.get('peak_gib', 0):.2f} GiB", flush=True)
        gap = peaks[(a.seq, False)] - peaks[(a.seq, True)]
        out.setdefault("full_minus_top_layer_gib", {})[name] = gap
        if gap > 0.01 * peaks[(a.seq, False)]:
            print(f"find-max {name}: note: the full backward's peak is {gap:.2f} GiB above the top layer's at "
                  f"{a.seq} tokens; the attempts below measure the top layer's, so their limit is that much "
                  "optimistic", flush=True)
        slope = (peaks[(a.seq, True)] - peaks[(a.seq // 2, True)]) / (a.seq / 2)
        fixed = peaks[(a.seq, True)] - slope * a.seq
        pred = int((0.98 * total / 2**30 - fixed) / max(slope, 1e-12))
        if policy == "plan":  # beyond this the host budget cannot hold every layer at alpha 0
            per_token = plan_at(a.seq).layer_bytes.at(0.0) / a.seq
            out["host_bound_tokens"] = int(budget / (a.max_layers * per_token))
            out["gpu_bound_predicted"] = pred  # with host memory to spare
            pred = min(pred, out["host_bound_tokens"])
        if device.type != "cuda":  # smoke run: no memory statistics to fit
            pred = 2 * a.seq
        out.setdefault("predicted", {})[name] = pred
        print(f"find-max {name}: peak = {fixed:.2f} GiB + {slope * 2**17:.2f} GiB per 128K tokens -> "
              f"predicted limit {pred} tokens", flush=True)
        s = a.max_start or max(a.max_step, pred // a.max_step * a.max_step)
        best, worst = None, None
        for _ in range(a.max_attempts):
            plan = plan_at(s) if policy == "plan" else None
            try:
                r = peak_attempt(args, a, device, dtype, s, policy, plan, mlp_chunk=mlp_chunk)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not any(m in str(e) for m in ("out of memory", "pinning", "can't allocate")):
                    raise  # not a memory limit: a bug to see, not a data point
                r = {"s": s, "ok": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            r["policy"] = name
            if plan is not None:
                r["swapped_layers"] = len(plan.swap_alphas())
                r["recomputed_layers"] = len(plan.recompute_layers())
            out["attempts"].append(r)
            print(f"find-max {name} {s}: {'ok' if r['ok'] else r['error'][:100]}"
                  + (f", peak {r.get('peak_gib', 0):.1f} GiB, {r['seconds']:.0f} s" if r["ok"] else ""), flush=True)
            save()
            if not r["ok"] and "pinning" in r["error"]:
                # host memory, not the GPU: CUDA keeps the failed registration as its last error, which
                # could surface in the next attempt of this process; the search of this policy ends here
                worst = s
                break
            if r["ok"]:
                best = s if best is None else max(best, s)
            else:
                worst = s if worst is None else min(worst, s)
            if best is not None and worst is not None and worst - best <= a.max_step:
                break
            if r["ok"] and policy == "plan" and s + a.max_step > out["host_bound_tokens"]:
                break  # longer: the host budget holds fewer layers, the rest are recomputed (the recompute limit)
            s = s + a.max_step if r["ok"] else s - a.max_step
            if s <= 0:
                break
        out["max"][name] = {"longest_ok": best, "shortest_oom": worst}
        if policy == "plan":
            out["max"][name]["bound"] = "host budget" if worst is None else "GPU memory"
        print(f"find-max {name}: longest that trains {best}, shortest out of memory {worst}", flush=True)
    return out


if __name__ == "__main__":
    main()
