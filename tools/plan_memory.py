"""Draw a memory plan (time on x, address on y, one rectangle per tensor, peak and lower bound marked),
beside the CUDA caching allocator's actual layout from a memory snapshot when one is given.

    python tools/plan_memory.py --png plan.png --plan runs/x/memory_plan_layer.json
    python tools/plan_memory.py --png plan.png debug model.preset=llama3-8b data.seq_len=131072 [--level 2]
    python tools/plan_memory.py --png plan.png --plan P.json --snapshot snap.pickle
    python tools/plan_memory.py --png plan.png --from-snapshot snap.pickle [--first I --last J] [--json out.json]

--from-snapshot plans the requests of a GPU trace itself (the allocator's actions I..J, e.g. one layer's
forward and backward, or a whole step) and prints the plan's peak and lower bound beside what the caching
allocator allocated and reserved for the same requests; the picture shows both. Each block lives until the
allocator released it (after every stream that used it: `memory.planner.reuse_after=release`); the table
also plans them to the program's free (`reuse_after=free`) and counts that plan's requests placed over
memory not yet released, each of which would wait for another stream at run time.

The snapshot is the pickle of `torch.cuda.memory._snapshot()` taken after
`torch.cuda.memory._record_memory_history()`: its `device_traces` (alloc / free events) give the
allocator's layout over time; the segments are stacked in address order with their gaps removed, so the
picture shows fragmentation (holes inside segments), not the virtual address space.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30

from longtrain.memory.planner.snapshot import allocator_peaks, blocks_from_snapshot  # noqa: E402


def _draw_plan(ax, plan, title: str) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rects = [Rectangle((r.start, o / GIB), r.end - r.start, r.size / GIB) for r, o in zip(plan.requests, plan.offsets)]
    ax.add_collection(PatchCollection(rects, facecolor="tab:blue", edgecolor="black", linewidth=0.3, alpha=0.6))
    t_end = max((r.end for r in plan.requests), default=1)
    ax.axhline(plan.peak_bytes / GIB, color="tab:red", lw=1, label=f"plan peak {plan.peak_bytes / GIB:.2f} GiB")
    ax.axhline(plan.lower_bound_bytes / GIB, color="tab:green", lw=1, ls="--",
               label=f"lower bound {plan.lower_bound_bytes / GIB:.2f} GiB")
    if "fwd_end" in plan.info:
        ax.axvline(plan.info["fwd_end"], color="gray", lw=0.8, ls=":", label="forward | backward")
    ax.set_xlim(0, t_end)
    ax.set_ylim(0, plan.peak_bytes / GIB * 1.08 or 1)
    ax.set_xlabel("event (allocation / free order)")
    ax.set_ylabel("address (GiB)")
    ax.set_title(f"{title}: {len(plan.requests)} tensors, peak/LB {plan.ratio:.3f} ({plan.solver})", fontsize=8)
    ax.legend(loc="upper right", fontsize=7)


def snapshot_rectangles(snap: dict, device: int = 0) -> tuple[list[tuple[int, int, int, int]], int]:
    """(start_event, end_event, compact_address, size) per allocation in the snapshot's trace, and the
    compacted reserved size. Allocations still live at the end run to the last event."""
    segments = sorted((s["address"], s["total_size"]) for s in snap.get("segments", []) if s.get("device", 0) == device)
    traces = snap.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    for e in events:  # segments freed before the snapshot still appear in the trace
        if e.get("action") == "segment_alloc":
            segments.append((e["addr"], e["size"]))
    segments = sorted(set(segments))
    base, compact, total = [], [], 0
    for addr, size in segments:
        base.append(addr)
        compact.append(total)
        total += size

    def where(addr: int) -> int:
        import bisect

        k = bisect.bisect_right(base, addr) - 1
        return compact[k] + addr - base[k] if k >= 0 else addr - (base[0] if base else 0)

    if not events:
        return [], total
    rects = [(b.request.start, b.request.end, where(b.addr), b.request.size)
             for b in blocks_from_snapshot(snap, device)]
    return rects, total


def _draw_snapshot(ax, snap: dict, title: str) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rects, reserved = snapshot_rectangles(snap)
    ax.add_collection(PatchCollection([Rectangle((a, y / GIB), b - a, s / GIB) for a, b, y, s in rects],
                                      facecolor="tab:orange", edgecolor="black", linewidth=0.3, alpha=0.6))
    ax.axhline(reserved / GIB, color="tab:red", lw=1, label=f"reserved {reserved / GIB:.2f} GiB")
    ax.set_xlim(0, max((b for _, b, _, _ in rects), default=1))
    ax.set_ylim(0, max(reserved / GIB * 1.08, 1e-9))
    ax.set_xlabel("event (allocator trace order)")
    ax.set_ylabel("address, segments stacked (GiB)")
    ax.set_title(f"{title}: {len(rects)} allocations", fontsize=8)
    ax.legend(loc="upper right", fontsize=7)


def draw(plan, png: str | Path, snapshot: dict | None = None, title: str = "plan") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if snapshot is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 5), squeeze=False)
    _draw_plan(axes[0][0], plan, title)
    if snapshot is not None:
        _draw_snapshot(axes[0][1], snapshot, "caching allocator (snapshot)")
    else:
        fig.text(0.01, 0.01, "no --snapshot given: the caching allocator's panel is omitted", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def _load_snapshot(path: str) -> dict:
    with open(path, "rb") as f:
        snap = pickle.load(f)
    if not isinstance(snap, dict) or "segments" not in snap:
        raise ValueError(f"{path} is not a torch.cuda.memory._snapshot() pickle (no 'segments')")
    return snap


def plan_snapshot(snap: dict, first: int = 0, last: int | None = None, time_limit_s: float = 60.0):
    """Plan the trace's requests [first, last) and set the plan beside the allocator: (plan, row)."""
    from longtrain.memory.planner import solve_plan

    reqs = [b.request for b in blocks_from_snapshot(snap, 0, first, last)]
    if not reqs:
        raise ValueError(f"no allocation among the trace's actions [{first}:{last}]")
    plan = solve_plan(reqs, time_limit_s=time_limit_s)
    peaks = allocator_peaks(snap) if first == 0 and last is None else {}
    at_free = blocks_from_snapshot(snap, 0, first, last, ends="requested")
    plan_free = solve_plan([b.request for b in at_free], time_limit_s=time_limit_s)
    waits, wait_bytes = unreleased_reuses(at_free, plan_free.offsets)
    row = {"requests": len(reqs), "lower_bound_bytes": plan.lower_bound_bytes, "plan_peak_bytes": plan.peak_bytes,
           "plan_ratio": plan.ratio, "solver": plan.solver, "window": [first, last],
           "lower_bound_at_free_bytes": plan_free.lower_bound_bytes, "plan_at_free_peak_bytes": plan_free.peak_bytes,
           "plan_at_free_unreleased_reuses": waits, "plan_at_free_unreleased_reuse_bytes": wait_bytes, **peaks}
    return plan, row


def unreleased_reuses(blocks, offsets: list[int]) -> tuple[int, int]:
    """In a plan of `blocks` with lifetimes to the program's free (`blocks_from_snapshot(ends="requested")`):
    how many requests, and their bytes, are placed over a block the allocator had not yet released when
    they were made (other streams still read it). At run time each such request waits for those streams
    (`memory.planner.reuse_after=free`), where the caching allocator used other memory."""
    held = [(b.request.end, b.released, o, o + b.request.size) for b, o in zip(blocks, offsets) if b.released >= 0]
    n = nbytes = 0
    for b, o in zip(blocks, offsets):
        s, e = b.request.start, o + b.request.size
        if any(end <= s < rel and lo < e and o < hi for end, rel, lo, hi in held):
            n += 1
            nbytes += b.request.size
    return n, nbytes


def snapshot_table(row: dict) -> str:
    lines = [f"requests              {row['requests']}",
             f"lower bound           {row['lower_bound_bytes'] / GIB:.3f} GiB (max live bytes, each block live until "
             "the allocator released it: memory.planner.reuse_after=release)",
             f"  ... to the free     {row['lower_bound_at_free_bytes'] / GIB:.3f} GiB (until the program freed it, "
             "though another stream still read it: reuse_after=free)",
             f"  ... its plan        {row['plan_at_free_peak_bytes'] / GIB:.3f} GiB; "
             f"{row['plan_at_free_unreleased_reuses']} requests "
             f"({row['plan_at_free_unreleased_reuse_bytes'] / GIB:.2f} GiB) placed over memory the allocator had not "
             "released yet: each would wait for another stream",
             f"plan peak             {row['plan_peak_bytes'] / GIB:.3f} GiB ({row['plan_ratio']:.4f} x LB, {row['solver']})"]
    if "reserved_peak_bytes" in row:
        lines += [f"allocator allocated   {row['allocated_peak_bytes'] / GIB:.3f} GiB (peak of live blocks)",
                  f"allocator reserved    {row['reserved_peak_bytes'] / GIB:.3f} GiB "
                  f"({row['reserved_peak_bytes'] / max(row['plan_peak_bytes'], 1):.3f} x the plan's peak)"]
    else:
        lines.append("allocator peaks       (whole trace only: a window starts with blocks of unknown layout)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe to trace and plan (instead of --plan)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")
    p.add_argument("--png", required=True, help="output image")
    p.add_argument("--plan", help="a plan JSON written by `longtrain plan-memory`")
    p.add_argument("--level", type=int, choices=(1, 2), default=1, help="with a recipe: which level to draw")
    p.add_argument("--snapshot", help="pickle of torch.cuda.memory._snapshot() for the second panel")
    p.add_argument("--from-snapshot", help="plan the requests of this snapshot's trace (and draw it beside)")
    p.add_argument("--first", type=int, default=0, help="--from-snapshot: first allocator action of the window")
    p.add_argument("--last", type=int, default=None, help="--from-snapshot: end of the window (default: all)")
    p.add_argument("--time-limit", type=float, default=60.0, help="--from-snapshot: MIP time limit (s)")
    p.add_argument("--json", help="--from-snapshot: write the comparison here")
    ns = p.parse_args(argv)
    from longtrain.config import ConfigError, load_config
    from longtrain.memory.planner import MemoryPlan

    if sum(x is not None for x in (ns.plan, ns.recipe, ns.from_snapshot)) != 1:
        p.error("give one of --plan FILE, a RECIPE or --from-snapshot FILE")
    try:
        if ns.from_snapshot:
            snap = _load_snapshot(ns.from_snapshot)
            plan, row = plan_snapshot(snap, ns.first, ns.last, ns.time_limit)
            print(snapshot_table(row))
            if ns.json:
                with open(ns.json, "w") as f:
                    json.dump(row, f, indent=2)
            out = draw(plan, ns.png, snap, f"{Path(ns.from_snapshot).name} [{ns.first}:{ns.last}]")
            print(f"wrote {out}")
            return 0
        if ns.plan:
            plan, title = MemoryPlan.from_json(ns.plan), Path(ns.plan).name
        else:
            from longtrain.memory.planner.recipe import plan_recipe

            rep = plan_recipe(load_config(ns.recipe, ns.overrides))
            plan = rep.layer_plan if ns.level == 1 else rep.iteration_plan
            title = f"{ns.recipe} level {ns.level}"
        snap = _load_snapshot(ns.snapshot) if ns.snapshot else None
    except (ConfigError, ValueError, OSError) as e:
        print(f"plan_memory: error: {e}", file=sys.stderr)
        return 2
    out = draw(plan, ns.png, snap, title)
    print(f"wrote {out}" + ("" if snap is not None else " (no --snapshot: allocator panel omitted)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
