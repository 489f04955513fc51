"""The planned allocator on CUDA against the normal one: same losses and gradients, plans served.

    python3 tools/planner_gpu_check.py --json $OUT/planner_check.json [--fallback caching|pool]

Runs itself twice in fresh processes (the allocator is chosen before CUDA starts): once with torch's
caching allocator, once with the planned allocator (check mode). Each trains a debug-width Llama
(float32, math kernel) whose layers mix the activation policies that use side streams and
recomputation: layer 0 recomputes, layers 1-2 swap (alpha 0.5, chunked recompute), the last keeps; the
MLP output projections of layers 0 and 3 gather their weight on a side stream as ZeRO-3 does.
Each step is an iteration, as in the trainer (the zero_grad and the optimizer step within it). Steps 0-1 warm
up and record; step 1, the recorded one, runs on a device 32 MiB short of its peak (a ballast made before it
and freed after it, outside every window), so its requests the device cannot hold overflow into managed
memory (`memory.planner.warmup_overflow_gib`), and the plan made from it must serve the later steps from the
device with nothing overflowing; steps 2-4 replay; step 5 runs at another sequence length (the plan misses
and falls back); step 6 is back at the first length (the plan serves again). Between steps 3 and 4 the
device is filled but for half the region and a tensor of three quarters of it is made: only the idle region
can serve it, so it goes back to the device, and step 4 must take it again and replay its plan. In step 7,
inside layer 3's forward (planned tensors live), the device is filled and a tensor is asked for (a sixteenth
of the region, or more than the fallback's cached holes where those are larger): a miss nothing but a gap
of the region can serve, so it is carved from there (`carved`), and the step must still give the normal
run's numbers.
The planned run must give the losses and gradients of the normal run (1e-6 relative), serve requests from
the plan, refuse none, count misses only in steps 5 and 7, overflow only in step 1, and plan the side stream's
requests (the gathers and, where it makes them there, the swap's prefetch buffers:
`memory.planner.side_streams`).
`--fallback` picks what serves the requests the plan does not (`memory.planner.fallback`): CUDA's
cudaMallocAsync pool or torch's caching allocator. `--reuse-after` plans a tensor another stream still
reads up to its free (default), the end of the next layer pass (`next_pass`) or where the recording saw
that stream done with it (`release`): `memory.planner.reuse_after`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from longtrain.config.schema import PLANNER_FALLBACKS, PLANNER_REUSE_AFTER

SEQ, OTHER_SEQ, STEPS = 2048, 1536, 8
CARVE_STEP = 7  # a miss on a full device while planned tensors are live: carved from the region
OVERFLOW_STEP = 1  # the recorded step on a full device: what it cannot hold overflows into managed memory
MIB2 = 2 << 20


def settle() -> None:
    """Every stream done, and the fallback's cache back to the device (what it keeps is its holes)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def fallback_holes(st: dict) -> int:
    """What the fallback reserves beyond its live bytes after `settle`: holes in its partly used segments."""
    return st["reserved"] - st["region"] - (st["allocated"] - st["planned_live"])


def ballast(dev, leave: int):
    """A tensor that takes the device's free memory but `leave` bytes (in 2 MiB steps)."""
    import torch

    return torch.empty((torch.cuda.mem_get_info(dev)[0] - leave) // MIB2 * MIB2, dtype=torch.uint8, device=dev)


def gather_on_side_stream(linear, stream) -> None:
    """ZeRO-3's pattern on one linear layer: its weight is copied into a buffer made on a side stream (a
    parameter gather) in forward, and again in backward; the main stream waits for the copy and marks the
    buffer as used by it (`record_stream`), so the buffer's memory comes and goes on the side stream."""
    import torch
    import torch.nn.functional as F

    def gather(weight):
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            w = torch.empty_like(weight)
            w.copy_(weight)
        main.wait_stream(stream)
        w.record_stream(main)
        return w

    class Gathered(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return F.linear(x, gather(weight))

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            gx = g.matmul(gather(weight))
            gw = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
            return gx, gw

    linear.forward = lambda x: Gathered.apply(x, linear.weight)


def worker(planned: bool, out: str, fallback: str = "caching", reuse_after: str = "free") -> None:
    import torch

    if planned:
        from longtrain.memory.planner.runtime import install_cuda_allocator

        core = install_cuda_allocator(0, fallback=fallback)
    from longtrain.memory.checkpointing import apply_activation_checkpointing
    from longtrain.memory.swap import apply_activation_swap
    from longtrain.models import build_model, model_args

    dev = torch.device("cuda")
    args = model_args("debug", num_hidden_layers=4, hidden_size=512, intermediate_size=1536)
    model = build_model(args, device=dev, dtype=torch.float32, attention_kernel="math", seed=1)
    side = torch.cuda.Stream(dev)
    for i in (0, 3):  # a gather inside a recomputation (layer 0) and in a kept layer
        gather_on_side_stream(model.model.layers[i].mlp.down_proj, side)
    apply_activation_checkpointing(model, [0])
    apply_activation_swap(model, {1: 0.5, 2: 0.5}, dev, chunk_tokens=512)
    rt = None
    if planned:
        from longtrain.memory.planner.runtime import PlanRuntime, attach_windows

        rt = PlanRuntime(core, dev, check=True, time_limit_s=10, record_iteration=1,  # no ZeRO-3: steps 1 on repeat
                         reuse_after=reuse_after, overflow_bytes=8 << 30)
        attach_windows(model.model.layers, rt, model=model)
        rt.iterations = "step"  # as the trainer: begin_iteration and end_iteration around each step
    carve = {"armed": False, "asked": []}  # armed for step CARVE_STEP; what the hook asked for there

    def full_device_then_ask(_mod, _args):  # in layer 3's forward window, once in step CARVE_STEP
        if not carve["armed"]:
            return
        carve["armed"] = False
        settle()
        st = core.stats()  # the fallback's holes must not fit the ask
        holes = fallback_holes(st)
        ask = max(rt.plan.region_bytes // 16, holes + MIB2)
        carve["asked"].append({"ask": ask, "fallback_holes": holes, "planned_live": st["planned_live"]})
        full = ballast(dev, ask // 2 + 4 * MIB2)
        extra = torch.zeros(ask, dtype=torch.uint8, device=dev)  # only a gap of the region can serve it
        del extra, full

    if planned:
        model.model.layers[3].mlp.register_forward_pre_hook(full_device_then_ask)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator(device=dev).manual_seed(0)
    rec = {"steps": []}
    for step in range(STEPS):
        s = OTHER_SEQ if step == 5 else SEQ
        ids = torch.randint(0, args.vocab_size, (1, s), device=dev, generator=g)
        fill = []
        if rt and step == OVERFLOW_STEP:  # through the recorded step, the device 32 MiB short of its peak
            settle()
            st = core.stats()
            grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)  # its zero_grad frees
            room = st["allocated_peak"] - (st["allocated"] - grad_bytes) - fallback_holes(st) - (32 << 20)
            fill.append(ballast(dev, room))
        before = dict(core.stats()) if rt else {}
        if rt:
            rt.begin_iteration()
        carve["armed"] = bool(step == CARVE_STEP and rt and rt.plan)
        opt.zero_grad(set_to_none=True)
        loss, _ = model(ids, None, ids)
        loss.backward()
        torch.cuda.synchronize()
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.double().cpu() for n, p in
                 model.named_parameters() if p.grad is not None}
        opt.step()
        if rt:
            rt.end_iteration()
        fill.clear()  # outside every window: neither recorded nor planned
        if rt and step == 3 and rt.plan:  # between two replayed steps, a request only the idle region can serve
            settle()
            region = rt.plan.region_bytes
            held = [ballast(dev, region // 2)]
            held.append(torch.empty(region * 3 // 4, dtype=torch.uint8, device=dev))  # the borrowed bytes
            del held
        entry = {"seq": s, "loss": loss.item(), "grad_norms": {n: v.norm().item() for n, v in grads.items()}}
        if rt:
            after = core.stats()
            entry["plan"] = {k: after[k] - before.get(k, 0) for k in ("served", "fallback", "miss_size",
                                                                     "miss_length", "miss_stream", "after_miss",
                                                                     "refused_overlap", "check_lifetime",
                                                                     "check_leaked", "reuse_waits",
                                                                     "cross_stream_waits", "ghosts", "carved",
                                                                     "overflowed")}
            entry["state"] = rt.state
            if step == CARVE_STEP:
                entry["carve_ask"] = carve["asked"]
        rec["steps"].append(entry)
        torch.save(grads, f"{out}.step{step}.pt")
    if rt:
        rec["summary"] = rt.summary()
        rec["stats"] = core.stats()
        rec["waits"] = core.wait_pairs()  # (waiting stream, stream waited for, record_stream waits, ghost waits)
        rec["region_bytes"] = rt.plan.region_bytes if rt.plan else None
        rec["unplanned"] = rt.plan.unplanned if rt.plan else None
        main = torch.cuda.current_stream(dev).cuda_stream
        rec["side_stream_planned"] = sum(o >= 0 and x != main for offs, ss in zip(rt.plan.offsets, rt.plan.streams)
                                         for o, x in zip(offs, ss)) if rt.plan else 0
    with open(out, "w") as f:
        json.dump(rec, f)


def compare(ref_path: str, got_path: str) -> dict:
    import torch

    ref, got = json.load(open(ref_path)), json.load(open(got_path))
    worst, problems = 0.0, []
    for step, (a, b) in enumerate(zip(ref["steps"], got["steps"])):
        ga, gb = torch.load(f"{ref_path}.step{step}.pt"), torch.load(f"{got_path}.step{step}.pt")
        for n in ga:
            err = ((gb[n] - ga[n]).norm() / ga[n].norm().clamp_min(1e-30)).item()
            worst = max(worst, err)
        if abs(a["loss"] - b["loss"]) > 1e-6 * abs(a["loss"]):
            problems.append(f"step {step}: loss {b['loss']} vs {a['loss']}")
        p = b["plan"]
        if step >= 2 and step != 5:
            if p["served"] == 0:
                problems.append(f"step {step}: nothing served from the plan")
            if p["miss_size"] + p["miss_length"] + p["miss_stream"] and step != CARVE_STEP:
                problems.append(f"step {step}: misses {p}")
        if (step == OVERFLOW_STEP) != bool(p["overflowed"]):
            problems.append(f"step {step}: {p['overflowed']} requests overflowed into managed memory (only the "
                            f"recorded step {OVERFLOW_STEP}, on a full device, should)")
        if step == CARVE_STEP and not p["carved"]:
            problems.append(f"step {step} (a miss on a full device): nothing carved from the region: {p}")
        if step == 5 and p["miss_size"] == 0:
            problems.append("step 5 (another length): no size miss counted")
        if p["refused_overlap"] or p["check_lifetime"] or p["check_leaked"]:
            problems.append(f"step {step}: the plan's lifetimes were not kept: {p}")
    st = got.get("stats", {})
    if st.get("region_given_back") != 1 or st.get("region") != got.get("region_bytes"):
        problems.append(f"the region was not given back once between steps 3 and 4 and taken again: {st}")
    if got.get("unplanned") and "side_stream" in got["unplanned"]:  # memory.planner.side_streams' default
        problems.append(f"side-stream requests were left to the fallback: {got['unplanned']}")
    if not got.get("side_stream_planned"):
        problems.append("no side-stream request was planned: the gathers went to the fallback")
    if worst > 1e-6:
        problems.append(f"gradients differ: worst relative error {worst:.3g}")
    return {"worst_grad_rel_err": worst, "problems": problems, "planned": got}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["normal", "planned"])
    ap.add_argument("--out", default="/tmp/planner_check")
    ap.add_argument("--json")
    ap.add_argument("--fallback", choices=PLANNER_FALLBACKS, default=PLANNER_FALLBACKS[0],
                    help="what serves the requests the plan does not (memory.planner.fallback)")
    ap.add_argument("--reuse-after", choices=PLANNER_REUSE_AFTER, default="free",
                    help="a freed tensor other streams still read: its bytes reused from its free (default here: "
                         "the plan's tightest reuse), the end of the next layer pass or its release "
                         "(memory.planner.reuse_after)")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker == "planned", a.out, a.fallback, a.reuse_after)
        return 0
    paths = {}
    for mode in ("normal", "planned"):
        paths[mode] = f"{a.out}.{mode}.json"
        r = subprocess.run([sys.executable, __file__, "--worker", mode, "--out", paths[mode], "--fallback", a.fallback,
                            "--reuse-after", a.reuse_after],
                           env=dict(os.environ), capture_output=True, text=True)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-6000:], sep="\n")
            return 1
    res = compare(paths["normal"], paths["planned"])
    for i, s in enumerate(res["planned"]["steps"]):
        print(f"step {i} seq {s['seq']} loss {s['loss']:.6f} state {s['state']} plan {s['plan']}")
    print(res["planned"].get("summary", ""))
    print(f"side-stream requests planned: {res['planned'].get('side_stream_planned')}; region "
          f"{res['planned'].get('region_bytes')} bytes; waits queued by stream pair {res['planned'].get('waits')}")
    print(f"worst gradient relative error {res['worst_grad_rel_err']:.3g}")
    print("OK" if not res["problems"] else "PROBLEMS:\n" + "\n".join(res["problems"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if not res["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
