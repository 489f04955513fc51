"""Allocation requests from a CUDA allocator trace (`torch.cuda.memory._record_memory_history()` then
`torch.cuda.memory._snapshot()`): the GPU counterpart of the meta-device trace in trace.py.

The snapshot's `device_traces[d]` lists the allocator's actions in order. An `alloc` starts a request; it
ends at its `free_completed` (when the allocator may hand the memory out again: after the streams that
used the block are done), or at `free_requested` in traces that record no completion. The clock is the
planner's event order: each alloc and each free is one event. What the trace sees that the meta trace
does not: cuDNN/cuBLAS workspaces, the allocator's rounding (sizes are the rounded block sizes), the
optimizer, communication buffers. `allocator_peaks` reads the same trace for what the caching allocator
actually used: the peak of live block bytes, and the peak of mapped segment bytes (reserved), so a plan
of the same requests can be set beside it. Pure Python: the pickle is read by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.memory.planner.core import Request


@dataclass(frozen=True)
class TracedBlock:
    request: Request
    addr: int  # where the caching allocator put it
    released: int = -1  # ends="requested": the clock when the allocator released it, if later (other streams)


def _events(snap: dict, device: int) -> list[dict]:
    if not isinstance(snap, dict) or "device_traces" not in snap:
        raise ValueError("not a torch.cuda.memory._snapshot() with a trace (no 'device_traces'): record it "
                         "with torch.cuda.memory._record_memory_history() before the steps")
    traces = snap["device_traces"]
    if device >= len(traces) or not traces[device]:
        raise ValueError(f"the snapshot has no allocator actions on device {device}: was "
                         "_record_memory_history() on while the steps ran?")
    return traces[device]


def _end_action(events: list[dict]) -> str:
    return "free_completed" if any(e.get("action") == "free_completed" for e in events) else "free_requested"


def blocks_from_snapshot(snap: dict, device: int = 0, first: int = 0, last: int | None = None,
                         ends: str = "auto") -> list[TracedBlock]:
    """Every allocation among the trace's actions [first, last) as a Request in event order. Blocks still
    live at the window's end end at its last clock value; frees of blocks allocated before it are not
    requests of the window and are skipped. `ends`: "auto" (see the module), or "requested": at the
    program's free even where the trace records a later completion (the planner's
    `memory.planner.reuse_after=free`; the completion is `release`)."""
    if ends not in ("auto", "requested"):
        raise ValueError(f"ends={ends!r}: use auto or requested")
    events = _events(snap, device)[first:last]
    end_action = _end_action(events) if ends == "auto" else "free_requested"
    live: dict[int, tuple[int, int]] = {}
    out: list[TracedBlock] = []
    pending: dict[int, int] = {}  # ends="requested": addr -> index in out of a block freed, not yet released
    t = 0
    for e in events:
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (t, int(e["size"]))
        elif act == end_action and e["addr"] in live:
            start, size = live.pop(e["addr"])
            if ends == "requested":
                pending[e["addr"]] = len(out)
            out.append(TracedBlock(Request(size, start, t), e["addr"]))  # half-open: free at event t
        else:
            if act == "free_completed" and e["addr"] in pending:  # no tick
                i = pending.pop(e["addr"])
                if t > out[i].request.end + 1:  # an allocation came between the free and the release
                    out[i] = TracedBlock(out[i].request, out[i].addr, t)
            continue
        t += 1
    out += [TracedBlock(Request(size, start, t), addr) for addr, (start, size) in live.items()]
    out.sort(key=lambda b: (b.request.start, b.addr))
    return out


def requests_from_snapshot(snap: dict, device: int = 0, first: int = 0, last: int | None = None,
                           ends: str = "auto") -> list[Request]:
    """The trace's allocations [first, last) as planner requests (see `blocks_from_snapshot`)."""
    return [b.request for b in blocks_from_snapshot(snap, device, first, last, ends)]


def allocator_peaks(snap: dict, device: int = 0) -> dict[str, int]:
    """What the caching allocator held while the trace ran: the peak of live block bytes (allocated) and
    of mapped segment bytes (reserved). The amounts at the start of recording are those at snapshot time
    with the trace's actions undone."""
    events = _events(snap, device)
    end_action = _end_action(events)
    segs = [s for s in snap.get("segments", []) if s.get("device", 0) == device]
    reserved = sum(s["total_size"] for s in segs)
    allocated = sum(b["size"] for s in segs for b in s.get("blocks", []) if b.get("state") == "active_allocated")
    for e in events:  # undo the trace to get the amounts at its start
        act = e.get("action")
        if act == "alloc":
            allocated -= int(e["size"])
        elif act == end_action:
            allocated += int(e["size"])
        elif act in ("segment_alloc", "segment_map"):
            reserved -= int(e["size"])
        elif act in ("segment_free", "segment_unmap"):
            reserved += int(e["size"])
    peak_alloc, peak_res = allocated, reserved
    for e in events:
        act = e.get("action")
        if act == "alloc":
            allocated += int(e["size"])
        elif act == end_action:
            allocated -= int(e["size"])
        elif act in ("segment_alloc", "segment_map"):
            reserved += int(e["size"])
        elif act in ("segment_free", "segment_unmap"):
            reserved -= int(e["size"])
        peak_alloc, peak_res = max(peak_alloc, allocated), max(peak_res, reserved)
    return {"allocated_peak_bytes": peak_alloc, "reserved_peak_bytes": peak_res}
