"""The CUDA allocator at run time: its mode (`memory.allocator`), and the planned runtime
(`memory.planner.enabled`, longtrain/memory/planner/runtime.py).

With the planner on and CUDA present, the planned allocator becomes the process's CUDA allocator before
CUDA starts, and every decoder layer's forward and backward become windows of it: one recorded iteration
is planned on both levels and replayed (docs/memory-planner.md). On CPU, or when the allocator cannot be
built here (no C compiler, no CUDA toolkit for the torch shim), the run trains with the normal allocator
and says why in one warning, so the same recipe runs everywhere.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)


def apply_memory_plan(model: nn.Module, cfg, device: torch.device, rank: int = 0) -> nn.Module:
    """Wrap the decoder layers as windows of the planned runtime (outermost: after the activation policy)."""
    from longtrain.memory.planner.runtime import PlanRuntime, active_core, attach_windows

    core = active_core() if device.type == "cuda" else None
    if core is None:
        why = (f"the planned allocator needs CUDA; this {device.type} run" if device.type != "cuda"
               else f"the planned allocator is not installed ({_planned_error or 'CUDA started before it'}); this run")
        log.warning("memory.planner.enabled=true: %s uses the normal allocator (`longtrain plan-memory RECIPE` "
                    "still prints and saves the plan)", why)
        return model
    pc = cfg.memory.planner
    model.plan_runtime = PlanRuntime(core, device, record_iteration=pc.record_iteration,
                                     time_limit_s=pc.time_limit_s, mip_solver=pc.mip_solver, check=pc.check,
                                     side_streams=pc.side_streams, reuse_after=pc.reuse_after,
                                     overflow_bytes=int(pc.warmup_overflow_gib * 2**30),
                                     save_dir=cfg.train.output_dir, rank=rank)
    swap = getattr(model, "swap_streams", None)
    if swap is not None and swap.cuda:  # named in the report's stream waits
        model.plan_runtime.stream_names.update({swap.d2h.cuda_stream: "swap D2H", swap.h2d.cuda_stream: "swap H2D"})
    attach_windows(model.model.layers, model.plan_runtime, model=model)
    log.info("memory plan: %d layers are windows of the planned allocator; iteration %d is recorded and planned, "
             "later ones replay the plan%s", len(model.model.layers), pc.record_iteration,
             " (check mode)" if pc.check else "")
    return model


def configure_cuda_allocator(cfg) -> str:
    """Install the planned allocator (`memory.planner.enabled`, CUDA), else set the CUDA caching
    allocator's mode from `memory.allocator`; see `set_cuda_allocator_mode`. Returns what applies.

    `expandable` maps and grows segments instead of carving fixed ones, so freed memory of one size can
    serve a larger request later. Measured on one H200 (docs/memory-swap.md): the longest sequence of a
    3-layer Llama-3-8B stack went from 393K to 459K tokens with full recompute and from 852K to 918K with
    swapping; the caching allocator failed 28-30 GiB requests with that much memory free in pieces."""
    if cfg.memory.planner.enabled and torch.cuda.is_available():
        fallback = cfg.memory.planner.fallback
        # the caching allocator behind the plan reads its mode when CUDA starts, like the normal one
        mode = set_cuda_allocator_mode(cfg.memory.allocator) if fallback == "caching" else None
        planned = install_planned_allocator(fallback, mode)
        if planned:
            return planned
    return set_cuda_allocator_mode(cfg.memory.allocator)


def install_planned_allocator(fallback: str = "caching", mode: str | None = None) -> str | None:
    """The planned allocator as this process's CUDA allocator; None (with a warning) when it cannot be.
    `fallback` serves what the plan does not (`memory.planner.fallback`); `mode`: the caching allocator's."""
    global _planned_error
    from longtrain.memory.planner.runtime import install_cuda_allocator

    try:
        install_cuda_allocator(int(os.environ.get("LOCAL_RANK", "0")), fallback=fallback)
    except Exception as e:  # noqa: BLE001 - any build or install failure: train with the normal allocator
        _planned_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        log.warning("memory.planner.enabled=true: the planned allocator could not be installed (%s); training uses "
                    "the normal CUDA allocator", _planned_error)
        return None
    behind = "cudaMallocAsync pool" if fallback == "pool" else f"torch's caching allocator, {mode}"
    return f"longtrain planned allocator (plan region + {behind})"


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
_planned_error: str | None = None
