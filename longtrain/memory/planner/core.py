"""Offline dynamic storage allocation: requests with sizes and lifetimes -> offsets in one region.

Pure, deterministic Python (PuLP for the MIP: HiGHS where highspy is installed, else CBC); no torch.
DESIGN.md section 3, "MEMO bi-level MIP".

A request i has a size s_i (bytes) and a half-open lifetime [t_i, e_i) in event order. Two requests
*conflict* when their lifetimes overlap (t_i < e_j and t_j < e_i); conflicting requests must not overlap
in address. The peak of a plan is max_i (A_i + s_i). No plan beats the lower bound: the largest number
of bytes live at one moment. Finding the minimum peak is NP-hard (it is a 2-D strip packing with fixed
x-positions), so we
  1. run a greedy best-fit heuristic over a few orderings and keep the best (fast, usually within a few
     percent of the bound),
  2. stop there when greedy meets the lower bound (provably optimal) or is within `mip_gap` of it,
  3. otherwise solve MEMO's MIP with PuLP under a time limit, warm-started from the greedy plan (so the
     solver always holds an incumbent at least as good), and keep whichever plan is better. The solver
     (`mip_solver`): HiGHS where highspy is installed (`pip install longtrain[highs]`), else CBC, which
     PuLP ships. On random traces HiGHS proved the optimum in well under a second where CBC ran into its
     10 s limit (tools/bench_planner_solvers.py, docs/perf-log.md).
Every returned plan is re-checked (`MemoryPlan.validate`): no two conflicting requests overlap, every
request lies below the peak.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from longtrain.config.schema import PLANNER_MIP_SOLVERS


@dataclasses.dataclass(frozen=True)
class Request:
    """An allocation of `size` bytes, live over the half-open event interval [start, end)."""

    size: int
    start: int
    end: int

    def __post_init__(self):
        for name in ("size", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Request.{name} must be an int, got {v!r} ({type(v).__name__})")
        if self.size <= 0:
            raise ValueError(f"Request.size={self.size} must be > 0 bytes (drop empty requests: they need no memory)")
        if self.start < 0:
            raise ValueError(f"Request.start={self.start} must be >= 0 (events are numbered from 0)")
        if self.end <= self.start:
            raise ValueError(f"Request lifetime [start={self.start}, end={self.end}) is empty: end must be > start")

    def conflicts(self, other: "Request") -> bool:
        return self.start < other.end and other.start < self.end


def _check_requests(requests: Sequence[Request]) -> list[Request]:
    reqs = list(requests)
    for i, r in enumerate(reqs):
        if not isinstance(r, Request):
            raise ValueError(f"requests[{i}] is {type(r).__name__}, not a longtrain.memory.planner.Request")
    return reqs


def lower_bound(requests: Sequence[Request]) -> int:
    """Max over time of the bytes live at once: no plan can have a smaller peak."""
    events = []
    for r in requests:
        events.append((r.start, 1, r.size))
        events.append((r.end, 0, -r.size))  # at equal times frees (0) sort before allocations (1): half-open
    live = best = 0
    for _, _, d in sorted(events):
        live += d
        best = max(best, live)
    return best


def conflict_pairs(requests: Sequence[Request]) -> list[tuple[int, int]]:
    """Index pairs (i < j) of requests whose lifetimes overlap, by a sweep over start times."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].start, i))
    pairs = []
    active: list[int] = []
    for i in order:
        r = requests[i]
        active = [j for j in active if requests[j].end > r.start]
        pairs.extend((min(i, j), max(i, j)) for j in active)
        active.append(i)
    return sorted(pairs)


def _neighbours(requests: Sequence[Request], pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    nb: list[list[int]] = [[] for _ in requests]
    for i, j in pairs:
        nb[i].append(j)
        nb[j].append(i)
    return nb


def _place_first_fit(size: int, busy: list[tuple[int, int]]) -> int:
    """Lowest offset where [off, off+size) misses every (lo, hi) interval in busy."""
    off = 0
    for lo, hi in sorted(busy):
        if lo - off >= size:
            return off
        off = max(off, hi)
    return off


def _place_best_fit(size: int, busy: list[tuple[int, int]]) -> int:
    """The smallest gap that holds size (lowest such gap on ties), else the top of everything."""
    off, best, best_gap = 0, None, None
    for lo, hi in sorted(busy):
        gap = lo - off
        if gap >= size and (best_gap is None or gap < best_gap):
            best, best_gap = off, gap
        off = max(off, hi)
    return off if best is None else best


# Orderings tried by the greedy heuristic. Big and long-lived first is the classic choice for
# offline storage allocation; start order mimics an online allocator; the others break ties the
# instances we traced are sensitive to. All are deterministic (index is the last key).
_ORDERS = {
    "size": lambda r, i: (-r.size, r.start, i),
    "area": lambda r, i: (-r.size * (r.end - r.start), i),
    "length": lambda r, i: (-(r.end - r.start), -r.size, i),
    "start": lambda r, i: (r.start, -r.size, i),
}


_SEARCH_WORK = 2_000_000  # greedy local search budget, in request + neighbour visits


def greedy_offsets(requests: Sequence[Request], alignment: int = 1, *, search_iters: int = 0,
                   seed: int = 0) -> tuple[list[int], str]:
    """Deterministic greedy: for each ordering and fit rule, place every request at the offset the rule
    picks among the already placed requests it conflicts with; keep the lowest peak. Then, for
    `search_iters` rounds, move a request that touches the peak to an earlier place in the order (a
    seeded choice) and re-place everything, keeping orders that do not raise the peak: requests on the
    critical path get placed lower. Returns (offsets, "greedy/<ordering>-<fit>[+search]")."""
    reqs = _check_requests(requests)
    if not reqs:
        return [], "greedy/empty"
    sizes = [_round_up(r.size, alignment) for r in reqs]
    pairs = conflict_pairs(reqs)
    nb = _neighbours(reqs, pairs)
    # One round re-places everything (work ~ requests + 2 x pairs): cap the rounds by total work, a
    # deterministic budget, so a flat whole-iteration trace (3706 requests, 1.4M pairs) stays fast.
    search_iters = min(search_iters, max(1, _SEARCH_WORK // (len(reqs) + 2 * len(pairs)))) if search_iters else 0

    def run(order, fit):
        offs: list[int] = [-1] * len(reqs)
        for i in order:
            busy = [(offs[j], offs[j] + sizes[j]) for j in nb[i] if offs[j] >= 0]
            offs[i] = _round_up(fit(sizes[i], busy), alignment)
        return max(o + s for o, s in zip(offs, sizes)), offs

    best = None
    for oname, key in _ORDERS.items():
        order = sorted(range(len(reqs)), key=lambda i: key(reqs[i], i))
        for fname, fit in (("first", _place_first_fit), ("best", _place_best_fit)):
            peak, offs = run(order, fit)
            if best is None or peak < best[0]:
                best = (peak, offs, f"greedy/{oname}-{fname}", order, fit)
    peak, offs, name, order, fit = best
    lb = lower_bound([Request(s, r.start, r.end) for s, r in zip(sizes, reqs)])
    rng = random.Random(seed)
    cur_peak, cur_offs, cur_order = peak, offs, list(order)
    for _ in range(search_iters):
        if peak <= lb:
            break
        critical = [i for i in range(len(reqs)) if cur_offs[i] + sizes[i] == cur_peak]
        i = rng.choice(critical)
        pos = cur_order.index(i)
        new_order = cur_order[:pos] + cur_order[pos + 1:]
        new_order.insert(rng.randrange(0, pos + 1), i)
        p2, o2 = run(new_order, fit)
        if p2 <= cur_peak:  # ties accepted: the search drifts across plateaus
            cur_peak, cur_offs, cur_order = p2, o2, new_order
            if p2 < peak:
                peak, offs, name = p2, o2, best[2] + "+search"
    return offs, name


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclasses.dataclass
class MemoryPlan:
    """Offsets for requests in one region. offsets[i] is requests[i]'s byte offset."""

    requests: list[Request]
    offsets: list[int]
    peak_bytes: int
    lower_bound_bytes: int
    solver: str = ""  # what produced the offsets, e.g. "mip/optimal", "greedy/size-first (mip not better)"
    solve_time_s: float = 0.0
    greedy_peak_bytes: int = 0  # the best greedy plan's peak (the MIP's warm start and upper bound)
    alignment: int = 1  # every offset is a multiple of this; sizes are rounded up to it
    names: list[str] = dataclasses.field(default_factory=list)  # optional label per request
    info: dict = dataclasses.field(default_factory=dict)  # free-form provenance (trace shape, level, ...)

    @property
    def ratio(self) -> float:
        """peak / lower bound (1.0 = provably optimal)."""
        return self.peak_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0

    def validate(self) -> None:
        """Raise AssertionError if two conflicting requests overlap in address or one exceeds the peak."""
        assert len(self.offsets) == len(self.requests), (len(self.offsets), len(self.requests))
        for i, (r, o) in enumerate(zip(self.requests, self.offsets)):
            assert o >= 0 and o % self.alignment == 0, (i, o, self.alignment)
            assert o + r.size <= self.peak_bytes, f"request {i} [{o}, {o + r.size}) above peak {self.peak_bytes}"
        for i, j in conflict_pairs(self.requests):
            a, b = self.offsets[i], self.offsets[j]
            assert a + self.requests[i].size <= b or b + self.requests[j].size <= a, \
                f"requests {i} and {j} are live together and overlap in address: {a}+{self.requests[i].size}, {b}"

    def table(self, title: str = "plan") -> str:
        rows = [("requests", f"{len(self.requests)}"),
                ("lower bound", _fmt_bytes(self.lower_bound_bytes)),
                ("plan peak", _fmt_bytes(self.peak_bytes)),
                ("ratio peak/LB", f"{self.ratio:.4f}"),
                ("greedy peak", _fmt_bytes(self.greedy_peak_bytes)),
                ("solver", self.solver),
                ("solve time", f"{self.solve_time_s:.2f} s")]
        w = max(len(k) for k, _ in rows)
        return "\n".join([title] + [f"  {k:<{w}}  {v}" for k, v in rows])

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "longtrain.memory_plan/1", "peak_bytes": self.peak_bytes,
                "lower_bound_bytes": self.lower_bound_bytes, "ratio": self.ratio, "solver": self.solver,
                "solve_time_s": self.solve_time_s, "greedy_peak_bytes": self.greedy_peak_bytes,
                "alignment": self.alignment, "info": self.info,
                "requests": [{"size": r.size, "start": r.start, "end": r.end, "offset": o,
                              **({"name": self.names[k]} if self.names else {})}
                             for k, (r, o) in enumerate(zip(self.requests, self.offsets))]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryPlan":
        if d.get("format") != "longtrain.memory_plan/1":
            raise ValueError(f"not a longtrain memory plan (format={d.get('format')!r}, "
                             "expected 'longtrain.memory_plan/1')")
        reqs = [Request(int(x["size"]), int(x["start"]), int(x["end"])) for x in d["requests"]]
        names = [x["name"] for x in d["requests"]] if d["requests"] and "name" in d["requests"][0] else []
        plan = cls(reqs, [int(x["offset"]) for x in d["requests"]], int(d["peak_bytes"]),
                   int(d["lower_bound_bytes"]), d.get("solver", ""), float(d.get("solve_time_s", 0.0)),
                   int(d.get("greedy_peak_bytes", 0)), int(d.get("alignment", 1)), names, dict(d.get("info", {})))
        try:
            plan.validate()
        except AssertionError as e:
            raise ValueError(f"memory plan is inconsistent: {e}") from None
        return plan

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "MemoryPlan":
        """Load from a JSON string or a file path."""
        s = str(text_or_path)
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        return cls.from_dict(json.loads(text))


def _fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.3f} GiB ({n} B)"
    if n >= 2**20:
        return f"{n / 2**20:.3f} MiB ({n} B)"
    return f"{n} B"


def _compact(requests: Sequence[Request], sizes: Sequence[int], order_below: dict[tuple[int, int], bool],
             pairs: Sequence[tuple[int, int]], alignment: int) -> list[int]:
    """Exact offsets from a pairwise order: every request sits right on top of the highest request that
    must lie below it (a longest path in the DAG of 'below' relations). Never higher than the offsets the
    order came from, and integral whatever the MIP's floating-point tolerances were."""
    below: list[list[int]] = [[] for _ in requests]
    indeg = [0] * len(requests)
    succ: list[list[int]] = [[] for _ in requests]
    for i, j in pairs:
        lo, hi = (i, j) if order_below[(i, j)] else (j, i)
        below[hi].append(lo)
        succ[lo].append(hi)
        indeg[hi] += 1
    offs = [0] * len(requests)
    ready = sorted(i for i in range(len(requests)) if indeg[i] == 0)
    seen = 0
    while ready:
        i = ready.pop(0)
        seen += 1
        offs[i] = _round_up(max((offs[j] + sizes[j] for j in below[i]), default=0), alignment)
        for k in succ[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                ready.append(k)
    assert seen == len(requests), "the pairwise order has a cycle"
    return offs


def _order_from_offsets(offsets: Sequence[int], pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bool]:
    return {(i, j): (offsets[i], i) < (offsets[j], j) for i, j in pairs}


def mip_solver_name(choice: str = "auto") -> str:
    """The MIP solver `choice` resolves to here: "highs" or "cbc" ("auto": HiGHS where highspy is
    installed, else CBC). An explicit "highs" without highspy is an error naming the fix."""
    if choice not in PLANNER_MIP_SOLVERS:
        raise ValueError(f"mip_solver={choice!r}: use one of {', '.join(PLANNER_MIP_SOLVERS)}")
    if choice == "cbc":
        return "cbc"
    if importlib.util.find_spec("highspy") is not None:
        return "highs"
    if choice == "highs":
        raise ValueError("mip_solver='highs' needs the highspy package: `pip install longtrain[highs]` "
                         "(or mip_solver=auto, which uses CBC without it)")
    return "cbc"


def solve_plan(requests: Sequence[Request], time_limit_s: float = 60.0, *, alignment: int = 1, seed: int = 0,
               use_mip: bool = True, max_pairs: int = 200_000, search_iters: int = 300, mip_gap: float = 1e-3,
               names: Sequence[str] | None = None, info: dict | None = None,
               mip_solver: str = "auto") -> MemoryPlan:
    """Plan offsets for `requests` minimising the peak. See the module docstring for the method.

    time_limit_s: the MIP solver's wall-clock limit (the greedy plan is kept if the MIP does not beat it);
    alignment: offsets are multiples of it and sizes rounded up to it (512 = the CUDA caching allocator's);
    seed: the solver's random seed (with one thread and a limit that is not hit, the result is deterministic);
    max_pairs: skip the MIP when more lifetime-overlapping pairs than this (each is one binary);
    search_iters: rounds of the greedy's local search (seeded by `seed`; 0 = orderings only);
    mip_gap: skip the MIP when the greedy peak is within this fraction of the lower bound (no plan beats
    the bound, so CBC could gain at most that much; 0 = only at the bound). The runtime plans inside a
    training step, where CBC used its whole time limit to confirm a greedy plan 0.01% above the bound;
    mip_solver: "auto" (HiGHS where highspy is installed, else CBC), "highs" or "cbc" (`mip_solver_name`).
    """
    t0 = time.perf_counter()
    reqs = _check_requests(requests)
    if not (isinstance(alignment, int) and alignment >= 1):
        raise ValueError(f"alignment={alignment!r} must be an int >= 1 (bytes)")
    if not 0 <= mip_gap < 1:
        raise ValueError(f"mip_gap={mip_gap!r} must be in [0, 1)")
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s={time_limit_s} must be > 0 seconds")
    if names is not None and len(names) != len(reqs):
        raise ValueError(f"names has {len(names)} entries for {len(reqs)} requests")
    mip = mip_solver_name(mip_solver)
    sizes = [_round_up(r.size, alignment) for r in reqs]
    lb = lower_bound([Request(s, r.start, r.end) for s, r in zip(sizes, reqs)]) if reqs else 0
    lb = _round_up(lb, alignment)
    offs, gname = greedy_offsets(reqs, alignment, search_iters=search_iters, seed=seed)
    gpeak = max((o + s for o, s in zip(offs, sizes)), default=0)
    solver, peak = gname, gpeak
    pairs = conflict_pairs(reqs)
    if not reqs:
        solver = "empty"
    elif gpeak <= lb:
        solver = f"{gname} (= lower bound: optimal)"
    elif not use_mip:
        solver = f"{gname} (mip off)"
    elif gpeak <= lb * (1 + mip_gap):
        solver = f"{gname} (within mip_gap={mip_gap:g} of the lower bound)"
    elif len(pairs) > max_pairs:
        solver = f"{gname} (mip skipped: {len(pairs)} pairs > max_pairs={max_pairs})"
    else:
        try:
            with warnings.catch_warnings():  # PuLP 3.3 announces its 4.0 API on every variable; we pin 3.x
                warnings.simplefilter("ignore", DeprecationWarning)
                res = _solve_mip(reqs, sizes, pairs, offs, gpeak, lb, time_limit_s, seed, alignment, mip)
        except Exception as e:  # PuLP or its solver missing or crashing must not cost the user their plan
            res = None
            solver = f"{gname} (mip failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        if res is not None:
            moffs, status = res
            mpeak = max(o + s for o, s in zip(moffs, sizes))
            if mpeak < gpeak:
                offs, peak, solver = moffs, mpeak, f"mip/{mip}/{status}"
            else:
                solver = f"{gname} (mip/{mip} {status}, not better)"
    plan = MemoryPlan(reqs, offs, peak, lb, solver, time.perf_counter() - t0, gpeak, alignment,
                      list(names) if names is not None else [], dict(info or {}))
    # The planner's one promise: conflicting requests never share bytes. Checked on every plan.
    plan.validate()
    return plan


@functools.cache
def _highs_warm_started():
    """PuLP's HiGHS interface, handing HiGHS the variables' initial values (the greedy plan) as a start:
    PuLP passes warm starts to CBC only. Made once, on first use (PuLP is imported lazily)."""
    import numpy as np
    import pulp

    class HiGHSWarm(pulp.HiGHS):
        def callSolver(self, lp):
            cols = lp.variables()  # buildSolverModel numbered the columns in this order
            vals = np.array([0.0 if v.varValue is None else float(v.varValue) for v in cols], dtype=np.float64)
            lp.solverModel.setSolution(len(cols), np.arange(len(cols), dtype=np.int32), vals)
            super().callSolver(lp)

    return HiGHSWarm


def _solve_mip(reqs, sizes, pairs, warm, big, lb, time_limit_s, seed, alignment, mip="cbc"):
    """MEMO's MIP in PuLP, solved by HiGHS or CBC (`mip`). Returns (offsets, status) or None when the
    solver produced no solution.

    Units: sizes are divided by their common divisor (at least the alignment) so the big-M constants stay
    small next to CBC's tolerances; the solution's pairwise order is then turned back into exact integer
    offsets by `_compact`.
    """
    import pulp

    g = 0
    for s in sizes:
        g = math.gcd(g, s)
    u = [s // g for s in sizes]
    BIG = big // g  # the greedy peak: no better plan needs an offset above it
    prob = pulp.LpProblem("memo_dsa", pulp.LpMinimize)
    M = pulp.LpVariable("M", lowBound=-(-lb // g), upBound=BIG)
    A = [pulp.LpVariable(f"A{i}", lowBound=0, upBound=BIG - u[i]) for i in range(len(reqs))]
    prob += M
    for i in range(len(reqs)):
        prob += A[i] + u[i] <= M
    z = {}
    wu = [w // g for w in warm]
    for i, j in pairs:
        ri, rj = reqs[i], reqs[j]
        if (sizes[i], ri.start, ri.end) == (sizes[j], rj.start, rj.end):
            # Interchangeable requests: fix their order (symmetry breaking), no binary needed.
            prob += A[i] + u[i] <= A[j]
            continue
        v = pulp.LpVariable(f"z{i}_{j}", cat="Binary")  # 0: i below j, 1: j below i
        z[(i, j)] = v
        prob += A[i] + u[i] <= A[j] + BIG * v
        prob += A[j] + u[j] <= A[i] + BIG * (1 - v)
        v.setInitialValue(0 if (wu[i], i) < (wu[j], j) else 1)
    # Warm start: the greedy plan, re-stacked so the fixed symmetric pairs hold too.
    order0 = _order_from_offsets(wu, pairs)
    for i, j in pairs:
        if (i, j) not in z:
            order0[(i, j)] = True
    w0 = _compact(reqs, u, order0, pairs, 1)
    for (i, j), v in z.items():
        v.setInitialValue(0 if order0[(i, j)] else 1)
    for i, a in enumerate(w0):
        A[i].setInitialValue(a)
    M.setInitialValue(max(a + s for a, s in zip(w0, u)))
    if mip == "highs":
        solver = _highs_warm_started()(msg=False, timeLimit=time_limit_s, threads=1, random_seed=seed + 1)
    else:
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, warmStart=True, threads=1,
                                   options=[f"randomSeed {seed + 1}", f"randomCbcSeed {seed + 1}"])
    status = prob.solve(solver)
    if pulp.LpStatus.get(status) not in ("Optimal",) or M.value() is None:
        return None
    vals = [a.value() for a in A]
    if any(v is None for v in vals):
        return None
    # "Optimal" is reported also when the solver stops at the time limit with an incumbent; tell them apart.
    proven = prob.sol_status == pulp.LpSolutionOptimal
    order = _order_from_offsets(vals, pairs)
    offs = _compact(reqs, sizes, order, pairs, alignment)
    return offs, "optimal" if proven else "time limit (incumbent)"
