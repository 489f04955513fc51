"""`parallelize_model`: the one place where parallel and memory techniques are applied to the plain model.

Order matters and is fixed here:
  1. activation memory policy per layer (recompute), which wraps each decoder layer;
  2. the engine's data-parallel wrapper (DDP) over all ranks, last, so it sees the final modules.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from longtrain.config.schema import Config
from longtrain.memory import apply_activation_checkpointing
from longtrain.parallel.mesh import Mesh

log = logging.getLogger(__name__)


def apply_ddp(model: nn.Module, mesh: Mesh, bucket_cap_mb: int) -> nn.Module:
    ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids, process_group=mesh.dp_group, bucket_cap_mb=bucket_cap_mb)
    log.info("data parallel: DDP over %d ranks, %d MiB buckets", mesh.dp_size, bucket_cap_mb)
    return wrapped


def parallelize_model(model: nn.Module, cfg: Config, mesh: Mesh) -> nn.Module:
    """Returns the module to train; `unwrap(result)` is always the plain model."""
    if cfg.memory.activation.policy == "recompute":
        apply_activation_checkpointing(model)
    if mesh.distributed:
        model = apply_ddp(model, mesh, cfg.parallel.ddp_bucket_cap_mb)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
