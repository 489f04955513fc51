"""Memory techniques applied as transforms: activation policy per layer (keep / recompute / swap,
activation.py), planned memory (planner/, arena.py)."""

from longtrain.memory.activation import apply_activation_policy
from longtrain.memory.arena import apply_memory_plan
from longtrain.memory.checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing", "apply_activation_policy", "apply_memory_plan"]
