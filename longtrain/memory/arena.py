"""The CUDA allocator at run time: its mode (`memory.allocator`), and the planned runtime
(`memory.planner.enabled`).

The planned runtime, which would serve a level-1/level-2 plan from one region, is not built: why the
allocator hooks torch offers do not allow it safely is in docs/memory-planner.md ("The CUDA runtime: what
stands in the way"). A recipe that enables the planner trains with the normal allocator and says so in
one log line, so the same recipe runs on CPU (tests, quickstart) and on GPU.
"""

from __future__ import annotations

import logging
import os

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


def configure_cuda_allocator(cfg) -> str:
    """Set the CUDA caching allocator's mode from `memory.allocator`; see `set_cuda_allocator_mode`.

    `expandable` maps and grows segments instead of carving fixed ones, so freed memory of one size can
    serve a larger request later. Measured on one H200 (docs/memory-swap.md): the longest sequence of a
    3-layer Llama-3-8B stack went from 393K to 459K tokens with full recompute and from 852K to 918K with
    swapping; the caching allocator failed 28-30 GiB requests with that much memory free in pieces."""
    return set_cuda_allocator_mode(cfg.memory.allocator)


def set_cuda_allocator_mode(mode: str) -> str:
    """`expandable` or `default`, before CUDA starts; returns what applies. Called first by every entry
    point (preflight, the trainer, the benchmarks, the peers); calling it again changes nothing. An
    allocator setting in the environment (either of torch's variable names) wins; the one this sets is
    marked as longtrain's, so the ranks it starts report it as such."""
    global _applied
    ours = os.environ.get(_OURS)  # set by this process or by the one that started it
    for name in _ENV_NAMES:
        value = os.environ.get(name)
        if value is not None and not (name == _ENV_NAMES[0] and value == ours):
            return f"{name}={value} (from the environment)"
    if ours or _applied:
        return _EXPANDABLE
    if mode == "default":
        return "caching allocator defaults"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The allocator read its settings when CUDA started (a kernel probe, say): change them in place;
        # they apply to the segments it maps from now on.
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.13
        (setter or torch.cuda.memory._set_allocator_settings)(_EXPANDABLE)
    else:
        os.environ[_ENV_NAMES[0]] = _EXPANDABLE  # read when CUDA starts, here and in child ranks
        os.environ[_OURS] = _EXPANDABLE
    _applied = _EXPANDABLE
    return _applied


_EXPANDABLE = "expandable_segments:True"
_ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch reads both (the second is the newer name)
_OURS = "LONGTRAIN_ALLOC_CONF"
_applied: str | None = None
