"""Planned memory reuse (MEMO's bi-level MIP, DESIGN.md section 3; docs/memory-planner.md).

  Request(size, start, end)             one allocation with a half-open lifetime in event order
  solve_plan(requests, time_limit_s=)   -> MemoryPlan (offsets, peak_bytes, lower_bound_bytes, ratio, solver)
  plan_layer / plan_iteration           level 1 (a layer's transient tensors) and level 2 (the iteration)
  runtime (import it explicitly)        the planned allocator: C core, windows, plans of a recorded iteration
  planner.trace.trace_layer             one decoder layer's forward + backward requests (meta device)

Everything here is pure Python and deterministic; only `trace` imports torch (import it explicitly).
"""

from longtrain.memory.planner.core import MemoryPlan, Request, conflict_pairs, greedy_offsets, lower_bound, solve_plan
from longtrain.memory.planner.levels import iteration_requests, plan_iteration, plan_layer

__all__ = ["MemoryPlan", "Request", "conflict_pairs", "greedy_offsets", "iteration_requests", "lower_bound",
           "plan_iteration", "plan_layer", "solve_plan"]
