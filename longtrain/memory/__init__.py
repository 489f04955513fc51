"""Memory techniques applied as transforms: activation checkpointing; planned memory (planner/, arena.py); swapping to come."""

from longtrain.memory.arena import apply_memory_plan
from longtrain.memory.checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing", "apply_memory_plan"]
