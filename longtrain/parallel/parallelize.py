"""`parallelize_model`: the one place where parallel and memory techniques are applied to the plain model.

Order matters and is fixed here:
  1. activation memory policy per layer (recompute), which wraps each decoder layer;
  2. data parallelism and state sharding are applied last, by the engine (`longtrain/train/engine.py`):
     DDP or DeepSpeed ZeRO must see the final modules, and ZeRO also owns the optimizer, so that
     wrapping lives where the optimizer is built (see docs/design-notes.md).
"""

from __future__ import annotations

from torch import nn

from longtrain.config.schema import Config
from longtrain.memory import apply_activation_checkpointing
from longtrain.parallel.mesh import Mesh


def parallelize_model(model: nn.Module, cfg: Config, mesh: Mesh) -> nn.Module:
    """Applies the model transforms in place and returns the model."""
    if cfg.memory.activation.policy == "recompute":
        apply_activation_checkpointing(model)
    return model
