"""Draw a memory plan (time on x, address on y, one rectangle per tensor, peak and lower bound marked),
beside the CUDA caching allocator's actual layout from a memory snapshot when one is given.

    python tools/plan_memory.py --png plan.png --plan runs/x/memory_plan_layer.json
    python tools/plan_memory.py --png plan.png debug model.preset=llama3-8b data.seq_len=131072 [--level 2]
    python tools/plan_memory.py --png plan.png --plan P.json --snapshot snap.pickle

The snapshot is the pickle of `torch.cuda.memory._snapshot()` taken after
`torch.cuda.memory._record_memory_history()`: its `device_traces` (alloc / free events) give the
allocator's layout over time; the segments are stacked in address order with their gaps removed, so the
picture shows fragmentation (holes inside segments), not the virtual address space.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


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

    live, rects = {}, []
    t = 0
    for e in events:
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (t, e["size"])
        elif act in ("free_completed", "free_requested") and e["addr"] in live:
            start, size = live.pop(e["addr"])
            rects.append((start, t, where(e["addr"]), size))
        else:
            continue
        t += 1
    rects += [(start, t, where(a), size) for a, (start, size) in live.items()]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe to trace and plan (instead of --plan)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")
    p.add_argument("--png", required=True, help="output image")
    p.add_argument("--plan", help="a plan JSON written by `longtrain plan-memory`")
    p.add_argument("--level", type=int, choices=(1, 2), default=1, help="with a recipe: which level to draw")
    p.add_argument("--snapshot", help="pickle of torch.cuda.memory._snapshot() for the second panel")
    ns = p.parse_args(argv)
    from longtrain.config import ConfigError, load_config
    from longtrain.memory.planner import MemoryPlan

    if (ns.plan is None) == (ns.recipe is None):
        p.error("give either --plan FILE or a RECIPE")
    try:
        if ns.plan:
            plan, title = MemoryPlan.from_json(ns.plan), Path(ns.plan).name
        else:
            from longtrain.memory.planner.recipe import plan_recipe

            rep = plan_recipe(load_config(ns.recipe, ns.overrides))
            plan = rep.layer_plan if ns.level == 1 else rep.iteration_plan
            title = f"{ns.recipe} level {ns.level}"
        snap = None
        if ns.snapshot:
            with open(ns.snapshot, "rb") as f:
                snap = pickle.load(f)
            if not isinstance(snap, dict) or "segments" not in snap:
                raise ValueError(f"{ns.snapshot} is not a torch.cuda.memory._snapshot() pickle (no 'segments')")
    except (ConfigError, ValueError, OSError) as e:
        print(f"plan_memory: error: {e}", file=sys.stderr)
        return 2
    out = draw(plan, ns.png, snap, title)
    print(f"wrote {out}" + ("" if snap is not None else " (no --snapshot: allocator panel omitted)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
