"""Serving a level-1 plan by request order: the device-independent half of the planned runtime.

A pluggable CUDA allocator (the GPU half, not here) calls `alloc(size)` / `free(offset)` for every request
a layer pass makes and turns offsets into addresses inside one preallocated region. `PlanReplayer`
decides, purely from the plan, which offset a request gets:

- the k-th request of a pass is matched with the k-th request of the trace; if the trace planned it
  (a transient) and its size is the traced one, it gets its planned offset;
- a request the trace did not plan (skeletal tensors, outputs, gradients: level 2 places those) returns
  None: the caller serves it from the normal allocator;
- a *miss* (a size that differs from the trace, more requests than traced: a shape or sequence-length
  change) switches the replayer off for the rest of the pass: every later request returns None, the
  reason is warned once and the misses are counted. It never guesses an offset after a miss, so planned
  memory cannot be handed out twice;
- check mode verifies every planned offset against the live planned blocks and refuses (None, counted,
  warned) any that would overlap one: a second line of defence if a free was lost or arrived late.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from longtrain.memory.planner.core import MemoryPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    size: int  # bytes the trace saw for this request
    plan_index: int  # index into plan.requests, -1 when the plan does not place this request


def replay_slots(trace, plan: MemoryPlan) -> list[Slot]:
    """The request sequence of a layer pass pair (forward then backward), mapped onto a level-1 plan."""
    planned = [k for k, t in enumerate(trace.requests) if t.role == "transient"]
    if len(planned) != len(plan.requests):
        raise ValueError(f"the plan has {len(plan.requests)} requests, the trace {len(planned)} transient ones: "
                         "the plan was made from another trace")
    index = {k: i for i, k in enumerate(planned)}
    return [Slot(t.request.size, index.get(k, -1)) for k, t in enumerate(trace.requests)]


class PlanReplayer:
    def __init__(self, plan: MemoryPlan, slots: list[Slot], *, check: bool = False):
        for s in slots:
            if s.plan_index >= 0 and plan.requests[s.plan_index].size != s.size:
                raise ValueError(f"slot size {s.size} differs from plan request {s.plan_index}'s "
                                 f"{plan.requests[s.plan_index].size} bytes")
        self.plan, self.slots, self.check = plan, slots, check
        self.region_bytes = plan.peak_bytes
        self.misses = 0  # requests at or after a mismatch in their pass (all go to the normal allocator)
        self.served = 0  # requests given a planned offset
        self.refused = 0  # check mode: planned offsets refused because they overlapped a live block
        self._warned: set[str] = set()
        self.begin_pass()

    def begin_pass(self) -> None:
        """Start of a layer's forward (the plan covers its forward and backward in one sequence)."""
        self._k = 0
        self._off = False
        self._live: dict[int, int] = {}  # offset -> size of the planned blocks handed out and not freed

    def _warn(self, kind: str, reason: str) -> None:
        """Once per kind of problem (length, size, overlap) for the replayer's life; misses keep counting."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("memory plan: %s; the normal allocator serves the rest of this pass", reason)

    def alloc(self, size: int) -> int | None:
        """Offset in the region for this request, or None: use the normal allocator."""
        k = self._k
        self._k += 1
        if self._off:
            self.misses += 1
            return None
        if k >= len(self.slots):
            self._off = True
            self.misses += 1
            self._warn("length", f"request {k} of the pass is beyond the {len(self.slots)} traced requests: "
                       "the layer's ops changed (shape, sequence length or kernel)")
            return None
        slot = self.slots[k]
        if size != slot.size:
            self._off = True
            self.misses += 1
            self._warn("size", f"request {k} asks {size} bytes, the plan expects {slot.size}: a shape or "
                       "sequence length differs from the traced one")
            return None
        if slot.plan_index < 0:
            return None
        off = self.plan.offsets[slot.plan_index]
        if self.check:
            for o, s in self._live.items():
                if o < off + size and off < o + s:
                    self.refused += 1
                    self._warn("overlap", f"check: request {k} at offset {off} (+{size}) overlaps the live block "
                               f"at {o} (+{s})")
                    return None
        self._live[off] = size
        self.served += 1
        return off

    def free(self, offset: int) -> None:
        """A planned block goes back (the caller only reports offsets this replayer handed out)."""
        if self._live.pop(offset, None) is None:
            raise ValueError(f"free of offset {offset}, which is not a live planned block")
