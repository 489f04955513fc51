"""Planned memory reuse (MEMO's bi-level MIP, DESIGN.md section 3).

  Request(size, start, end)           one allocation with a half-open lifetime in event order
  solve_plan(requests, time_limit_s)  -> MemoryPlan (offsets, peak_bytes, lower_bound_bytes, ratio, solver)
  trace_layer(args, seq_len)          one decoder layer's forward + backward requests (meta device)
  plan_layer / plan_iteration         level 1 (one layer's transients) and level 2 (the whole iteration)

The planner is pure Python and deterministic; only `trace` imports torch.
"""

from longtrain.memory.planner.core import MemoryPlan, Request, conflict_pairs, greedy_offsets, lower_bound, solve_plan

__all__ = ["MemoryPlan", "Request", "conflict_pairs", "greedy_offsets", "lower_bound", "solve_plan"]
