"""`parallelize_model`: the one place where parallel and memory techniques are applied to the plain model.

Order matters and is fixed here:
  1. sequence-parallel attention (swaps each layer's attention core; must precede any wrapping of
     the layers so the wrappers recompute / swap the sp version);
  2. activation memory policy per layer (keep / recompute / swap(alpha) by MEMO's cost model,
     memory/activation.py), which wraps decoder layers; it measures one layer's forward, so it runs
     after the sp swap (the layer it times is the one that trains);
  3. planned memory (`memory.planner.enabled`, memory/arena.py): wraps every decoder layer, outermost,
     as a window of the planned allocator (installed before CUDA started), so a recomputation inside
     a layer's backward belongs to that layer's backward window;
  4. data parallelism and state sharding are applied last, by the engine (`longtrain/train/engine.py`):
     DDP or DeepSpeed ZeRO must see the final modules, and ZeRO also owns the optimizer, so that
     wrapping lives where the optimizer is built (see docs/design-notes.md).
"""

from __future__ import annotations

from torch import nn

from longtrain.config.schema import Config
from longtrain.memory import apply_activation_policy, apply_memory_plan
from longtrain.parallel.mesh import Mesh
from longtrain.parallel.sequence_parallel import apply_sequence_parallel


def parallelize_model(model: nn.Module, cfg: Config, mesh: Mesh) -> nn.Module:
    """Applies the model transforms in place and returns the model."""
    sp = cfg.parallel.sp
    if mesh.sp_size > 1:
        apply_sequence_parallel(model, mesh.sp_group, mesh.sp_size, sp.method, sp.layout)
    model.swap_streams = apply_activation_policy(model, cfg, mesh.device, mesh.sp_size, mesh.sp_rank)
    if cfg.memory.planner.enabled:
        apply_memory_plan(model, cfg, mesh.device, mesh.rank)
    return model
