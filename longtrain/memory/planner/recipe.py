"""`longtrain plan-memory RECIPE`: trace one layer of the recipe's model (meta device), plan level 1 and
level 2, and report. The report is a list of sections so other memory decisions (the activation swap
table) can add theirs to the same command."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from longtrain.memory.planner.core import MemoryPlan, _fmt_bytes


@dataclass
class PlanReport:
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, body) in print order
    files: list[Path] = field(default_factory=list)
    layer_plan: MemoryPlan | None = None
    iteration_plan: MemoryPlan | None = None

    def text(self) -> str:
        return "\n\n".join(f"== {title} ==\n{body}" for title, body in self.sections) + "\n"


def trace_shape(cfg):
    """(model args, tokens per GPU, micro-batch, dtype name) the recipe trains with."""
    from longtrain.config import ConfigError
    from longtrain.train.preflight import model_shape

    try:
        args = model_shape(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seq = cfg.data.seq_len // cfg.parallel.sp.degree  # load.validate checked the divisibility
    dtype = "bfloat16" if cfg.train.precision == "bf16" else cfg.model.dtype
    return args, seq, cfg.train.micro_batch_size, dtype


def plan_recipe(cfg, out_dir: str | Path | None = None) -> PlanReport:
    import torch

    from longtrain.memory.planner.levels import plan_iteration, plan_layer
    from longtrain.config import ConfigError
    from longtrain.memory.planner.trace import check_deterministic, trace_kernel, trace_layer

    args, seq, batch, dtype = trace_shape(cfg)
    rep = PlanReport()
    t0 = time.perf_counter()
    try:
        kernel = trace_kernel(cfg.train.attention_kernel, torch.device("meta"), getattr(torch, dtype))
    except ValueError as e:
        raise ConfigError(f"train.attention_kernel={cfg.train.attention_kernel!r}: {e}") from None
    traces = trace_layer(args, seq, batch=batch, dtype=getattr(torch, dtype), n_layers=2, kernel=kernel)
    try:
        check_deterministic(traces)
        det = "layer 0 and layer 1 make identical requests (sizes, order, lifetimes)"
    except ValueError as e:
        det = f"NOT deterministic across layers: {e}"
    tr = traces[0]
    kinds = tr.kinds()
    lines = [f"model: {args.hidden_size} hidden, {args.intermediate_size} MLP, {args.num_attention_heads}/"
             f"{args.num_key_value_heads} heads, {args.num_hidden_layers} layers",
             f"tokens per GPU: {seq} (data.seq_len {cfg.data.seq_len} / sp {cfg.parallel.sp.degree}), "
             f"micro-batch {batch}, {dtype}, attention {tr.meta['kernel']} (traced on meta)",
             f"requests: {len(tr.requests)} in {time.perf_counter() - t0:.2f} s; {det}"]
    for k, v in kinds.items():
        lines.append(f"  {k:<12} {len(v):>4} requests, {_fmt_bytes(sum(r.size for r in v))} in total")
    if cfg.memory.activation.policy != "none":
        lines.append(f"note: memory.activation.policy={cfg.memory.activation.policy!r} is not traced; "
                     "this is the layer without recomputation")
    if cfg.parallel.sp.degree > 1:
        lines.append(f"note: parallel.sp.degree={cfg.parallel.sp.degree}: attention is traced as one local block; "
                     f"the {cfg.parallel.sp.method} communication buffers are not in the trace")
    lines.append("not seen by the trace: workspaces allocated inside one kernel (cuDNN, cuBLAS), the embedding, "
                 "LM head, loss and optimizer")
    rep.sections.append(("trace: one decoder layer, forward + backward", "\n".join(lines)))
    limit, mip = cfg.memory.planner.time_limit_s, cfg.memory.planner.mip_solver
    rep.layer_plan = plan_layer(tr, time_limit_s=limit, mip_solver=mip)
    rep.sections.append(("level 1: one layer's transient tensors", rep.layer_plan.table("plan").split("\n", 1)[1]))
    rep.iteration_plan = plan_iteration(tr, rep.layer_plan, args.num_hidden_layers, time_limit_s=limit,
                                        mip_solver=mip)
    rep.sections.append((f"level 2: the iteration ({args.num_hidden_layers} layers, skeletal tensors kept on GPU)",
                         rep.iteration_plan.table("plan").split("\n", 1)[1]))
    act = cfg.memory.activation
    if act.policy in ("swap", "auto") or act.layers:
        from longtrain.memory.swap_plan import SwapPlanError, plan_for_recipe

        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            swap = plan_for_recipe(cfg, args, dev, int(cfg.launch.nproc), fwd_ms=None)
        except SwapPlanError as e:
            raise ConfigError(str(e)) from None
        rep.sections.append(("activation swapping: the decision per layer", swap.table().rstrip()))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plans = (("memory_plan_layer.json", rep.layer_plan), ("memory_plan_iteration.json", rep.iteration_plan))
        for name, plan in plans:
            plan.to_json(out / name)
            rep.files.append(out / name)
        rep.sections.append(("files", "\n".join(str(p) for p in rep.files)))
    return rep
