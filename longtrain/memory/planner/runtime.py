"""The planned runtime: serves MEMO's two-level plan on the GPU (`memory.planner.enabled`).

How it works (docs/memory-planner.md, "The runtime"):

1. `install_cuda_allocator` replaces the process's CUDA allocator, before CUDA allocates anything, with
   the C core `_alloc.c` (compiled once with the system C compiler, cached) through a small C++ shim
   built with `torch.utils.cpp_extension` against the torch that runs. The shim wires torch's pluggable
   allocator to the core's malloc/free *and* its `record_stream` hook (the Python API binds only malloc
   and free), turns a failed allocation into torch's OutOfMemoryError, and answers
   `torch.cuda.memory_stats()` and `empty_cache()` (so `max_memory_allocated`, `max_memory_reserved` and
   their reset, which the pluggable allocator refuses, report the core's bytes: region plus fallback).
2. `attach_windows` hooks every decoder layer (outermost, after the activation policy) so that its
   forward and its backward are *windows* of the core: begin/end around the forward; the backward window
   opens when the layer's output gradient arrives and closes when its input gradient is made; what runs
   between two layer passes is a *gap* window; with the model given, its forward starts each iteration
   (with a gap window: the embedding).
3. One training iteration (`record_iteration`, default the third: the first allocates gradients,
   optimizer state and host buffers once, and under ZeRO-3 the second still differs) is recorded; at the
   start of the next one `plan_recorded_iteration` plans it on both levels (level 1: each layer pass's
   transients; level 2: the iteration, a block per layer pass plus the requests that cross windows, side
   streams' included), one region of level 2's peak is allocated, and every later iteration's window p
   replays plan p. The region is taken only where the plan fits the device's room beside the fallback
   (else the plan of `reuse_after=free`, else none). When no planned tensor is live and no plan serves
   (between two steps, or in a window a miss turned off), the core lends it back to the device for a
   request nothing else can serve; the next iteration takes it again.
   Until the plan is made, a request the device cannot hold overflows into CUDA managed memory (up to
   `overflow_bytes` at once: `memory.planner.warmup_overflow_gib`), so the iteration can be recorded at a
   length only the plan fits; replayed iterations never overflow.

What the core guarantees (always, not only in check mode): a planned offset is handed out only if no
live planned block overlaps it; a request whose size, stream or position differs from the plan turns
the plan off for the rest of its window (counted, warned once with the reason); memory another stream
still reads, or that another stream's tensor held, is reused only in stream order (the new user's stream
waits for that stream's events).

The fallback for everything not planned (`memory.planner.fallback`) is torch's own caching allocator,
which the shim keeps behind the planned one (the default: measured on an H200, it reserved less and
stepped faster), or CUDA's stream-ordered allocator (cudaMallocAsync). That pool gives freed memory back
to the device at every synchronisation until the plan serves (slower allocations in the warm-up and
recorded iterations), so what they used does not stay reserved beside the region; from then on it keeps
what it frees, as a caching allocator does.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib
import json
import logging
import os
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from torch import nn

from longtrain.config.schema import PLANNER_FALLBACKS, PLANNER_REUSE_AFTER
from longtrain.memory.planner.core import MemoryPlan, Request, solve_plan

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("_alloc.c")
ALIGNMENT = 512

STAT_NAMES = ("allocated", "allocated_peak", "reserved", "reserved_peak", "served", "miss_size", "miss_length",
              "miss_stream", "refused_overlap", "fallback", "deferred", "check_lifetime", "check_leaked",
              "region", "planned_live", "oom_retries", "windows", "unknown_free", "after_miss", "reuse_waits",
              "cross_stream_waits", "ghosts", "region_given_back", "carved",
              "overflowed", "overflow_bytes", "overflow_peak",  # served from managed memory before the plan
              "failed", "failed_live", "failed_plan", "failed_plan_off",  # requests nothing served; the last's state
              # the bytes the fallback holds by why it served them, then their peaks
              *(f"fallback_{why}{peak}" for peak in ("", "_peak")
                for why in ("no_plan", "unplanned", "refused", "after_miss")))


def _cache_dir() -> Path:
    root = os.environ.get("LONGTRAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longtrain")
    return Path(root)


def build_core() -> Path:
    """The compiled core (cached by source hash; built atomically, so ranks may race safely)."""
    src = _SRC.read_bytes()
    out = _cache_dir() / f"liblongtrain_alloc-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_SRC), "-ldl", "-lpthread"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        os.unlink(tmp)
        raise RuntimeError(f"the planned allocator needs a C compiler: `{cc}` was not found (set CC)") from None
    if r.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building the planned allocator failed ({' '.join(cmd)}):\n{r.stderr.strip()}")
    os.replace(tmp, out)
    return out


class Core:
    """ctypes view of one loaded `_alloc.c` (a process has one; the CPU tests load copies)."""

    def __init__(self, path: str | Path):
        self.lib = lib = ctypes.CDLL(str(path))
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        sig = {"lt_init_host": (i32, []), "lt_init_cuda": (i32, [ctypes.c_char_p, i32]),
               "lt_region_alloc": (i32, [i64]), "lt_region_base": (i64, []), "lt_device_free": (i64, []),
               "lt_set_plan": (i32, [i32, i64, *[ctypes.POINTER(i64)] * 5]),
               "lt_window_begin": (i64, [i32, vp]), "lt_window_end": (None, []),
               "lt_malloc": (vp, [ctypes.c_size_t, i32, vp]), "lt_free": (None, [vp, ctypes.c_size_t, i32, vp]),
               "lt_record_stream": (None, [vp, vp]), "lt_set_record": (None, [i32]), "lt_set_check": (None, [i32]),
               "lt_record_len": (i64, []), "lt_record_data": (ctypes.POINTER(i64), []),
               "lt_record_clear": (None, []), "lt_stats": (i32, [ctypes.POINTER(i64), i32]),
               "lt_reset_peaks": (None, []), "lt_host_complete_events": (None, []), "lt_flush": (None, [i32]),
               "lt_empty_cache": (None, []), "lt_pool_keep": (i32, [i32]),
               "lt_host_limit": (None, [i64]), "lt_refusals": (i64, [ctypes.POINTER(i64), i64]),
               "lt_host_waits": (i64, [ctypes.POINTER(i64)]), "lt_lifetimes": (i64, [ctypes.POINTER(i64), i64]),
               "lt_wait_pairs": (i64, [ctypes.POINTER(i64), i64]),
               "lt_set_fallback": (None, [vp, vp, vp, vp, vp]), "lt_set_overflow": (None, [i64]),
               "lt_host_granule": (None, [i64])}
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def set_plan(self, plan_id: int, sizes: list[int], offsets: list[int], free_at: list[int] | None = None,
                 streams: list[int] | None = None, ghosts: list[bool] | None = None) -> None:
        """Window `plan_id`'s plan: per request its size, region offset (-1: the fallback), the window that
        frees it (default this one), the stream it must come on (default -1: the window's) and whether its
        free leaves a ghost (a request on another stream may take its bytes later; default no)."""
        n = len(sizes)
        arr = ctypes.c_int64 * max(n, 1)
        free_at = [plan_id] * n if free_at is None else free_at
        streams = [-1] * n if streams is None else streams
        flags = [0] * n if ghosts is None else [int(bool(g)) for g in ghosts]
        r = self.lib.lt_set_plan(plan_id, n, arr(*sizes), arr(*offsets), arr(*free_at), arr(*streams), arr(*flags))
        if r:
            raise ValueError(f"plan {plan_id} refused by the allocator core (code {r}: -2 = outside the region)")

    def window_begin(self, plan_id: int, stream: int) -> int:
        return self.lib.lt_window_begin(plan_id, stream)

    def window_end(self) -> None:
        self.lib.lt_window_end()

    def malloc(self, size: int, stream: int = 0) -> int:
        return self.lib.lt_malloc(size, 0, stream) or 0

    def free(self, ptr: int, stream: int = 0) -> None:
        self.lib.lt_free(ptr, 0, 0, stream)

    def record_stream(self, ptr: int, stream: int) -> None:
        self.lib.lt_record_stream(ptr, stream)

    def region_base(self) -> int:
        return self.lib.lt_region_base()

    def events(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """(type 0 alloc / 1 free / 2 release, window, k, size, flag, block id, stream) per recorded event;
        the flag is "on the window's stream" for an allocation, "used by another stream" for a free; a
        release is where a block freed while other streams read it was seen done with by them (the core's
        deferred free); the stream is the one the block was allocated on."""
        n = self.lib.lt_record_len()
        data = self.lib.lt_record_data()
        flat = [data[i] for i in range(7 * n)] if n else []
        return [tuple(flat[7 * i:7 * i + 7]) for i in range(n)]

    def _log(self, read, width: int, limit: int) -> list[tuple[int, ...]]:
        buf = (ctypes.c_int64 * (width * limit))()
        n = read(buf, limit)
        return [tuple(buf[width * i:width * i + width]) for i in range(n)]

    def refusals(self, limit: int = 4096) -> list[tuple[int, int, int, int, int, int]]:
        """Logged refusals (the first 4096): (plan, k, size, plan and k of the live block in the way, 1 when
        the program had freed that block and it waited only on another stream's events)."""
        return self._log(self.lib.lt_refusals, 6, limit)

    def lifetimes(self, limit: int = 4096) -> list[tuple[int, int, int, int, int]]:
        """Check mode's logged lifetime breaks (the first 4096): (plan, k, size, the window the plan frees
        it in, the window that did: -1 outside any)."""
        return self._log(self.lib.lt_lifetimes, 5, limit)

    def wait_pairs(self, limit: int = 32) -> list[tuple[int, int, int, int]]:
        """The stream waits the core queued so far, by pair: (waiting stream, stream whose event it waits
        for, waits for a freed block another stream still read (record_stream), waits for a ghost of
        another stream). Only waits on events not yet complete are queued and counted."""
        return self._log(self.lib.lt_wait_pairs, 4, limit)

    def stats(self) -> dict[str, int]:
        buf = (ctypes.c_int64 * len(STAT_NAMES))()
        self.lib.lt_stats(buf, len(STAT_NAMES))
        return dict(zip(STAT_NAMES, buf))

    def holdings(self) -> str:
        """Where the memory is now, in one line (printed when a run runs out of memory): the region and its
        live bytes (planned or carved), the bytes the fallback holds by why it served them, deferred frees, the
        reserved total with its peak, what managed memory held before the plan, and the region and window at
        the last request nothing served."""
        s = self.stats()
        gib = lambda k: f"{s[k] / 2**30:.2f}"  # noqa: E731
        why = ", ".join(f"{name} {gib('fallback_' + k)} (peak {gib('fallback_' + k + '_peak')})"
                        for k, name in (("no_plan", "outside the plan"), ("unplanned", "left out of it"),
                                        ("refused", "refused by it"), ("after_miss", "after a miss")))
        failed = ""
        if s["failed"]:  # taken at the request, before the error unwound anything
            plan = {-2: "outside every window", -1: "in a window with no plan"}.get(
                s["failed_plan"], f"in window {s['failed_plan']}, whose plan "
                + ("a miss had turned off" if s["failed_plan_off"] else "still served"))
            failed = f"; at the request that failed: {gib('failed_live')} GiB live in the region, {plan}"
        overflow = (f"; managed memory before the plan: {s['overflowed']} requests, {gib('overflow_bytes')} GiB now "
                    f"(peak {gib('overflow_peak')} GiB)" if s["overflowed"] else "")
        return (f"region {gib('region')} GiB with {gib('planned_live')} GiB of tensors live in it ({s['carved']} "
                f"requests carved from its gaps so far); the fallback "
                f"holds GiB: {why}; {s['deferred']} frees wait for other streams; reserved {gib('reserved')} GiB "
                f"(peak {gib('reserved_peak')} GiB), allocated {gib('allocated')} GiB{overflow}{failed}")


def host_core() -> Core:
    """A private copy of the core on the host backend (malloc, simulated events): for tests."""
    src = build_core()
    fd, path = tempfile.mkstemp(suffix=".so")  # a copy: dlopen would hand back the same library otherwise
    os.close(fd)
    Path(path).write_bytes(src.read_bytes())
    core = Core(path)
    os.unlink(path)
    core.lib.lt_init_host()
    return core


# ---- plans from a recorded iteration ----------------------------------------------------------------

Window = tuple[str, int]  # ("fwd" | "bwd", layer) for a layer pass, ("gap", -1) for what runs between passes


@dataclass
class IterationPlan:
    """MEMO's two levels over one recorded iteration, as the core replays them: position p of the
    iteration's window sequence gets plan id p."""
    layout: list[Window]  # the windows of the iteration, in order
    sizes: list[list[int]]  # per window: its requests' sizes, in order
    offsets: list[list[int]]  # per window: region offset per request, -1: the fallback serves it
    free_at: list[list[int]]  # per window: the position of the window that frees each planned request
    level1: dict[int, MemoryPlan]  # per layer-pass position: its transients
    level2: MemoryPlan | None  # the iteration: one block per layer pass + the requests that cross windows
    unplanned: dict = field(default_factory=dict)  # why requests were left to the fallback: cause -> counts
    streams: list[list[int]] = field(default_factory=list)  # per window: the stream each request came on
    ghosts: list[list[bool]] = field(default_factory=list)  # per window: its free guards the bytes from other streams
    reuse_after: str = "next_pass"  # the rule the plan was made with (PLANNER_REUSE_AFTER)
    # the most bytes the fallback holds during the iteration beyond what it held when the iteration began
    # (what the plan leaves to it, less what it frees of the bytes allocated before)
    fallback_growth_bytes: int = 0

    @property
    def region_bytes(self) -> int:
        return self.level2.peak_bytes if self.level2 else 0

    def planned(self) -> int:
        return sum(o >= 0 for offs in self.offsets for o in offs)


@dataclass
class _Recorded:
    """One block the recorded iteration allocated: its window position and request number, size, whether it
    came on its window's stream, when, on which stream; where and when it was freed ((-1, -1): not in the
    iteration), whether another stream still read it then, and where the recording saw that stream done."""
    pos: int
    k: int
    size: int
    on_stream: bool
    t0: int
    stream: int
    freed: tuple[int, int] = (-1, -1)
    deferred: bool = False
    released: tuple[int, int] | None = None


def plan_recorded_iteration(events, layout: list[Window], seqs: list[int], *, time_limit_s: float = 60.0,
                            side_streams: bool = True, mip_solver: str = "auto",
                            reuse_after: str = "next_pass") -> IterationPlan:
    """Plans one recorded iteration (`events` of the core's record, windows `seqs` in order, `layout[p]`
    what window p was).

    A request is planned when it is freed inside the iteration. One that another stream still reads when
    it is freed (`record_stream`: a swap's D2H copy, NCCL's collectives) is planned up to its free with
    `reuse_after="free"`: at replay the next request placed over it makes its own stream wait for that
    stream's events (the core's stream-ordered reuse), so the plan's timeline is the program's order, not
    the copy engine's timing; with "release", up to where the recording saw those streams done with it
    (the end of the iteration if it never did), as the caching allocator would reuse it: more memory,
    and at replay the wait finds the event done where the timing repeats. The host runs ahead of the GPU,
    so it sees a release late; "next_pass" keeps such a block to the end of the next layer pass after its
    free (or to its release where the recording saw that sooner; to the end of the iteration where no pass
    follows and no release was seen): the other stream's work (a swap's D2H copy) then overlaps one layer
    pass's compute, as MEMO overlaps a layer's swap with the next layer. A request made on
    another stream than its window's (ZeRO-3's parameter gathers, the swap's prefetch buffers) is planned
    too (`side_streams`; else the fallback serves it). At replay every planned request must come on the
    stream it was recorded on, and where the plan gives the bytes of one stream's tensor to a later request
    of another stream, the first one's free leaves a ghost the second one's stream waits for (`ghosts`).
    Level 1: per layer pass, the requests it allocates and frees itself (its transients), on one plan;
    passes with the same requests share the solve. Level 2: the iteration, where every layer pass is one
    block of its level-1 peak over its span and every other planned request (skeletal tensors kept for
    backward, layer outputs, gradients between layers, what runs between the passes) is a request of its
    own. A transient's address is its pass's block offset plus its level-1 offset. `time_limit_s` bounds
    the whole plan (all its MIP solves together; the greedy plans always run)."""
    pos_of = {seq: p for p, seq in enumerate(seqs)}
    n = len(seqs)
    sizes: list[list[int]] = [[] for _ in range(n)]
    span = [[-1, -1] for _ in range(n)]
    if reuse_after not in PLANNER_REUSE_AFTER:
        raise ValueError(f"reuse_after={reuse_after!r}: use one of {', '.join(PLANNER_REUSE_AFTER)}")
    blocks: dict[int, _Recorded] = {}
    earlier_frees = []  # (t, -size): blocks allocated before the iteration and freed in it (the fallback's)
    t = 0
    for typ, win, k, size, flag, bid, stream in events:
        p = pos_of.get(win)
        if p is None:
            continue
        if span[p][0] < 0:
            span[p][0] = t
        span[p][1] = t + 1
        if typ == 0:
            if k != len(sizes[p]):
                raise ValueError(f"window {p} ({layout[p]}): request {k} recorded as number {len(sizes[p])}")
            sizes[p].append(size)
            blocks[bid] = _Recorded(p, k, size, bool(flag), t, stream)
        elif typ == 1 and bid in blocks:  # a free: where and when, and whether another stream still read it
            blocks[bid].freed, blocks[bid].deferred = (p, t), bool(flag)
        elif typ == 1:
            earlier_frees.append((t, -size))
        elif typ == 2 and bid in blocks:  # the deferred free done: the other streams were seen done with it
            blocks[bid].released = (p, t)
        t += 1
    next_pass = [None] * n  # window p -> the first layer pass after it that recorded anything, or None
    for p in range(n - 2, -1, -1):
        q = p + 1
        next_pass[p] = q if layout[q][0] != "gap" and span[q][1] >= 0 else next_pass[q]
    transients: dict[int, list] = {}
    crossing = []
    left: dict[str, list] = {}  # cause -> [requests, bytes, (t, +-size) edges]

    def reuse_point(b: _Recorded) -> tuple[int, int]:
        """Window and time from which the block's bytes go to later requests (`reuse_after`)."""
        if reuse_after == "free" or not b.deferred:
            return b.freed
        lp, lt = b.released or (n - 1, t)  # never seen released: the end of the iteration
        q = next_pass[b.freed[0]]
        if reuse_after == "next_pass" and q is not None and span[q][1] < lt:
            return q, span[q][1]
        return lp, lt

    for b in blocks.values():
        p, k, size, t0 = b.pos, b.k, b.size, b.t0
        (fp, t1), on_stream = b.freed, b.on_stream
        cause = ("side_stream" if not (on_stream or side_streams) else "outlives_iteration" if fp < 0 else None)
        if cause:
            c = left.setdefault(cause, [0, 0, []])
            c[0] += 1
            c[1] += size
            c[2] += [(t0, size), (t1 if fp >= 0 else t, -size)]
            continue
        lp, lt = reuse_point(b)  # the check's window stays fp, the free's
        if on_stream and fp == lp == p and layout[p][0] != "gap":
            transients.setdefault(p, []).append((k, size, t0, lt))
        else:  # level 2's own requests (a side stream's too: level 1's shared plans are one stream's)
            crossing.append((p, k, fp, Request(size, t0, lt)))
    # layer pass -> its transients as (size, start, end), times numbered in the order of their own starts
    # and ends: what else runs in the pass (a side stream's gather, level 2's frees) leaves that order, and
    # so which of them overlap, as it is; passes alike share one solve
    sigs: dict[int, tuple] = {}
    for p, reqs in sorted(transients.items()):
        reqs.sort()
        rank = {v: i for i, v in enumerate(sorted({t for _, _, t0, t1 in reqs for t in (t0, t1)}))}
        sigs[p] = tuple((size, rank[t0], rank[t1]) for _, size, t0, t1 in reqs)
    # time_limit_s is the whole plan's: every rank waits in its next collective for the slowest rank's
    # plan, so each solve's MIP gets the time left divided among the solves left (level 2 the last), and
    # once none is left the greedy plan alone
    deadline = perf_counter() + time_limit_s

    def solve(reqs: list[Request], solves_left: int, **kw) -> MemoryPlan:
        rest = deadline - perf_counter()
        return solve_plan(reqs, max(rest, 1e-3) / solves_left, use_mip=rest > 0, alignment=ALIGNMENT,
                          mip_solver=mip_solver, **kw)

    first: dict[tuple, int] = {}  # each distinct signature -> the first pass with it
    for p, sig in sigs.items():
        first.setdefault(sig, p)
    solved = {sig: solve([Request(*r) for r in sig], len(first) + 1 - i, info=dict(level=1, window=list(layout[p])))
              for i, (sig, p) in enumerate(first.items())}
    level1: dict[int, MemoryPlan] = {p: solved[sig] for p, sig in sigs.items()}
    offs1 = {p: {k: o for (k, *_), o in zip(transients[p], level1[p].offsets)} for p in sigs}
    reqs2 = [Request(level1[p].peak_bytes, span[p][0], span[p][1]) for p in sorted(level1)]
    names = [f"{layout[p][0]}{layout[p][1]}" for p in sorted(level1)]
    reqs2 += [r for *_, r in crossing]
    names += [f"{layout[p][0]}{layout[p][1]}:{k}" for p, k, _, _ in crossing]
    level2 = None
    offsets = [[-1] * len(x) for x in sizes]
    free_at = [[-1] * len(x) for x in sizes]
    if reqs2:
        level2 = solve(reqs2, 1, names=names,
                       info=dict(level=2, windows=n, layer_passes=len(level1), crossing=len(crossing)))
        block = dict(zip(sorted(level1), level2.offsets))
        for p, ks in offs1.items():
            for k, o in ks.items():
                offsets[p][k], free_at[p][k] = block[p] + o, p
        for (p, k, fp, _), o in zip(crossing, level2.offsets[len(level1):]):
            offsets[p][k], free_at[p][k] = o, fp
    # each request's stream as recorded: at replay it must come on the same one (the ghosts assume it)
    streams = [[-1] * len(x) for x in sizes]
    for b in blocks.values():
        streams[b.pos][b.k] = b.stream
    ghosts = _cross_stream_ghosts(sizes, offsets, streams)
    unplanned = {cause: {"requests": count, "bytes": nbytes, "peak_live_bytes": _peak_live(edges)}
                 for cause, (count, nbytes, edges) in sorted(left.items())}
    growth = _peak_live([e for *_, edges in left.values() for e in edges] + earlier_frees)
    return IterationPlan(list(layout), sizes, offsets, free_at, level1, level2, unplanned, streams, ghosts,
                         reuse_after, growth)


def _peak_live(edges: list[tuple[int, int]]) -> int:
    """The most bytes live at once (from 0) over (time, +size at an allocation / -size at a free) edges; at
    one time a free comes before an allocation."""
    live = peak = 0
    for _, d in sorted(edges):
        live += d
        peak = max(peak, live)
    return peak


def _cross_stream_ghosts(sizes, offsets, stream_of) -> list[list[bool]]:
    """Per planned request: whether a planned request of another stream shares any of its bytes (so, the
    plan replaying every iteration, may take them after it is freed). Every pair of different streams
    has a request off the most common stream, so only those are compared against all."""
    where = [(p, k) for p, offs in enumerate(offsets) for k, o in enumerate(offs) if o >= 0]
    ghosts = [[False] * len(x) for x in sizes]
    if not where:
        return ghosts
    off = np.array([offsets[p][k] for p, k in where], dtype=np.int64)
    end = off + np.array([sizes[p][k] for p, k in where], dtype=np.int64)
    st = np.array([stream_of[p][k] for p, k in where], dtype=np.int64)
    values, counts = np.unique(st, return_counts=True)
    if len(values) < 2:
        return ghosts
    flag = np.zeros(len(where), dtype=bool)
    for i in np.nonzero(st != values[np.argmax(counts)])[0]:
        hit = (off < end[i]) & (off[i] < end) & (st != st[i])
        if hit.any():
            flag |= hit
            flag[i] = True
    for (p, k), g in zip(where, flag):
        ghosts[p][k] = bool(g)
    return ghosts


# ---- the runtime: windows around the layers ---------------------------------------------------------

@dataclass
class PlanRuntime:
    """Opens the core's windows (layer passes, and the gaps between them) and turns one recorded
    iteration into the plans every later iteration replays."""
    core: Core
    device: torch.device
    record_iteration: int = 2  # which iteration (0-based, grad-enabled forwards of the model) is recorded
    time_limit_s: float = 60.0
    mip_solver: str = "auto"  # solve_plan's: auto (HiGHS where installed, else CBC) | highs | cbc
    check: bool = False
    side_streams: bool = True  # plan the requests made on other streams than their window's too
    reuse_after: str = "next_pass"  # a freed tensor other streams still read: reused after next_pass | free | release
    # before the plan, the most bytes held at once in managed memory for requests the device cannot hold (0: none)
    overflow_bytes: int = 0
    stream_of: object = None  # () -> the current stream handle (int); CUDA's by default
    stream_names: dict = field(default_factory=dict)  # stream handle -> a name for the report (the swap's streams)
    # what starts an iteration: "layer0" (layer 0's forward), "model" (the model's forward: attach_windows
    # with the model), "step" (the trainer's step, which calls begin_iteration: with gradient accumulation
    # an iteration is every micro-step of one optimizer step, so every iteration repeats)
    iterations: str = "layer0"
    iteration: int = -1
    state: str = "warmup"  # warmup -> recording -> replay (or off)
    plan: IterationPlan | None = None
    open_window: Window | None = None  # the layer pass open now (None: a gap or nothing)
    pos: int = 0  # position of the next window in the iteration
    recorded: list = field(default_factory=list)  # (seq, window) of the recording iteration
    layout_misses: int = 0
    warned: set = field(default_factory=set)
    at_plan: dict = field(default_factory=dict)  # the core's bytes when the plan was made (before the region)
    planning_s: float = 0.0  # how long planning the recorded iteration took (the other ranks wait that long)
    save_dir: str | None = None  # where the plans go as JSON (the run directory), None: not saved
    rank: int = 0
    saved: list = field(default_factory=list)  # the JSON files written

    def __post_init__(self):
        self.core.lib.lt_set_check(int(self.check))
        self.core.lib.lt_set_overflow(self.overflow_bytes)  # until the plan is made (_make_plans)
        try:  # now, not inside a layer's forward hook when the plan is made (see _make_plans)
            importlib.import_module("pulp")
        except ImportError:
            pass  # solve_plan keeps its greedy plan without PuLP
        if self.stream_of is None:
            self.stream_of = lambda: torch.cuda.current_stream(self.device).cuda_stream

    def begin_iteration(self) -> None:
        """A new iteration (the model's forward or the trainer's step starts), whose first window is a gap,
        so what runs before the first layer (the batch, the embedding) belongs to it."""
        if self.state == "off":
            return
        self._next_iteration()
        self._open(("gap", -1))

    def _take_region_again(self) -> None:
        """The core gave the idle region back to the device for a request nothing else could serve (between
        two steps: evaluation, a checkpoint; or in a window whose plan a miss turned off: see
        `region_give_back` in _alloc.c); the iteration's plan needs it again. If what ran meanwhile still
        holds the memory, the fallback serves everything from now on."""
        self.core.lib.lt_empty_cache()
        r = self.core.lib.lt_region_alloc(self.plan.region_bytes)
        if r:
            self._off()
            log.warning("memory plan: the %.2f GiB region, given back to the device for a request nothing else "
                        "could serve, could not be taken again (code %d; %.2f GiB allocated now): the fallback "
                        "allocator serves everything from now on", self.plan.region_bytes / 2**30, r,
                        self.core.stats()["allocated"] / 2**30)
        elif "region" not in self.warned:
            self.warned.add("region")
            log.info("memory plan: the region was given back to the device for a request nothing else could "
                     "serve (between two steps, or after a miss) and taken again (said once; counted in the "
                     "report's region_given_back)")

    def end_iteration(self) -> None:
        """The iteration is over (the trainer's step returned): no window is open until the next one, so
        what runs between steps (evaluation, checkpoints, the export at the end) is neither recorded nor
        matched against the plan; the fallback serves it, and it costs no miss, though it differs from
        one step to the next."""
        if self.state == "off":
            return
        if self.state == "recording":
            self.core.lib.lt_set_record(0)  # the plan is made when the next iteration starts, as without this
        self.open_window = None
        self.core.window_end()

    def begin(self, layer: int, kind: str) -> None:
        if kind == "fwd" and layer == 0 and self.iterations == "layer0":
            self._next_iteration()
        self._open((kind, layer))
        self.open_window = (kind, layer)

    def end(self, layer: int, kind: str) -> None:
        if self.open_window == (kind, layer):
            self.open_window = None
            self._open(("gap", -1))  # what runs until the next pass is a window too (level 2 plans it)

    def _open(self, window: Window) -> None:
        p, pid = self.pos, -1
        self.pos += 1
        if self.state == "replay":
            if p < len(self.plan.layout) and self.plan.layout[p] == window:
                pid = p
            else:
                self.layout_misses += 1
        seq = self.core.window_begin(pid, self.stream_of())
        if self.state == "recording":
            self.recorded.append((seq, window))

    def _next_iteration(self) -> None:
        self.iteration += 1
        self.pos = 0
        if self.state == "recording":
            self.core.lib.lt_set_record(0)
            self._make_plans()
        elif self.state == "warmup" and self.iteration == self.record_iteration:
            self.core.lib.lt_record_clear()
            self.core.lib.lt_set_record(1)
            self.state = "recording"
        elif self.state == "replay" and not self.core.lib.lt_region_base():
            self._take_region_again()
        self.warn_misses()

    def _make_plans(self) -> None:
        self.core.lib.lt_set_overflow(0)  # replayed iterations fit the device, or run out of memory as without
        events = self.core.events()
        self.core.lib.lt_record_clear()
        seqs, layout = [s for s, _ in self.recorded], [w for _, w in self.recorded]
        before = self.core.stats()
        self.core.lib.lt_empty_cache()  # the fallback's cached memory back first: the region needs it
        trimmed = self.core.stats()
        free = self.core.lib.lt_device_free()
        # what the region and the fallback's growth in an iteration can take: the device's free bytes and what
        # the fallback reserves beyond its live bytes (None: unknown, as much as needed). Bytes still in managed
        # memory count as allocated, not reserved: the room leaves them space to come back to the device.
        room = free + trimmed["reserved"] - trimmed["allocated"] if free >= 0 else None
        self.at_plan = {"allocated": before["allocated"], "reserved": before["reserved"],
                        "reserved_peak": before["reserved_peak"], "reserved_after_trim": trimmed["reserved"],
                        "device_free": free, "room": room, "overflowed": before["overflowed"],
                        "overflow_peak": before["overflow_peak"], "overflow_live": before["overflow_bytes"]}
        log.info("memory plan: planning the recorded iteration: %d requests, MIP time limit %.0f s in all (other "
                 "ranks wait for this one in their next collective); %.2f GiB allocated, %.2f GiB reserved by the "
                 "fallback (%.2f GiB after giving back what it caches; peak so far %.2f GiB), %s GiB free on the "
                 "device", sum(1 for e in events if e[0] == 0), self.time_limit_s, before["allocated"] / 2**30,
                 before["reserved"] / 2**30, trimmed["reserved"] / 2**30, before["reserved_peak"] / 2**30,
                 "?" if free < 0 else f"{free / 2**30:.2f}")
        t0 = perf_counter()
        try:
            # `reuse_after` where its plan fits the room; else `free`, the smallest region (on the time left)
            for rule in dict.fromkeys((self.reuse_after, "free")):
                limit = max(self.time_limit_s - (perf_counter() - t0), 0.0)
                plan = plan_recorded_iteration(events, layout, seqs, time_limit_s=limit,
                                               side_streams=self.side_streams, mip_solver=self.mip_solver,
                                               reuse_after=rule)
                need = plan.region_bytes + plan.fallback_growth_bytes
                self.at_plan["need"] = need
                if room is None or need <= room:
                    break
                log.warning("memory plan: with reuse_after=%s the plan needs %.2f GiB (a %.2f GiB region and %.2f "
                            "GiB more for the fallback in an iteration), %.2f GiB more than the %.2f GiB there is "
                            "room for", rule, need / 2**30, plan.region_bytes / 2**30,
                            plan.fallback_growth_bytes / 2**30, (need - room) / 2**30, room / 2**30)
        except ValueError as e:
            self._off()
            log.warning("memory plan: cannot plan the recorded iteration (%s); the fallback allocator serves "
                        "everything", e)
            return
        finally:
            # The plan is made inside a forward hook (the model's, or layer 0's), with the model's frames on
            # the stack. A library that catches an exception and keeps its traceback in a reference cycle
            # (PuLP's first import probes optional solvers that way) pins those frames, and with them the
            # activations they hold once they return (the layer outputs, the final norm's input and output):
            # measured on an H200, 3 GiB held for good, their planned slots refused every iteration. Collect
            # such cycles now.
            gc.collect()
            self.planning_s = perf_counter() - t0
        if not plan.region_bytes:
            self._off()
            log.warning("memory plan: the recorded iteration has no request to plan; the fallback allocator "
                        "serves everything")
            return
        if room is not None and need > room:
            self._off()
            log.warning("memory plan: no plan fits beside what the fallback holds, so the fallback allocator "
                        "serves everything (as without the plan: the run goes on). A plan serves where there "
                        "is more room: a shorter sequence, more GPUs, or more activations swapped%s",
                        "" if not before["overflowed"] else
                        f". The iterations before the plan needed managed memory (up to "
                        f"{before['overflow_peak'] / 2**30:.2f} GiB at once) where the device was full, so the next "
                        f"step most likely runs out of memory")
            return
        if plan.reuse_after != self.reuse_after:
            log.warning("memory plan: reuse_after=free serves instead of %s, whose plan does not fit: reused memory "
                        "waits for other streams' copies and collectives (slower steps, docs/memory-planner.md)",
                        self.reuse_after)
        r = self.core.lib.lt_region_alloc(plan.region_bytes)
        if r:
            self._off()
            log.warning("memory plan: the %.2f GiB region could not be allocated (code %d); the fallback "
                        "allocator serves everything", plan.region_bytes / 2**30, r)
            return
        for p in range(len(plan.layout)):
            self.core.set_plan(p, plan.sizes[p], plan.offsets[p], plan.free_at[p], plan.streams[p], plan.ghosts[p])
        self.plan, self.state = plan, "replay"
        self.core.lib.lt_pool_keep(1)
        log.info("memory plan: %s", self.summary())
        if before["overflow_bytes"]:
            log.warning("memory plan: %.2f GiB allocated in managed memory before the plan are still held (not "
                        "freed in the recorded iteration: a tensor kept for good); the driver pages them while the "
                        "device is full", before["overflow_bytes"] / 2**30)
        if self.save_dir:
            self._save(plan)

    def _save(self, plan: IterationPlan) -> None:
        """Level 2 and the largest level-1 plan as JSON (`tools/plan_memory.py --png P --plan FILE` draws
        them); a write that fails is warned, not fatal: the plan in memory is what serves."""
        largest = max(plan.level1.values(), key=lambda x: x.peak_bytes, default=None)
        for part, mp in (("level2", plan.level2), ("level1_largest", largest)):
            if mp is not None:
                self._write(part, mp.to_json)

    def _write(self, part: str, write) -> str | None:
        """`write(path)` into the run directory as memory_plan_runtime_rank{rank}_{part}.json, whole or not
        at all (a temporary file renamed); a failure is warned, not fatal."""
        out = Path(self.save_dir)
        path = out / f"memory_plan_runtime_rank{self.rank}_{part}.json"
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            write(tmp)
            tmp.replace(path)
        except OSError as e:
            log.warning("memory plan: could not save %s to %s (%s); training goes on", part, out, e)
            return None
        self.saved.append(str(path))
        return str(path)

    def report(self) -> dict:
        """What the plan did on this rank: its state and summary, the core's counters (requests served,
        left to the fallback, missed, refused; bytes), the fallback's bytes when the plan was made, the
        most frequent refusals and lifetime breaks, and why requests were left out of the plan."""
        reuse_after = self.plan.reuse_after if self.plan else self.reuse_after  # the rule that serves (see _make_plans)
        return {"rank": self.rank, "state": self.state, "reuse_after": reuse_after, "summary": self.summary(),
                "planning_s": self.planning_s, "at_plan": self.at_plan, "layout_misses": self.layout_misses,
                "refusals": self.refusal_report(), "lifetimes": self.lifetime_report(),
                "unplanned": self.plan.unplanned if self.plan else {}, "waits": self.wait_report(), **self.core.stats()}

    def wait_report(self) -> list[dict]:
        """Which stream the plan's reuse made wait for which, and how often (`Core.wait_pairs`), most first:
        a stream that queues far ahead of the one waiting for it (a communication stream, say) holds that
        one back. Streams are named `main` (the windows' stream, where the model computes), by
        `stream_names` (the swap's copy streams), or by handle (NCCL's, DeepSpeed's)."""
        main = self.stream_of()

        def name(h):
            return ("main" if h == main else "(others)" if h == -1 else self.stream_names.get(h) or f"stream {h:#x}")

        pairs = sorted(self.core.wait_pairs(), key=lambda x: -(x[2] + x[3]))
        return [{"waiting": name(w), "on": name(o), "reuse_waits": r, "cross_stream_waits": c} for w, o, r, c in pairs]

    def save_report(self) -> str | None:
        """`report()` as memory_plan_runtime_rank{rank}_report.json in the run directory (the trainer
        writes it when training ends, on every rank: each rank plans its own requests); its path."""
        if not self.save_dir:
            return None
        rep = self.report()

        def write(path):
            path.write_text(json.dumps(rep, indent=1))

        return self._write("report", write)

    def _off(self) -> None:
        """No plan will serve: the fallback keeps what it frees from now on (the pool, like a caching allocator),
        and nothing overflows into managed memory."""
        self.state = "off"
        self.core.lib.lt_pool_keep(1)
        self.core.lib.lt_set_overflow(0)

    def summary(self) -> str:
        p = self.plan
        if p is None:
            return f"no plan ({self.state})"
        l1 = sorted({id(x): x for x in p.level1.values()}.values(), key=lambda x: -x.peak_bytes)
        worst1 = max((x.peak_bytes / max(x.lower_bound_bytes, 1) for x in l1), default=1.0)
        l2 = p.level2
        return (f"region {p.region_bytes / 2**30:.3f} GiB for {p.planned():,} of the iteration's "
                f"{sum(map(len, p.sizes)):,} requests in {len(p.layout)} windows; level 1: {len(p.level1)} layer "
                f"passes, {len(l1)} distinct plans, largest peak {l1[0].peak_bytes / 2**30 if l1 else 0:.3f} GiB, "
                f"worst peak/lower bound {worst1:.4f}; level 2: {len(l2.requests)} requests, peak "
                f"{l2.peak_bytes / 2**30:.3f} GiB, lower bound {l2.lower_bound_bytes / 2**30:.3f} GiB "
                f"(ratio {l2.ratio:.4f}, {l2.solver}); reuse_after={p.reuse_after}; the fallback grows "
                f"{p.fallback_growth_bytes / 2**30:.3f} GiB in an iteration; planned in {self.planning_s:.1f} s")

    def refusal_report(self, top: int = 10) -> list[dict]:
        """The most frequent refusals: which planned request found its slot taken, and by which block
        (both as window, request index and size): the tensors that outlived their recorded lifetime."""
        if self.plan is None:
            return []

        def where(p, k):
            if not 0 <= p < len(self.plan.layout):
                return {"window": None, "k": k}
            size = self.plan.sizes[p][k] if 0 <= k < len(self.plan.sizes[p]) else None
            return {"window": p, "pass": self._pass(p), "k": k, "size": size}

        return [{"count": c, "refused": where(p, k),
                 "in_the_way": ({**where(bp, bk), "freed_waiting_on_stream": bool(fr)} if bp >= 0
                                else {"stream_wait_failed": True})}
                for (p, k, _, bp, bk, fr), c in Counter(self.core.refusals()).most_common(top)]

    def lifetime_report(self, top: int = 10) -> list[dict]:
        """Check mode: the planned requests most often freed in another window than the plan's (the
        tensors whose lifetime at replay differs from the recorded one), with both windows."""
        if self.plan is None:
            return []

        def name(p):
            return f"{p}:{self._pass(p)}" if 0 <= p < len(self.plan.layout) else None

        return [{"count": c, "request": {"window": name(p), "k": k, "size": size}, "planned_free": name(pf),
                 "freed_in": name(af)} for (p, k, size, pf, af), c in Counter(self.core.lifetimes()).most_common(top)]

    def _pass(self, p: int) -> str:
        """Window p of the plan as a name: fwd3, bwd0, gap."""
        kind, layer = self.plan.layout[p]
        return f"{kind}{'' if layer < 0 else layer}"

    def warn_misses(self) -> None:
        s = self.core.stats()
        if s["overflowed"] and "overflow" not in self.warned:
            self.warned.add("overflow")
            log.warning("memory plan: the device was full before the plan serves: %d requests (up to %.2f GiB at "
                        "once) went to CUDA managed memory, which the driver pages to the host, so these steps are "
                        "slower; the plan is made from iteration %d and must fit the device "
                        "(memory.planner.warmup_overflow_gib)", s["overflowed"], s["overflow_peak"] / 2**30,
                        self.record_iteration)
        s["layout"] = self.layout_misses
        reasons = {"miss_size": "a request's size differs from the plan (shape or sequence length changed)",
                   "miss_length": "a window made more requests than were recorded",
                   "miss_stream": "a planned request came on another stream",
                   "refused_overlap": "a planned offset was still in use (a tensor outlived its recorded lifetime)",
                   "layout": "the iteration's layer passes differ from the recorded ones",
                   "check_lifetime": "check: a planned block was freed in another window than planned",
                   "check_leaked": "check: a planned block was still live when the window that frees it ended"}
        for key, why in reasons.items():
            if s[key] and key not in self.warned:
                self.warned.add(key)
                log.warning("memory plan: %s (%d times so far); those requests and the rest of their window went "
                            "to the fallback allocator", why, s[key])


class _OnGradient(torch.autograd.Function):
    """Identity whose backward first calls `hook()`: a window edge in the backward pass (on a layer's
    output, its gradient's arrival opens the layer's backward window; on its input, the input gradient
    being made closes it)."""

    @staticmethod
    def forward(ctx, hook, x):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.hook()
        return None, g


def _in_backward() -> bool:
    """True inside an autograd backward (a checkpoint recomputing a layer's forward)."""
    return torch._C._current_graph_task_id() != -1


def attach_windows(layers: nn.ModuleList, runtime: PlanRuntime, model: nn.Module | None = None) -> None:
    """Make each layer's forward and backward a window of `runtime`, by forward hooks (outermost: they
    fire around whatever wraps the layer; module names and state dicts are unchanged). A forward run
    inside a backward (a recomputation) is part of that backward's window; eval forwards (no grad) are
    no window at all.

    With `model` (the module whose forward is one training forward), each of its forwards starts an
    iteration (a hook that runs before any other of its pre-forward hooks, ZeRO-3's gathers included),
    unless the trainer's steps do (`runtime.iterations == "step"`); without it, layer 0's forward does,
    and what runs before it (the embedding, whose output layer 0 reads) belongs to the previous iteration:
    it outlives that one and the fallback serves it (measured: 1 GiB at 128K tokens of the 8B shape)."""
    if model is not None:
        if runtime.iterations == "layer0":
            runtime.iterations = "model"

        def start(_mod, _args):
            if (runtime.iterations == "model" and torch.is_grad_enabled() and runtime.state != "off"
                    and not _in_backward()):
                runtime.begin_iteration()

        model.register_forward_pre_hook(start, prepend=True)
    for i, layer in enumerate(layers):
        opened = []

        def pre(_mod, args, kwargs, i=i, opened=opened):
            rt = runtime
            if not torch.is_grad_enabled() or rt.state == "off" or _in_backward():
                opened.append(False)
                return None
            x, *rest = args
            if isinstance(x, torch.Tensor) and x.requires_grad:
                args = (_OnGradient.apply(partial(rt.end, i, "bwd"), x), *rest)
            rt.begin(i, "fwd")
            opened.append(True)
            return args, kwargs

        def post(_mod, _args, _kwargs, out, i=i, opened=opened):
            if not (opened and opened.pop()):
                return None
            runtime.end(i, "fwd")
            if isinstance(out, torch.Tensor) and out.requires_grad:
                return _OnGradient.apply(partial(runtime.begin, i, "bwd"), out)
            return None

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.register_forward_hook(post, with_kwargs=True)


# ---- the process's CUDA allocator -------------------------------------------------------------------

_SHIM = r"""
#include <cstdio>
#include <exception>
#include <torch/extension.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

namespace P = torch::cuda::CUDAPluggableAllocator;
using AllocFn = void* (*)(size_t, int, void*);
using FreeFn = void (*)(void*, size_t, int, void*);
using RecordFn = void (*)(void*, void*);
using StatsFn = int (*)(int64_t*, int);
using ResetFn = void (*)();
using EmptyFn = void (*)();

// torch's pluggable allocator with the core's statistics behind torch.cuda.memory_stats() and friends
// (DeepSpeed, the trainer's metrics and the benchmarks read them).
struct LongtrainAllocator : P::CUDAPluggableAllocator {
  StatsFn stats;
  ResetFn reset;
  LongtrainAllocator(std::function<void*(size_t, int, cudaStream_t)> a,
                     std::function<void(void*, size_t, int, cudaStream_t)> f, StatsFn s, ResetFn r)
      : P::CUDAPluggableAllocator(std::move(a), std::move(f)), stats(s), reset(r) {}
  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex) override {
    int64_t v[64] = {0};
    stats(v, 64);
    c10::CachingDeviceAllocator::DeviceStats d;
    for (size_t i = 0; i < d.allocated_bytes.size(); i++) {
      d.allocated_bytes[i].current = d.active_bytes[i].current = d.requested_bytes[i].current = i ? 0 : v[0];
      d.allocated_bytes[i].peak = d.active_bytes[i].peak = d.requested_bytes[i].peak = i ? 0 : v[1];
      d.reserved_bytes[i].current = i ? 0 : v[2];
      d.reserved_bytes[i].peak = i ? 0 : v[3];
    }
    d.num_alloc_retries = v[15];
    return d;
  }
  void resetPeakStats(c10::DeviceIndex) override { reset(); }
  void resetAccumulatedStats(c10::DeviceIndex) override {}
};

// torch's own caching allocator as the core's fallback (memory.planner.fallback=caching): captured before the
// planned allocator replaces it, and called through these. No C++ exception may cross into the C core.
namespace CA = c10::cuda::CUDACachingAllocator;
static CA::CUDAAllocator* native = nullptr;
static c10::DeviceIndex native_device = 0;
// Out of memory is a null (the core then retries as it does with the pool); any other error is kept and
// rethrown by the allocation hook once the core has returned, so it surfaces as itself.
static thread_local std::exception_ptr native_error;
static void* native_alloc(size_t n, void* s) {
  try {
    return native->raw_alloc_with_stream(n, reinterpret_cast<cudaStream_t>(s));
  } catch (const c10::OutOfMemoryError&) {
    return nullptr;
  } catch (...) {
    native_error = std::current_exception();
    return nullptr;
  }
}
static void native_free(void* p, size_t, void*) {
  try { native->raw_delete(p); } catch (...) {}
}
static int64_t native_reserved(int peak) {
  try {
    auto r = native->getDeviceStats(native_device).reserved_bytes[0];
    return peak ? r.peak : r.current;
  } catch (...) { return 0; }
}
static void native_reset_peak() { try { native->resetPeakStats(native_device); } catch (...) {} }
static void native_trim() { try { native->emptyCache(); } catch (...) {} }
using SetFallbackFn = void (*)(void* (*)(size_t, void*), void (*)(void*, size_t, void*), int64_t (*)(int),
                               void (*)(), void (*)());

void install(int64_t alloc_addr, int64_t free_addr, int64_t record_addr, int64_t stats_addr, int64_t reset_addr,
             int64_t empty_addr, int64_t set_fallback_addr, int64_t device) {
  CA::CUDAAllocator* previous = CA::get();  // torch's own, still uninitialised (CUDA has not started)
  auto af = reinterpret_cast<AllocFn>(alloc_addr);
  auto ff = reinterpret_cast<FreeFn>(free_addr);
  auto rf = reinterpret_cast<RecordFn>(record_addr);
  auto alloc = std::make_shared<LongtrainAllocator>(
      [af](size_t n, int dev, cudaStream_t s) -> void* {
        void* p = af(n, dev, reinterpret_cast<void*>(s));
        if (p == nullptr && native_error) {  // the caching allocator behind the plan failed otherwise
          std::exception_ptr e = native_error;
          native_error = nullptr;
          std::rethrow_exception(e);
        }
        if (p == nullptr && n != 0) {
          // The message is formatted with snprintf and the error built by c10's own (out-of-line)
          // constructor: formatting a number through TORCH_CHECK's ostream inside this extension crashed
          // (SIGSEGV in std::codecvt, seen on the H200 image); torch's own code formats it safely.
          char msg[160];
          snprintf(msg, sizeof msg, "CUDA out of memory (longtrain planned allocator): %zu bytes could not be "
                   "allocated on device %d", n, dev);
          throw c10::OutOfMemoryError(c10::SourceLocation{__func__, __FILE__, 0}, std::string(msg));
        }
        return p;
      },
      [ff](void* p, size_t n, int dev, cudaStream_t s) { ff(p, n, dev, reinterpret_cast<void*>(s)); },
      reinterpret_cast<StatsFn>(stats_addr), reinterpret_cast<ResetFn>(reset_addr));
  alloc->set_record_stream_fn([rf](void* p, cudaStream_t s) { rf(p, reinterpret_cast<void*>(s)); });
  alloc->set_reset_fn(reinterpret_cast<EmptyFn>(empty_addr));  // torch.cuda.empty_cache()
  P::changeCurrentAllocator(alloc);  // refuses an allocator already initialised: so the fallback's init comes after
  if (set_fallback_addr) {
    native = previous;
    native_device = static_cast<c10::DeviceIndex>(device);
    native->init(c10::cuda::device_count());  // torch initialises the current (planned) allocator, not this one
    reinterpret_cast<SetFallbackFn>(set_fallback_addr)(native_alloc, native_free, native_reserved, native_reset_peak,
                                                       native_trim);
  }
}
"""

_ACTIVE: Core | None = None


def _cudart_path() -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "libcudart.so" in os.path.basename(path):
                return path
    raise RuntimeError("the CUDA runtime library (libcudart) is not loaded by this torch")


def install_cuda_allocator(device_index: int = 0, fallback: str = "caching") -> Core:
    """Make the planned allocator this process's CUDA allocator (before CUDA allocates anything).

    `fallback`: what serves the requests the plan does not: "pool", CUDA's stream-ordered allocator
    (cudaMallocAsync; it gives freed memory back until the plan serves); "caching", torch's own caching
    allocator, in the mode PYTORCH_CUDA_ALLOC_CONF sets (`memory.allocator`), so the warm-up and everything
    unplanned are placed as in a run without the plan."""
    global _ACTIVE
    if fallback not in PLANNER_FALLBACKS:
        raise ValueError(f"memory.planner.fallback={fallback!r}: use one of {', '.join(PLANNER_FALLBACKS)}")
    if _ACTIVE is not None:
        return _ACTIVE
    if torch.cuda.is_initialized():
        raise RuntimeError("the planned allocator must be installed before CUDA starts; it started already")
    core = Core(build_core())
    r = core.lib.lt_init_cuda(_cudart_path().encode(), device_index)
    if r:
        raise RuntimeError(f"the planned allocator could not use the CUDA runtime (code {r})")
    from torch.utils.cpp_extension import load_inline
    log.info("building the planned allocator's torch shim (once per torch version; about a minute)")
    shim = load_inline(name=f"longtrain_alloc_shim_{hashlib.sha256(_SHIM.encode()).hexdigest()[:10]}",
                       cpp_sources=[_SHIM], functions=["install"], with_cuda=True, verbose=False)
    shim.install(core.address("lt_malloc"), core.address("lt_free"), core.address("lt_record_stream"),
                 core.address("lt_stats"), core.address("lt_reset_peaks"), core.address("lt_empty_cache"),
                 core.address("lt_set_fallback") if fallback == "caching" else 0, device_index)
    _ACTIVE = core
    return core


def active_core() -> Core | None:
    return _ACTIVE


__all__ = ["Core", "IterationPlan", "PlanRuntime", "active_core", "attach_windows", "build_core",
           "host_core", "install_cuda_allocator", "plan_recorded_iteration"]
