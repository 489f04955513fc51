"""Fine-tuning modes as components (`finetune.mode`), chosen from this registry; the trainer only
calls their hooks (see base.py): full.py, hft.py (Half Fine-Tuning), fpf.py (FPF and k-FPF);
stages.py holds the stage list and the continual-learning metrics."""

from __future__ import annotations

from longtrain.finetune.base import FinetuneMode, StageContext, leaf_modules, trainable_fraction
from longtrain.finetune.fpf import FPFMode, KFPFMode
from longtrain.finetune.full import FullMode
from longtrain.finetune.hft import HFTMode
from longtrain.finetune.stages import AccuracyMatrix, Stage, resolve_stages, stage_config

MODES: dict[str, type[FinetuneMode]] = {"full": FullMode, "hft": HFTMode, "fpf": FPFMode, "kfpf": KFPFMode}


def build_mode(cfg, mesh) -> FinetuneMode:
    return MODES[cfg.finetune.mode](cfg, mesh)


__all__ = ["MODES", "AccuracyMatrix", "FinetuneMode", "Stage", "StageContext", "build_mode", "leaf_modules",
           "resolve_stages", "stage_config", "trainable_fraction"]
