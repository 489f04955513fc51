"""Realising a memory plan at run time (`memory.planner.enabled`).

The planned runtime replays a level-1/level-2 plan through a pluggable CUDA allocator
(`torch.cuda.MemPool`): it exists only on CUDA and is not built yet (the GPU half of issue 6). Until then
a recipe that enables the planner trains with the normal allocator and says so in one log line, so the
same recipe runs on CPU (tests, quickstart) and on GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def apply_memory_plan(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    if device.type != "cuda":
        log.warning("memory.planner.enabled=true: the planned allocator needs CUDA; this %s run uses the normal "
                    "allocator (`longtrain plan-memory RECIPE` still prints and saves the plan)", device.type)
    else:
        log.warning("memory.planner.enabled=true: the planned CUDA runtime is not built yet; training uses the "
                    "caching allocator (`longtrain plan-memory RECIPE` prints and saves the plan)")
    return model
