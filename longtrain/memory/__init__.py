"""Memory techniques applied as transforms: activation checkpointing (swapping and planning to come)."""

from longtrain.memory.checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
