"""Activation checkpointing per transformer layer (`memory.activation.policy: recompute`).

Each decoder layer keeps only its input; everything else is recomputed in backward. torch's
checkpoint wrapper keeps HF parameter names in the state dict (it strips its own prefix).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

log = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)
    log.info("activation checkpointing: %d layers recompute their activations in backward", len(layers))
    return model
