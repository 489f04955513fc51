"""`apply_activation_policy`: per layer, keep / recompute / swap(alpha) (`memory.activation.*`).

none and recompute need no measurement. swap and auto (and per-layer overrides) build the MEMO
decision table of swap_plan.py from measured inputs, log it, and wrap the layers: recompute through
activation checkpointing, swap through memory/swap.py.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from longtrain.memory.checkpointing import apply_activation_checkpointing, apply_tiled_mlp
from longtrain.memory.swap import SwapStreams, apply_activation_swap
from longtrain.memory.swap_plan import SwapPlan, measure_layer_fwd_ms, plan_for_recipe
from longtrain.models.llama import rope_cos_sin, rope_inv_freq

log = logging.getLogger(__name__)


def build_swap_plan(model: nn.Module, cfg, device: torch.device, sp_size: int = 1, sp_rank: int = 0) -> SwapPlan:
    """The decision table for this recipe on this device; times one layer unless the recipe says."""
    fwd_ms = None
    if cfg.memory.activation.layer_fwd_ms <= 0:
        dtype = next(model.parameters()).dtype
        compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else dtype
        fwd_ms = _time_layer(model, cfg, device, sp_size, sp_rank, compute_dtype)
    return plan_for_recipe(cfg, model.args, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), fwd_ms)


def _time_layer(model, cfg, device, sp_size, sp_rank, compute_dtype) -> float:
    from longtrain.parallel.sharding import shard_sequence

    args = model.args
    s = cfg.data.seq_len
    x = torch.randn(cfg.train.micro_batch_size, s // sp_size, args.hidden_size, device=device, dtype=compute_dtype)
    pos = torch.arange(s, device=device).expand(cfg.train.micro_batch_size, s)
    if sp_size > 1:
        pos = shard_sequence(pos, 1, layout=cfg.parallel.sp.layout, rank=sp_rank, world=sp_size)
    cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), pos, compute_dtype)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if compute_dtype != next(model.parameters()).dtype else contextlib.nullcontext())
    with autocast:
        return measure_layer_fwd_ms(model.model.layers[0], x, cos, sin)


def apply_activation_policy(model: nn.Module, cfg, device: torch.device, sp_size: int = 1,
                            sp_rank: int = 0) -> SwapStreams | None:
    act = cfg.memory.activation
    if act.policy == "none" and not act.layers:
        _tile(model, act, None)
        return None
    if act.policy == "recompute" and not act.layers:
        _tile(model, act, None)
        apply_activation_checkpointing(model)
        return None
    plan = build_swap_plan(model, cfg, device, sp_size, sp_rank)
    log.info("%s", plan.table().rstrip())
    if act.policy == "auto" and not act.layers and not plan.swap_alphas() and plan.recompute_layers():
        log.warning("memory.activation.policy=auto: the host budget (%.1f GiB) holds no layer (%.2f GiB each at "
                    "alpha 0): every layer but the kept ones recomputes; raise memory.activation.host_budget_gib "
                    "or free host memory to swap", plan.host_budget_bytes / 1024**3,
                    plan.layer_bytes.at(0.0) / 1024**3)
    _tile(model, act, [d.index for d in plan.layers if d.policy != "swap"])
    if plan.recompute_layers():
        apply_activation_checkpointing(model, plan.recompute_layers())
    streams = apply_activation_swap(model, plan.swap_alphas(), device, act.chunk_tokens)
    n_swap = len(plan.swap_alphas())
    log.info("activation swapping: %d layers swap to host (%.2f GiB per rank), %d recompute, %d keep", n_swap,
             plan.host_bytes / 1024**3, len(plan.recompute_layers()), len(plan.layers) - n_swap -
             len(plan.recompute_layers()))
    return streams


def _tile(model: nn.Module, act, indices: list[int] | None) -> None:
    """The tiled MLP on the kept and recomputed layers (a swapped layer chunks its recompute itself:
    `chunk_tokens`)."""
    if act.mlp_chunk_tokens > 0 and (indices is None or indices):
        apply_tiled_mlp(model, act.mlp_chunk_tokens, indices)
