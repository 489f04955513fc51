"""Activation checkpointing per transformer layer (`memory.activation.policy: recompute`).

Each decoder layer keeps only its input; everything else is recomputed in backward. torch's
checkpoint wrapper keeps HF parameter names in the state dict (it strips its own prefix).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

log = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module, indices: list[int] | None = None) -> nn.Module:
    """Wrap the layers in `indices` (default: all)."""
    layers = model.model.layers
    indices = list(range(len(layers))) if indices is None else indices
    for i in indices:
        layers[i] = checkpoint_wrapper(layers[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                       preserve_rng_state=False)
    log.info("activation checkpointing: %d layers recompute their activations in backward", len(indices))
    return model
