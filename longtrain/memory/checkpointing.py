"""Activation checkpointing per transformer layer (`memory.activation.policy: recompute`), and the
tiled MLP (`memory.activation.mlp_chunk_tokens`).

Each checkpointed decoder layer keeps only its input; everything else is recomputed in backward. A
tiled MLP runs its tokens in chunks, each under its own checkpoint: it keeps only its input, and its
backward recomputes one chunk's intermediate activations (gate, up, their product: 3 x the MLP width per
token, the largest tensors of a Llama layer) at a time. Inside a checkpointed layer the two nest: the
layer's recompute runs the MLP chunk by chunk too, so the layer's backward never holds the whole MLP.
torch's wrappers keep HF parameter names in the state dict (they strip their own prefix).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (ActivationWrapper, CheckpointImpl,
                                                                         checkpoint_wrapper)
from torch.utils.checkpoint import checkpoint

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


class TiledMLP(ActivationWrapper):
    """An MLP over chunks of `chunk_tokens` tokens (dim 1), each checkpointed (ALST's tiled MLP)."""

    def __init__(self, mlp: nn.Module, chunk_tokens: int):
        super().__init__(mlp)
        self.chunk_tokens = int(chunk_tokens)

    def forward(self, x: Tensor) -> Tensor:
        mlp = self._checkpoint_wrapped_module
        s = x.shape[1]
        if not torch.is_grad_enabled() or s <= self.chunk_tokens:
            return mlp(x)
        parts = [checkpoint(mlp, x[:, a:a + self.chunk_tokens], use_reentrant=False, preserve_rng_state=False)
                 for a in range(0, s, self.chunk_tokens)]
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"chunks of {self.chunk_tokens} tokens"


def apply_tiled_mlp(model: nn.Module, chunk_tokens: int, indices: list[int] | None = None) -> nn.Module:
    """Tile the MLP of the layers in `indices` (default: all); call before wrapping the layers."""
    layers = model.model.layers
    indices = list(range(len(layers))) if indices is None else indices
    for i in indices:
        layers[i].mlp = TiledMLP(layers[i].mlp, chunk_tokens)
    log.info("tiled MLP: %d layers run their MLP in chunks of %d tokens", len(indices), chunk_tokens)
    return model
