"""Fine-tuning modes as components: each decides which parameters train. `full` trains all of them."""

from __future__ import annotations

import logging

from torch import nn

from longtrain.config.schema import FinetuneConfig

log = logging.getLogger(__name__)


def apply_full(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


MODES = {"full": apply_full}


def apply_finetune_mode(model: nn.Module, cfg: FinetuneConfig) -> None:
    MODES[cfg.mode](model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("finetune mode %s: %.1f%% of %d parameters train", cfg.mode, 100 * trainable / max(total, 1), total)
