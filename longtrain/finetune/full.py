"""`full`: every parameter trains in every stage (the baseline the other modes are measured against)."""

from __future__ import annotations

from torch import nn

from longtrain.finetune.base import FinetuneMode


class FullMode(FinetuneMode):
    name = "full"

    def on_stage_start(self, model: nn.Module, stage: int) -> dict:
        for p in model.parameters():
            p.requires_grad_(True)
        return {}
