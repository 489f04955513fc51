"""The two levels of MEMO's plan (DESIGN.md section 3).

Level 1 plans one decoder layer's *transient* requests: those allocated and freed inside the layer's
forward pass or inside its backward pass. Every layer makes the same requests (trace.check_deterministic),
so one plan serves every layer's forward and backward: the layer needs one region of the level-1 peak.

Level 2 plans the iteration. Time is one slot per layer pass: forward of layer i is slot i, backward of
layer i is slot 2L-1-i. Each pass is one block of the level-1 peak for its slot; the tensors that cross
passes are requests of their own:
  output_i        layer i's output, the input of layer i+1: slots [i, i+2)
  skeletal_i      saved for backward: [i, 2L-i) kept on the GPU; when swapped, the GPU copy lives
                  [i, i+2) (the D2H copy overlaps the next layer) and the swap-in buffer [2L-2-i, 2L-i)
                  (prefetched while layer i+1's backward runs); host buffers are not GPU memory
  grad_input_i    the gradient layer i's backward returns, consumed by layer i-1's: [2L-1-i, 2L+1-i)
  weight_grad_i   layer i's weight gradients, kept until the optimizer step: [2L-1-i, 2L)
Embedding, LM head, loss and optimizer are outside the plan (the caching allocator keeps serving them).
"""

from __future__ import annotations

from longtrain.memory.planner.core import MemoryPlan, Request, solve_plan


def _total(reqs: list[Request], alignment: int) -> int:
    return sum(-(-r.size // alignment) * alignment for r in reqs)


def plan_layer(trace, *, time_limit_s: float = 60.0, alignment: int = 512, seed: int = 0,
               mip_solver: str = "auto") -> MemoryPlan:
    """Level 1: one plan for a layer's transient requests (forward and backward on one timeline)."""
    reqs = [t for t in trace.requests if t.role == "transient"]
    if not reqs:
        raise ValueError("the layer trace has no transient requests to plan")
    names = [f"{t.phase}:{t.op}{list(t.shape)}:{t.dtype}" for t in reqs]
    return solve_plan([t.request for t in reqs], time_limit_s, alignment=alignment, seed=seed, names=names,
                      mip_solver=mip_solver, info=dict(level=1, fwd_end=trace.fwd_end, **trace.meta))


def iteration_requests(trace, layer_peak: int, n_layers: int, *, swapped: frozenset[int] | set[int] = frozenset(),
                       alignment: int = 512) -> tuple[list[Request], list[str]]:
    """Level 2's requests (see the module docstring) for n_layers identical layers."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1")
    if layer_peak <= 0:
        raise ValueError(f"layer_peak={layer_peak} must be > 0 bytes")
    bad = sorted(i for i in swapped if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"swapped layers {bad} are outside 0..{n_layers - 1}")
    kinds = trace.kinds()
    size = {k: _total(v, alignment) for k, v in kinds.items()}
    L = n_layers
    reqs: list[Request] = []
    names: list[str] = []

    def add(name: str, nbytes: int, start: int, end: int) -> None:
        if nbytes > 0:
            reqs.append(Request(nbytes, start, min(end, 2 * L)))
            names.append(name)

    for i in range(L):
        fwd, bwd = i, 2 * L - 1 - i
        add(f"layer{i}.fwd", layer_peak, fwd, fwd + 1)
        add(f"layer{i}.bwd", layer_peak, bwd, bwd + 1)
        add(f"layer{i}.output", size["output"], fwd, fwd + 2)
        if i in swapped:
            add(f"layer{i}.skeletal.d2h", size["skeletal"], fwd, fwd + 2)
            add(f"layer{i}.skeletal.h2d", size["skeletal"], bwd - 1, bwd + 1)
        else:
            add(f"layer{i}.skeletal", size["skeletal"], fwd, bwd + 1)
        add(f"layer{i}.grad_input", size["grad_input"], bwd, bwd + 2)
        add(f"layer{i}.weight_grad", size["weight_grad"], bwd, 2 * L)
    return reqs, names


def plan_iteration(trace, layer_plan: MemoryPlan, n_layers: int, *, swapped=frozenset(), time_limit_s: float = 60.0,
                   alignment: int = 512, seed: int = 0, mip_solver: str = "auto") -> MemoryPlan:
    """Level 2: the iteration, each layer pass one block of the level-1 peak."""
    reqs, names = iteration_requests(trace, layer_plan.peak_bytes, n_layers, swapped=swapped, alignment=alignment)
    return solve_plan(reqs, time_limit_s, alignment=alignment, seed=seed, names=names, mip_solver=mip_solver,
                      info=dict(level=2, n_layers=n_layers, swapped=sorted(swapped),
                                layer_peak_bytes=layer_plan.peak_bytes))
