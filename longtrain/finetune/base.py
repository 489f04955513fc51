"""What a fine-tuning mode is: a component with hooks the trainer calls at fixed points.

The trainer never asks which mode runs. Per stage it calls, in this order:
  on_stage_start(model, stage)   set `requires_grad` (the engine is then rebuilt for that set);
                                 returns a record for metrics.jsonl
  on_batch(stage, indices)       the global batch's sample indices, before each optimizer step
  on_step_end(ctx, step)         after each optimizer step (global step count); may return a record
  on_stage_end(ctx, stage, last) after the stage's last step, before the tasks are evaluated
and `state_dict()` / `tensors()` / `load_state_dict()` around checkpoints, so a resumed run
re-applies exactly what the interrupted one had chosen.

`ctx` is the trainer seen through `StageContext`: enough to run a loss on chosen samples and to keep
the engine's optimizer in step with weights changed outside it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from longtrain.config.schema import Config
from longtrain.parallel.mesh import Mesh
from longtrain.train.engine import numel

_WRAPPER = "._checkpoint_wrapped_module"  # activation checkpointing's wrapper: not part of a module's name


class StageContext(Protocol):
    model: nn.Module  # the plain model (not the engine's wrapper): a forward on it triggers no engine hooks
    mesh: Mesh
    engine: object  # has refresh_master(): the optimizer's fp32 master copy re-read from the weights,
    #                 and release_params(): ZeRO-3's parameters partitioned again after a pass outside it

    def sample(self, stage: int, index: int) -> dict:
        """Training sample `index` of stage `stage`."""

    def forward_loss(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed loss and labelled-token count on these samples (sharded for sp like training)."""


def canonical(name: str) -> str:
    return name.replace(_WRAPPER, "")


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns parameters, by its HF-style name. A parameter shared by two modules
    (tied embeddings and LM head) belongs to the first one only, so it is counted once."""
    seen, out = set(), {}
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        if own:
            seen.update(id(p) for p in own)
            out[canonical(name)] = mod
    return out


def trainable_fraction(model: nn.Module) -> float:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(numel(p) for p in params)
    return sum(numel(p) for p in params if p.requires_grad) / max(total, 1)


class FinetuneMode:
    """Defaults: every hook does nothing; subclasses override what their algorithm needs."""

    name = "base"

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh

    def on_stage_start(self, model: nn.Module, stage: int) -> dict:
        return {}

    def on_batch(self, stage: int, indices: list[int]) -> None:
        pass

    def on_step_end(self, ctx: StageContext, step: int) -> dict | None:
        return None

    def on_stage_end(self, ctx: StageContext, stage: int, last: bool) -> dict | None:
        return None

    def state_dict(self) -> dict:
        """JSON-able state, stored in the checkpoint's meta.json."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state, written by rank 0 to the checkpoint's finetune.pt (identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        pass
