"""The planned allocator's C core (`_alloc.c`) on its host backend, and the runtime's windows and plans.

The core is the code the GPU runs: the host backend only swaps cudaMallocAsync/cudaMalloc for malloc and
CUDA events for tickets a test completes. The GPU half (torch's allocator replaced) is tests/gpu."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from longtrain.memory.planner import MemoryPlan, solve_plan
from longtrain.memory.planner.runtime import (ALIGNMENT, PlanRuntime, attach_windows, host_core,
                                              plan_recorded_iteration)

S1, S2, S3 = 1, 2, 3  # stream handles


@pytest.fixture
def core():
    return host_core()


def _region(core, nbytes):
    assert core.lib.lt_region_alloc(nbytes) == 0
    return core.region_base()


def test_replay_serves_planned_offsets_and_falls_back_for_the_rest(core):
    base = _region(core, 4096)
    core.set_plan(0, [1024, 512, 2048], [0, -1, 1024])
    core.window_begin(0, S1)
    a, b, c = core.malloc(1024, S1), core.malloc(512, S1), core.malloc(2048, S1)
    assert a == base and c == base + 1024
    assert not base <= b < base + 4096  # unplanned: the fallback
    s = core.stats()
    assert (s["served"], s["fallback"], s["allocated"]) == (2, 1, 3584)
    for p in (a, b, c):
        core.free(p, S1)
    core.window_end()
    assert core.stats()["allocated"] == 0 and core.stats()["allocated_peak"] == 3584


def test_reserved_peak_counts_only_what_coexisted_with_the_region(core):
    a = core.malloc(8192, S1)
    core.free(a, S1)  # the fallback's peak, 8192, before any region
    _region(core, 2048)
    b = core.malloc(1024, S1)
    s = core.stats()
    assert s["reserved"] == 2048 + 1024 and s["reserved_peak"] == 8192  # not 2048 + 8192
    c = core.malloc(8192, S1)
    assert core.stats()["reserved_peak"] == 2048 + 1024 + 8192
    for p in (b, c):
        core.free(p, S1)
    core.lib.lt_reset_peaks()
    assert core.stats()["reserved_peak"] == 2048 and core.stats()["allocated_peak"] == 0


def test_meta_trace_plan_replays_through_the_allocator_core(core):
    """The level-1 plan of a traced layer, served by the C core (host backend) in the trace's own request
    order for two passes: every transient from the plan, nothing refused, nothing missed."""
    from longtrain.memory.planner.levels import plan_layer
    from longtrain.memory.planner.trace import trace_layer
    from longtrain.models.presets import PRESETS

    tr = trace_layer(PRESETS["debug"], 64)[0]
    plan = plan_layer(tr, time_limit_s=5, alignment=1)
    planned = iter(plan.offsets)
    offsets = {k: next(planned) if t.role == "transient" else -1 for k, t in enumerate(tr.requests)}
    order = sorted(range(len(tr.requests)), key=lambda k: tr.requests[k].request.start)  # allocation order
    _region(core, plan.peak_bytes)
    core.set_plan(0, [tr.requests[k].request.size for k in order], [offsets[k] for k in order])
    events = sorted([(t.request.start, 1, k) for k, t in enumerate(tr.requests)] +
                    [(t.request.end, 0, k) for k, t in enumerate(tr.requests)])
    for _ in range(2):
        core.window_begin(0, 1)
        ptr = {}
        for _, is_alloc, k in events:
            if is_alloc:
                ptr[k] = core.malloc(tr.requests[k].request.size, 1)
            else:
                core.free(ptr.pop(k), 1)
        core.window_end()
        for p in ptr.values():
            core.free(p, 1)
    st = core.stats()
    n_transient = sum(t.role == "transient" for t in tr.requests)
    assert st["served"] == 2 * n_transient and n_transient > 0
    assert (st["miss_size"], st["miss_length"], st["refused_overlap"], st["allocated"]) == (0, 0, 0, 0)


def test_size_mismatch_turns_the_plan_off_for_the_rest_of_the_window(core):
    base = _region(core, 4096)
    core.set_plan(0, [1024, 1024, 1024], [0, 1024, 2048])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    b = core.malloc(999, S1)  # another shape
    c = core.malloc(1024, S1)  # would match slot 2, but the alignment is lost: no guessing
    assert a == base and not base <= b < base + 4096 and not base <= c < base + 4096
    s = core.stats()
    assert (s["served"], s["miss_size"], s["after_miss"]) == (1, 1, 1)
    core.window_end()
    core.window_begin(0, S1)  # the next window replays again
    d = core.malloc(1024, S1)
    assert not base <= d < base + 1024  # slot 0 is still held by `a`: refused, not handed out twice
    assert core.stats()["refused_overlap"] == 1
    assert core.refusals() == [(0, 0, 1024, 0, 0, 0)]  # plan 0's request 0, blocked by plan 0's request 0 (held)
    e = core.malloc(1024, S1)
    assert e == base + 1024
    s = core.stats()  # what the fallback holds, by why it served it
    assert (s["fallback_after_miss"], s["fallback_refused"], s["fallback_unplanned"]) == (999 + 1024, 1024, 0)
    core.free(d)
    s = core.stats()
    assert (s["fallback_refused"], s["fallback_refused_peak"]) == (0, 1024)


def test_more_requests_than_planned_and_other_stream(core):
    base = _region(core, 2048)
    core.set_plan(0, [1024], [0])
    core.window_begin(0, S1)
    core.malloc(1024, S1)
    core.malloc(1024, S1)
    assert core.stats()["miss_length"] == 1
    core.window_begin(0, S1)  # closes the open window
    p = core.malloc(1024, S2)  # the window's stream is S1
    assert not base <= p < base + 2048 and core.stats()["miss_stream"] == 1


def test_plan_outside_the_region_is_refused(core):
    _region(core, 1024)
    with pytest.raises(ValueError, match="outside the region"):
        core.set_plan(0, [1024], [512])


def _waits(core):
    last = (ctypes.c_int64 * 2)()
    n = core.lib.lt_host_waits(last)
    return n, (last[0], last[1])


def test_record_stream_defers_the_free_until_the_other_stream_is_done(core):
    core.lib.lt_host_limit(1 << 20)
    a = core.malloc(1024, S1)  # the fallback serves it (no plan)
    core.record_stream(a, S2)  # a side stream (a D2H copy) reads it
    core.free(a, S1)
    assert core.stats()["deferred"] == 1 and core.stats()["allocated"] == 0  # freed, as torch counts it
    assert core.stats()["fallback_no_plan"] == 1024  # the memory itself is still held for S2
    core.lib.lt_host_complete_events()
    core.malloc(512, S1)  # the deferred free is processed first
    assert core.stats()["deferred"] == 0 and core.stats()["fallback_no_plan"] == 512


def test_planned_slot_freed_but_read_by_another_stream_is_reused_in_stream_order(core):
    base = _region(core, 1024)
    core.set_plan(0, [1024], [0])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    core.record_stream(a, S2)
    core.free(a, S1)  # the program is done with it; S2's copy may not be
    assert core.stats()["deferred"] == 1 and _waits(core)[0] == 0
    core.window_begin(0, S1)
    b = core.malloc(1024, S1)  # the plan's slot: S1 first waits for S2's event recorded at the free
    assert b == base and core.stats()["reuse_waits"] == 1
    assert _waits(core) == (1, (S1, 1))  # on the allocating stream, for ticket 1 (the free's event)
    assert core.stats()["deferred"] == 1  # `a` stays listed until S2 is really done with it
    core.lib.lt_host_complete_events()
    core.free(b, S1)
    core.lib.lt_flush(0)  # the next allocation or window would do it
    assert core.stats()["deferred"] == 0 and core.stats()["planned_live"] == 0
    core.window_begin(0, S1)
    assert core.malloc(1024, S1) == base and _waits(core)[0] == 1  # nothing left to wait for
    held = core.malloc(1024, S1)  # past the plan: the fallback
    core.window_begin(0, S1)
    assert core.malloc(1024, S1) != base  # slot held by the program (not freed): refused, never shared
    assert core.stats()["refused_overlap"] == 1 and core.refusals()[-1][5] == 0 and held


def test_wait_pairs_past_the_table_are_counted_together(core):
    """The report's waits by stream pair: a fixed table of 32; later pairs are counted in the last entry,
    both of its streams -1 (0 is CUDA's default stream)."""
    _region(core, 1024)
    core.set_plan(0, [1024, 1024], [0, 0])
    for i in range(34):
        core.window_begin(0, S1)
        a = core.malloc(1024, S1)
        core.record_stream(a, 100 + i)
        core.free(a, S1)
        core.free(core.malloc(1024, S1), S1)  # over `a`: waits for stream 100 + i
        core.lib.lt_host_complete_events()
    pairs = core.wait_pairs()
    assert pairs[:31] == [(S1, 100 + i, 1, 0) for i in range(31)] and pairs[31] == (-1, -1, 3, 0)
    assert core.stats()["served"] == 68 and core.stats()["reuse_waits"] == 34


def test_stream_ordered_reuse_guards_every_stream_and_every_byte(core):
    """A freed block still read by S2 is reused by a smaller request on S1: the rest of its bytes must not
    go to another stream without that stream waiting too; a slot partly held by the program is refused
    without queuing any wait."""
    base = _region(core, 2048)
    core.set_plan(0, [1024], [0])
    core.set_plan(1, [512], [0])
    core.set_plan(2, [512], [512])
    core.set_plan(3, [1024, 2048], [1024, 0])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    core.record_stream(a, S2)
    core.free(a, S1)
    core.window_begin(1, S1)
    assert core.malloc(512, S1) == base and _waits(core) == (1, (S1, 1))
    core.window_begin(2, S3)  # another stream asks for the other half of `a`'s bytes
    assert core.malloc(512, S3) == base + 512 and _waits(core) == (2, (S3, 1))  # it waits for S2 as well
    assert core.wait_pairs() == [(S1, S2, 1, 0), (S3, S2, 1, 0)]  # (waiting, on, reuse waits, cross waits)
    core.lib.lt_host_complete_events()
    core.lib.lt_flush(0)
    core.window_begin(3, S1)
    c = core.malloc(1024, S1)  # [1024, 2048): free
    core.record_stream(c, S2)
    core.free(c, S1)  # freed, copy pending
    waits = _waits(core)[0]
    d = core.malloc(2048, S1)  # [0, 2048) overlaps the two halves still held and `c`: refused
    assert not base <= d < base + 2048 and core.stats()["refused_overlap"] == 1
    assert _waits(core)[0] == waits and core.stats()["deferred"] == 1  # no wait queued, `c` still listed


def test_side_stream_request_takes_a_main_stream_slot_after_its_stream_waits(core):
    """The plan gives a freed main-stream tensor's bytes to a side-stream request (ZeRO-3's gather): the
    free leaves a ghost (an event on S1), the side stream waits for it; a same-stream request does not."""
    base = _region(core, 2048)
    core.set_plan(0, [1024, 1024, 512], [0, 0, 0], streams=[-1, S2, -1], ghosts=[True, True, False])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    core.free(a, S1)  # its stream S1 may still run kernels on it
    assert core.stats()["ghosts"] == 1 and _waits(core)[0] == 0
    b = core.malloc(1024, S2)  # planned on S2 at a's bytes: S2 waits for S1's event (ticket 1)
    assert b == base and _waits(core) == (1, (S2, 1)) and core.stats()["cross_stream_waits"] == 1
    core.free(b, S2)  # b leaves a ghost on S2: the next S1 request over it waits for S2 (ticket 2)
    c = core.malloc(512, S1)
    assert c == base and _waits(core) == (2, (S1, 2))  # not for S1's own ghost: stream order covers it
    assert core.wait_pairs() == [(S2, S1, 0, 1), (S1, S2, 0, 1)]
    core.free(c, S1)  # no ghost: the plan says no other stream takes these bytes after it
    assert core.stats()["ghosts"] == 2
    core.lib.lt_host_complete_events()
    core.window_begin(0, S1)  # completed ghosts go at the next window
    assert core.stats()["ghosts"] == 0
    core.malloc(1024, S1)
    core.malloc(1024, S3)  # the plan's stream for request 1 is S2: a miss, the fallback serves it
    s = core.stats()
    assert s["miss_stream"] == 1 and s["served"] == 4 and _waits(core)[0] == 2


def test_a_held_slot_is_refused_before_any_cross_stream_wait_is_queued(core):
    base = _region(core, 2048)
    core.set_plan(0, [1024, 1024, 2048], [0, 1024, 0], streams=[-1, -1, S2], ghosts=[True, False, True])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    b = core.malloc(1024, S1)
    core.free(a, S1)  # a's ghost; b is still held
    d = core.malloc(2048, S2)  # over a's ghost and b, which the program still holds
    assert not base <= d < base + 2048 and core.stats()["refused_overlap"] == 1 and _waits(core)[0] == 0
    assert core.refusals()[-1][3:] == (0, 1, 0)  # in the way: plan 0's request 1 (b), held
    core.free(b, S1)


@pytest.mark.parametrize("seed", range(8))
def test_random_two_stream_replay_waits_for_exactly_the_other_streams_ghosts(core, seed):
    """Record a random window whose requests come on S1 and S2, plan it, replay it: no two live blocks
    overlap, and every planned request queues a wait for each pending ghost of the other stream in its
    bytes, and no other wait. A gap window (level 2 plans all its requests together, so the streams share
    bytes) or a layer pass (its transients are one level-2 block, the side stream's requests sit beside it)."""
    window = ("gap", -1) if seed % 2 == 0 else ("fwd", 0)
    rng = random.Random(seed)
    ops, _ = _random_window(rng, 30)
    stream = {k: rng.choice([S1, S1, S2]) for op, k, _ in ops if op == "a"}
    core.lib.lt_set_record(1)
    seq = core.window_begin(-1, S1)

    def run():
        ptr = {}
        for op, k, size in ops:
            if op == "a":
                ptr[k] = (core.malloc(size, stream[k]), size)
            else:
                core.free(ptr.pop(k)[0], stream[k])
        core.window_end()
        for k in list(ptr):
            core.free(ptr.pop(k)[0], stream[k])

    run()
    core.lib.lt_set_record(0)
    ip = plan_recorded_iteration(core.events(), [window], [seq])
    assert ip.streams[0] == [stream[k] for k in range(30)]
    assert all(o >= 0 for o in ip.offsets[0][:20])  # planned, side stream included (the last may outlive)
    base = _region(core, ip.region_bytes)
    core.set_plan(0, ip.sizes[0], ip.offsets[0], ip.free_at[0], ip.streams[0], ip.ghosts[0])
    ghosts, ticket = [], 0  # the ghosts the core should hold: (offset, end, stream, ticket)
    freed = []  # every planned tensor freed so far: (offset, end, stream, left a ghost)

    def note_free(p, size, k, ticket):
        if base <= p < base + ip.region_bytes:
            freed.append((p - base, p - base + size, stream[k], ip.ghosts[0][k]))
            if ip.ghosts[0][k]:
                ticket += 1
                ghosts.append((p - base, p - base + size, stream[k], ticket))
        return ticket

    for rnd in range(3):
        core.window_begin(0, S1)
        live, ptr = {}, {}
        for op, k, size in ops:
            if op == "a":
                waits = _waits(core)[0]
                p = core.malloc(size, stream[k])
                for q, (qs, _) in live.items():
                    assert not (q < p + size and p < q + qs), "memory handed out twice"
                live[p] = (size, k)
                ptr[k] = p
                if base <= p < base + ip.region_bytes:
                    o = p - base
                    # the plan's part: every earlier tensor of another stream in these bytes left a ghost
                    assert all(g for fo, fe, fs, g in freed if fs != stream[k] and fo < o + size and o < fe)
                    due = [t for go, ge, gs, t in ghosts if gs != stream[k] and go < o + size and o < ge]
                    assert _waits(core)[0] - waits == len(due)
                    if due:
                        assert _waits(core)[1] == (stream[k], due[-1])
            else:
                p = ptr.pop(k)
                size, _ = live.pop(p)
                core.free(p, stream[k])
                ticket = note_free(p, size, k, ticket)
        for k, p in ptr.items():
            core.free(p, stream[k])
            ticket = note_free(p, live[p][0], k, ticket)
        core.window_end()
    s = core.stats()
    assert s["served"] > 0 and s["refused_overlap"] == 0 and s["ghosts"] == len(ghosts)
    assert (s["cross_stream_waits"] > 0) == (window[0] == "gap")  # a pass's transients keep to their block


@pytest.mark.parametrize("reuse_after", ["free", "release"])
def test_a_tensor_another_stream_reads_is_reused_from_its_free_or_from_its_release(core, reuse_after):
    """A tensor the program frees while another stream (S2: NCCL's, a copy's) still reads it. With
    `reuse_after="free"` the plan gives its bytes to the next request, whose stream waits for S2 at replay;
    with "release" only to the requests after the point where the recording saw S2 done, so at replay, with
    the same timing, nothing waits."""

    def step():
        a = core.malloc(1024, S1)
        core.record_stream(a, S2)
        core.free(a, S1)  # S2 still reads it
        b = core.malloc(1024, S1)  # S2 is not done yet
        core.lib.lt_host_complete_events()  # now it is: seen at the next request
        c = core.malloc(1024, S1)
        core.free(b, S1)
        core.free(c, S1)

    core.lib.lt_set_record(1)
    seq = core.window_begin(-1, S1)
    step()
    core.window_end()
    core.lib.lt_set_record(0)
    assert [e[0] for e in core.events()] == [0, 1, 0, 2, 0, 1, 1]  # alloc a, free a, b, release a, c, ...
    ip = plan_recorded_iteration(core.events(), [("gap", -1)], [seq], reuse_after=reuse_after)
    a, b, c = ip.offsets[0]
    assert ip.region_bytes == 2048 and b != c
    assert (b == a) == (reuse_after == "free") and (c == a) == (reuse_after == "release")
    base = _region(core, ip.region_bytes)
    core.set_plan(0, ip.sizes[0], ip.offsets[0], ip.free_at[0], ip.streams[0], ip.ghosts[0])
    for _ in range(2):
        waits = _waits(core)[0]
        core.window_begin(0, S1)
        step()
        core.window_end()
        assert _waits(core)[0] - waits == (1 if reuse_after == "free" else 0)  # b waits for S2's event
    s = core.stats()
    assert s["served"] == 6 and s["refused_overlap"] == 0 and s["allocated"] == 0 and base


def test_a_tensor_another_stream_reads_past_the_iteration_keeps_its_bytes_to_the_end_with_release(core):
    core.lib.lt_set_record(1)
    seq = core.window_begin(-1, S1)
    a = core.malloc(1024, S1)
    core.record_stream(a, S2)
    core.free(a, S1)  # S2 is not seen done before the iteration ends
    for _ in range(2):
        core.free(core.malloc(1024, S1), S1)
    core.window_end()
    core.lib.lt_set_record(0)
    free = plan_recorded_iteration(core.events(), [("gap", -1)], [seq], reuse_after="free")
    release = plan_recorded_iteration(core.events(), [("gap", -1)], [seq], reuse_after="release")
    assert free.region_bytes == 1024 and release.region_bytes == 2048  # a beside the later ones
    assert release.free_at == free.free_at == [[0, 0, 0]]  # the program's free: what check mode compares
    with pytest.raises(ValueError, match="reuse_after='later'"):
        plan_recorded_iteration(core.events(), [("gap", -1)], [seq], reuse_after="later")


@pytest.mark.parametrize("seen_released", [False, True])
def test_next_pass_keeps_a_tensor_another_stream_reads_through_the_next_layer_pass(core, seen_released):
    """`reuse_after="next_pass"`: a tensor freed in layer pass fwd0 while S2 (a swap's D2H copy) still reads
    it keeps its bytes through the gap and the next pass, fwd1, and gives them up after; or from the
    release where the recording saw S2 done before fwd1 ended. Sizes make each rule's peak differ: a 1024
    (read by S2), b 512 in the gap, c 1024 in fwd1, e 1536 in the last gap."""
    layout = [("fwd", 0), ("gap", -1), ("fwd", 1), ("gap", -1)]

    def step(record):
        seqs = []
        for w, size in enumerate([1024, 512, 1024, 1536]):
            seqs.append(core.window_begin(w, S1))
            if w == 0:
                a = core.malloc(size, S1)
                core.record_stream(a, S2)
                core.free(a, S1)  # S2 still reads it
                continue
            if w == 2 and seen_released and record:
                core.lib.lt_host_complete_events()  # S2 done: seen at c's request
            core.free(core.malloc(size, S1), S1)
        core.window_end()
        return seqs

    core.lib.lt_set_record(1)
    seqs = step(True)
    core.lib.lt_set_record(0)
    assert [e[0] for e in core.events()].count(2) == (1 if seen_released else 0)
    region = {r: plan_recorded_iteration(core.events(), layout, seqs, reuse_after=r).region_bytes
              for r in ("free", "next_pass", "release")}
    if seen_released:  # a is gone before c: c and e may take its bytes under both later rules
        assert region == {"free": 1536, "next_pass": 1536, "release": 1536}
    else:  # next_pass: a beside b and c, not e; release (never seen): a beside all of them
        assert region == {"free": 1536, "next_pass": 2048, "release": 2560}
    ip = plan_recorded_iteration(core.events(), layout, seqs, reuse_after="next_pass")
    _region(core, ip.region_bytes)
    for p in range(len(layout)):
        core.set_plan(p, ip.sizes[p], ip.offsets[p], ip.free_at[p], ip.streams[p], ip.ghosts[p])
    step(False)
    s = core.stats()
    assert s["served"] == 4 and s["refused_overlap"] == 0 and s["fallback"] == 4 and s["allocated"] == 0


def test_side_stream_requests_are_planned_with_their_stream_or_left_out():
    """A side stream's request freed inside the iteration is planned on level 2 with its stream; only
    requests whose bytes another stream's request shares get a ghost; side_streams=False leaves it out."""
    # window 0 on S1: a (S1) and g (S2, a gather) live together, g freed in window 1; c (S1) reuses g's bytes
    ev = [(0, 0, 0, 1024, 1, 1, S1), (0, 0, 1, 2048, 0, 2, S2), (1, 0, -1, 1024, 0, 1, S1),
          (1, 1, -1, 2048, 0, 2, S2), (0, 1, 0, 2048, 1, 3, S1), (1, 1, -1, 2048, 0, 3, S1)]
    layout = [("fwd", 0), ("fwd", 1)]
    plan = plan_recorded_iteration(ev, layout, [0, 1])
    assert plan.streams == [[S1, S2], [S1]] and plan.offsets[0][1] >= 0 and plan.free_at[0][1] == 1
    assert plan.unplanned == {} and plan.region_bytes == 3072
    g, c = plan.offsets[0][1], plan.offsets[1][0]
    assert g < c + 2048 and c < g + 2048  # the plan reuses g's bytes for c (a 3072-byte region)
    assert plan.ghosts[0][1] and plan.ghosts[1][0]  # so both must leave a ghost
    a = plan.offsets[0][0]
    assert plan.ghosts[0][0] == (a < g + 2048 and g < a + 1024)
    off = plan_recorded_iteration(ev, layout, [0, 1], side_streams=False)
    assert off.offsets[0][1] == -1 and off.unplanned["side_stream"]["requests"] == 1
    assert not any(x for gs in off.ghosts for x in gs)


def test_check_mode_does_not_count_a_freed_block_whose_copy_is_pending_as_leaked(core):
    _region(core, 1024)
    core.lib.lt_set_check(1)
    core.set_plan(0, [1024], [0])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    core.record_stream(a, S2)
    core.free(a, S1)  # freed in its window; the D2H copy outlasts the window
    core.window_begin(-1, S1)
    s = core.stats()
    assert (s["check_lifetime"], s["check_leaked"], s["deferred"]) == (0, 0, 1)


def test_out_of_memory_waits_for_deferred_frees_then_gives_up(core):
    core.lib.lt_host_limit(4096)
    a = core.malloc(4096, S1)
    core.record_stream(a, S2)
    core.free(a, S1)  # deferred: S2 has not finished with it
    b = core.malloc(4096, S1)  # full: the retry waits for every stream, then the deferred memory serves
    assert b and core.stats()["oom_retries"] == 1 and core.stats()["deferred"] == 0
    assert core.malloc(512, S1) == 0  # nothing left to wait for: out of memory (torch raises it)
    assert core.stats()["oom_retries"] == 2 and core.stats()["allocated"] == 4096


def test_record_mode_logs_allocations_and_frees(core):
    core.lib.lt_set_record(1)
    seq = core.window_begin(-1, S1)
    a = core.malloc(100, S1)
    b = core.malloc(200, S2)
    core.free(a, S1)
    core.window_end()
    core.free(b, S2)
    ev = core.events()
    assert [(e[0], e[1], e[2], e[3], e[4]) for e in ev] == [
        (0, seq, 0, 100, 1), (0, seq, 1, 200, 0), (1, seq, -1, 100, 0), (1, -1, -1, 200, 0)]
    plan = plan_recorded_iteration(ev, [("fwd", 0)], [seq])
    assert plan.sizes == [[100, 200]] and plan.offsets[0][1] == -1  # b: another stream, outlives the window
    assert plan.offsets[0][0] >= 0 and plan.level1[0].requests[0].size == 100
    core.lib.lt_record_clear()
    seq = core.window_begin(-1, S1)
    c = core.malloc(300, S1)
    core.record_stream(c, S2)  # read by a copy stream after its free: planned up to the free all the same
    core.free(c, S1)
    ev = core.events()
    assert ev[-1][4] == 1 and plan_recorded_iteration(ev, [("fwd", 0)], [seq]).offsets == [[0]]


def test_check_mode_counts_lifetimes_that_break_the_plan(core):
    _region(core, 2048)
    core.lib.lt_set_check(1)
    core.set_plan(0, [1024, 1024], [0, 1024])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    core.malloc(1024, S1)
    core.free(a, S1)
    core.window_end()  # the second block is still live
    assert core.stats()["check_leaked"] == 1
    core.window_begin(-1, S1)
    assert core.stats()["check_lifetime"] == 0


def test_unknown_free_is_counted_not_crashed(core):
    core.free(12345, S1)
    assert core.stats()["unknown_free"] == 1


def _random_window(rng, n):
    """n requests; each freed after 0-4 later requests (some outlive the window)."""
    ops, live = [], []
    for k in range(n):
        ops.append(("a", k, rng.choice([512, 1024, 1536, 4096, 8192])))
        live.append((k, rng.randint(0, 4)))
        keep = []
        for j, left in live:
            if left == 0:
                ops.append(("f", j, 0))
            else:
                keep.append((j, left - 1))
        live = keep
    return ops, [j for j, _ in live]


@pytest.mark.parametrize("seed", range(12))
def test_random_replay_never_hands_out_live_memory(core, seed):
    """Record a random window, plan it, replay it with perturbations (late frees, a changed size, blocks
    kept across windows): no two live blocks ever overlap, planned ones lie in the region."""
    rng = random.Random(seed)
    ops, survivors = _random_window(rng, 30)
    core.lib.lt_set_record(1)
    seq = core.window_begin(-1, S1)
    ptr = {}
    for op, k, size in ops:
        if op == "a":
            ptr[k] = core.malloc(size, S1)
        else:
            core.free(ptr.pop(k), S1)
    core.window_end()
    for k in list(ptr):
        core.free(ptr.pop(k), S1)
    core.lib.lt_set_record(0)
    ip = plan_recorded_iteration(core.events(), [("fwd", 0)], [seq])
    assert ip.level1[0].peak_bytes >= ip.level1[0].lower_bound_bytes
    peak = ip.region_bytes
    base = _region(core, peak)
    core.set_plan(0, ip.sizes[0], ip.offsets[0], ip.free_at[0])
    live: dict[int, int] = {}  # ptr -> size, over all windows

    def check_new(p, size):
        for q, s in live.items():
            assert not (q < p + size and p < q + s), "memory handed out twice"
        live[p] = size

    held = []
    for rnd in range(6):
        core.window_begin(0, S1)
        ptr = {}
        late = set(rng.sample(range(30), 3)) if rnd % 2 else set()
        bad = rng.randrange(30) if rnd == 3 else -1
        for op, k, size in ops:
            if op == "a":
                size = size + 512 if k == bad else size
                p = core.malloc(size, S1)
                check_new(p, size)
                if base <= p < base + peak:
                    assert p + size <= base + peak
                ptr[k] = (p, size)
            elif k not in late:
                p, _ = ptr.pop(k)
                del live[p]
                core.free(p, S1)
        core.window_end()
        for k, (p, _) in list(ptr.items()):
            if rng.random() < 0.5:
                held.append(p)  # kept into the next windows
            else:
                del live[p]
                core.free(p, S1)
        if rnd >= 4:
            for p in held:
                del live[p]
                core.free(p, S1)
            held = []
    assert core.stats()["served"] > 0


# ---- the runtime's windows around layers, on CPU with simulated device requests --------------------

class _Requests(torch.autograd.Function):
    """Makes a fixed pattern of core requests in forward and backward, like a layer's temporaries."""

    @staticmethod
    def forward(ctx, core, scale, x, hold=False):
        ctx.core, ctx.scale = core, scale
        t = [core.malloc(scale * s, S1) for s in (4096, 1024, 2048)]
        core.free(t[1], S1)
        if ctx.needs_input_grad[2]:
            ctx.saved_block = core.malloc(scale * 512, S1)  # skeletal: lives until backward
        core.free(t[0], S1)
        ctx.held = t[2] if hold else None  # `hold`: a temporary kept to the backward (outlives its plan)
        if not hold:
            core.free(t[2], S1)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        core, s = ctx.core, ctx.scale
        a = core.malloc(s * 8192, S1)
        b = core.malloc(s * 1024, S1)
        core.free(a, S1)
        core.free(ctx.saved_block, S1)
        core.free(b, S1)
        if ctx.held:
            core.free(ctx.held, S1)
        return None, None, g * 2, None


class _Layer(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core, self.scale, self.hold = core, 1, False
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _Requests.apply(self.core, self.scale, x, self.hold) * self.w


def _forward_backward(layers) -> None:
    """One training step through a stack of fake layers: forward, then backward."""
    x = torch.ones(4, requires_grad=True)
    for m in layers:
        x = m(x)
    x.sum().backward()


def test_runtime_records_then_replays_both_levels(core, caplog, tmp_path):
    layers = nn.ModuleList(_Layer(core) for _ in range(3))
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, check=True, save_dir=str(tmp_path / "run"),
                     record_iteration=1)
    attach_windows(layers, rt)

    _forward_backward(layers)  # warmup
    assert rt.state == "warmup"
    _forward_backward(layers)  # recorded
    _forward_backward(layers)  # plans made at its start, replayed
    assert rt.state == "replay"
    # windows: fwd0 gap fwd1 gap fwd2 gap bwd2 gap bwd1 gap bwd0 gap
    assert rt.plan.layout == [("fwd", 0), ("gap", -1), ("fwd", 1), ("gap", -1), ("fwd", 2), ("gap", -1),
                              ("bwd", 2), ("gap", -1), ("bwd", 1), ("gap", -1), ("bwd", 0), ("gap", -1)]
    s = core.stats()
    # per layer: 3 forward transients, 2 backward ones (level 1) and the saved block (level 2)
    assert s["served"] == 3 * 6 and s["fallback"] == 2 * 3 * 6  # the warm-up and the recorded steps
    assert (s["miss_size"], s["refused_overlap"], s["check_lifetime"], s["check_leaked"]) == (0, 0, 0, 0)
    fwd = rt.plan.level1[0]
    assert fwd.peak_bytes == fwd.lower_bound_bytes == 7168  # the three temporaries are live together
    assert rt.plan.level1[0] is rt.plan.level1[2]  # passes with the same requests share one solve
    # level 2's peak: the first backward pass (9216) while every layer's saved block (512) is live
    assert s["region"] == rt.plan.level2.peak_bytes == rt.plan.level2.lower_bound_bytes == 9216 + 3 * 512
    saved = MemoryPlan.from_json(tmp_path / "run" / "memory_plan_runtime_rank0_level2.json")  # what --png draws
    assert saved.offsets == rt.plan.level2.offsets and len(rt.saved) == 2
    layers[1].hold = True  # a tensor outlives its recorded lifetime: its slot is refused to later requests
    _forward_backward(layers)
    layers[1].hold = False
    s1 = core.stats()
    assert s1["refused_overlap"] > 0 and s1["check_lifetime"] == 1 and s1["check_leaked"] == 1
    worst = rt.refusal_report()[0]
    assert worst["in_the_way"] == {"window": 2, "pass": "fwd1", "k": 2, "size": 2048,
                                   "freed_waiting_on_stream": False}  # still held by the program
    assert rt.lifetime_report() == [{"count": 1, "request": {"window": "2:fwd1", "k": 2, "size": 2048},
                                     "planned_free": "2:fwd1", "freed_in": "8:bwd1"}]  # held to its backward
    assert s1["allocated"] == 0  # the refused requests came from the fallback and went back
    _forward_backward(layers)
    s = core.stats()
    assert s["refused_overlap"] == s1["refused_overlap"]  # lifetimes as recorded again: no refusal
    with torch.no_grad():  # eval: no windows, nothing planned
        layers[0](torch.ones(4))
    for m in layers:
        m.scale = 2  # a longer sequence: every size changes
    with caplog.at_level(logging.WARNING):
        _forward_backward(layers)
        _forward_backward(layers)
    s2 = core.stats()
    assert s2["miss_size"] == 12 and s2["served"] == s["served"]  # 6 layer passes x 2 steps, none served
    assert "size differs from the plan" in caplog.text
    assert s2["allocated"] == 0  # every request came back
    path = rt.save_report()  # what the trainer writes when training ends
    assert path == str(tmp_path / "run" / "memory_plan_runtime_rank0_report.json")
    rep = json.loads(Path(path).read_text())
    assert (rep["state"], rep["served"], rep["miss_size"], rep["refused_overlap"]) == (
        "replay", s2["served"], 12, s1["refused_overlap"])
    assert rep["refusals"][0]["in_the_way"]["pass"] == "fwd1" and rep["lifetimes"][0]["freed_in"] == "8:bwd1"


class _Embed(torch.autograd.Function):
    """The model's first op (an embedding): its output's block lives until the first layer's backward is
    done, i.e. past the first layer's forward, where an iteration starts without the model hook."""

    @staticmethod
    def forward(ctx, core, x):
        ctx.core, ctx.block = core, core.malloc(256, S1)
        if not ctx.needs_input_grad[1]:  # evaluation: nothing kept for a backward
            core.free(ctx.block, S1)
        return x * 1

    @staticmethod
    def backward(ctx, g):
        ctx.core.free(ctx.block, S1)
        return None, g


class _Net(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core
        self.layers = nn.ModuleList(_Layer(core) for _ in range(2))

    def forward(self, x):
        x = _Embed.apply(self.core, x)
        for m in self.layers:
            x = m(x)
        return x


@pytest.mark.parametrize("hook_model", [True, False])
def test_the_models_forward_starts_the_iteration_so_the_embedding_is_planned(core, hook_model):
    net = _Net(core)
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, check=True)  # records iteration 2
    attach_windows(net.layers, rt, model=net if hook_model else None)
    for _ in range(5):
        net(torch.ones(4, requires_grad=True)).sum().backward()
    assert rt.state == "replay" and rt.iteration == 4
    s = core.stats()
    assert (s["miss_size"], s["miss_length"], s["refused_overlap"], s["check_lifetime"]) == (0, 0, 0, 0)
    if hook_model:  # gap(embedding) fwd0 gap fwd1 gap bwd1 gap bwd0 gap
        assert rt.plan.layout[0] == ("gap", -1) and len(rt.plan.layout) == 9
        assert rt.plan.unplanned == {} and rt.plan.sizes[0] == [256] and rt.plan.offsets[0][0] >= 0
        assert rt.plan.free_at[0][0] == 8  # freed after bwd0, in the last gap
        assert s["served"] == 2 * (1 + 2 * 6)  # 2 replayed steps: the embedding and each layer's 6 requests
    else:  # fwd0 gap fwd1 gap bwd1 gap bwd0 gap(next embedding)
        assert rt.plan.layout[0] == ("fwd", 0) and len(rt.plan.layout) == 8
        assert rt.plan.unplanned["outlives_iteration"]["requests"] == 1  # the embedding, to the fallback
        assert s["served"] == 2 * 2 * 6
    windows = s["windows"]
    with torch.no_grad():  # an evaluation forward: no iteration, no window
        net(torch.ones(4))
    assert rt.iteration == 4 and core.stats()["windows"] == windows


@pytest.mark.parametrize("iterations", ["step", "model"])
def test_with_gradient_accumulation_an_iteration_is_the_trainers_step(core, iterations):
    """Two micro-steps per optimizer step, the step's own request after the last one (as an optimizer
    makes): when the trainer's step starts the iteration (the trainer sets "step"), every iteration
    repeats and is served whole; when each forward does, the micro-steps differ and the plan misses."""
    net = _Net(core)
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1)
    attach_windows(net.layers, rt, model=net)
    assert rt.iterations == "model"
    rt.iterations = iterations
    for _ in range(6):
        if iterations == "step":
            rt.begin_iteration()
        for _micro in range(2):
            net(torch.ones(4, requires_grad=True)).sum().backward()
        core.free(core.malloc(4096, S1), S1)  # the optimizer step
    s = core.stats()
    assert rt.state == "replay" and s["refused_overlap"] == 0
    if iterations == "step":
        assert rt.iteration == 5 and len(rt.plan.layout) == 1 + 2 * 8  # a gap, then each micro-step's 8 windows
        assert (s["miss_size"], s["miss_length"]) == (0, 0)
        assert s["served"] == 3 * (2 * (1 + 2 * 6) + 1)  # steps 3-5 replayed whole, the step's request too
    else:
        assert rt.iteration == 11 and s["miss_length"] > 0  # the optimizer's request after every other forward


def test_what_runs_between_the_trainers_steps_is_no_part_of_the_plan(core):
    """The trainer ends each iteration when its step returns (`end_iteration`): what runs between steps
    (an evaluation, a checkpoint: after some steps only, each of another size) is served by the fallback
    with no miss, the recorded step's aftermath takes no room in the plan, and a tensor made in the step
    and freed after it (the loss the trainer logs) is left out of the plan."""
    net = _Net(core)
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, check=True)  # records iteration 2
    attach_windows(net.layers, rt, model=net)
    rt.iterations = "step"
    for step in range(7):
        rt.begin_iteration()
        net(torch.ones(4, requires_grad=True)).sum().backward()
        loss = core.malloc(512, S1)
        rt.end_iteration()
        core.free(loss, S1)
        for _ in range(step % 3):  # after steps 1, 2 (the recorded one), 4 and 5
            core.free(core.malloc((1 << 20) + 4096 * step, S1), S1)
    s = core.stats()
    assert rt.state == "replay" and rt.iteration == 6
    assert s["served"] == 4 * rt.plan.planned() > 0  # steps 3-6, whole
    assert all(s[k] == 0 for k in ("miss_size", "miss_length", "miss_stream", "refused_overlap", "check_lifetime",
                                   "check_leaked")), s
    assert rt.plan.region_bytes < 1 << 20  # the megabytes after the recorded step are not in it
    assert sum(u["requests"] for u in rt.plan.unplanned.values()) == 1  # the loss, freed after the step
    assert s["allocated"] == 0


_TRAINER_SCRIPT = r"""
import json
import sys
import torch
from longtrain.config import load_config
from longtrain.memory.planner.runtime import PlanRuntime, attach_windows, host_core
from longtrain.parallel import init_mesh, parallelize
from longtrain.train.trainer import Trainer

def attach(model, cfg, device, rank=0):  # what apply_memory_plan does on CUDA, with a host core
    model.plan_runtime = PlanRuntime(host_core(), device, stream_of=lambda: 1, save_dir=cfg.train.output_dir,
                                     rank=rank)
    attach_windows(model.model.layers, model.plan_runtime, model=model)
    return model

parallelize.apply_memory_plan = attach
cfg = load_config("debug", ["parallel.engine=torch", "memory.planner.enabled=true", "train.steps=3",
                            "checkpoint.resume=null", "logging.wandb.mode=disabled",
                            "train.output_dir=" + sys.argv[1]])
mesh = init_mesh(cfg.train.device, cfg.launch.backend, cfg.launch.timeout_s, need_group=False)
tr = Trainer(cfg, mesh)
forwards = []
tr.model.register_forward_pre_hook(lambda *a: forwards.append(1))  # training forwards (eval calls model.model)
tr.run()
rt = tr.model.plan_runtime
report = json.load(open(sys.argv[1] + "/memory_plan_runtime_rank0_report.json"))  # written when training ends
print("RESULT", cfg.train.grad_accum, len(forwards), rt.iterations, rt.iteration, rt.state, report["state"],
      report["served"] + report["fallback"])
"""


def test_the_trainers_step_starts_the_planned_iteration(tmp_path):
    """With the planner on, the trainer's step, not each forward, starts an iteration: under the debug
    recipe's gradient accumulation (2 micro-steps) three steps are iterations 0-2 and the third is
    recorded; when training ends the runtime's report is in the run directory. The planned allocator needs
    CUDA; a host core stands in (CPU tensors ask it for nothing: what is tested is who starts the
    iterations, and that the report is written)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _TRAINER_SCRIPT, str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=300, env=env, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    assert line.split()[1:] == ["2", "6", "step", "2", "recording", "recording", "0"]  # CPU tensors: no request


class _Gathered(torch.autograd.Function):
    """A ZeRO-3-like layer: its weight is gathered into a buffer on a side stream (S2) in forward and again
    in backward, next to a main-stream temporary; the buffers are freed inside the pass."""

    @staticmethod
    def forward(ctx, core, x):
        ctx.core = core
        g, t = core.malloc(2048, S2), core.malloc(1024, S1)
        core.record_stream(g, S1)  # the main stream reads the gathered weight
        core.free(t, S1)
        core.free(g, S2)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        core = ctx.core
        g = core.malloc(2048, S2)
        core.record_stream(g, S1)
        core.free(g, S2)
        t = core.malloc(3072, S1)
        core.free(t, S1)
        return None, grad * 2


class _GatheredLayer(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _Gathered.apply(self.core, x) * self.w


@pytest.mark.parametrize("side_streams", [True, False])
def test_side_stream_gathers_are_planned_and_reused_in_stream_order(core, side_streams):
    layers = nn.ModuleList(_GatheredLayer(core) for _ in range(3))
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, check=True, record_iteration=1,
                     side_streams=side_streams)
    attach_windows(layers, rt)

    def step():
        _forward_backward(layers)
        core.lib.lt_host_complete_events()  # the device catches up between steps

    for _ in range(4):
        step()
    s = core.stats()
    assert (s["miss_size"], s["miss_stream"], s["refused_overlap"], s["check_lifetime"]) == (0, 0, 0, 0)
    gathers = [(p, k) for p, ss in enumerate(rt.plan.streams) for k, x in enumerate(ss) if x == S2]
    assert len(gathers) == 6  # one per layer pass
    if side_streams:
        assert rt.plan.unplanned == {} and all(rt.plan.offsets[p][k] >= 0 for p, k in gathers)
        assert s["served"] == 2 * 6 * 2  # 2 replayed steps, 6 passes, a gather and a temporary each
        # the plan gives a gather's bytes to main-stream temporaries (and back): both leave ghosts, and
        # within a step (before the device catches up) the other stream waits for them
        assert any(rt.plan.ghosts[p][k] for p, k in gathers) and s["cross_stream_waits"] > 0
        waits = rt.report()["waits"]  # by stream pair, named from the windows' stream
        assert {(w["waiting"], w["on"]) for w in waits} <= {("main", f"stream {S2:#x}"), (f"stream {S2:#x}", "main")}
        assert sum(w["cross_stream_waits"] for w in waits) == s["cross_stream_waits"]
        rt.stream_names[S2] = "gathers"  # a stream the report knows by name (the swap's copy streams)
        assert {(w["waiting"], w["on"]) for w in rt.report()["waits"]} <= {("main", "gathers"), ("gathers", "main")}
    else:
        assert rt.plan.unplanned["side_stream"]["requests"] == 6
        assert all(rt.plan.offsets[p][k] == -1 for p, k in gathers) and s["served"] == 2 * 6
        assert s["cross_stream_waits"] == 0


def test_recompute_inside_backward_belongs_to_the_backward_window(core):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = nn.ModuleList(checkpoint_wrapper(_Layer(core), checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                           for _ in range(2))
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, check=True, record_iteration=1)
    attach_windows(layers, rt)
    for _ in range(3):
        x = torch.ones(4, requires_grad=True)
        for m in layers:
            x = m(x)
        x.sum().backward()
    assert [w for w in rt.plan.layout if w[0] != "gap"] == [("fwd", 0), ("fwd", 1), ("bwd", 1), ("bwd", 0)]
    # the backward window holds the recomputed forward's requests as well as the backward's
    assert len(rt.plan.sizes[rt.plan.layout.index(("bwd", 1))]) == 4 + 2
    s = core.stats()
    assert s["served"] > 0 and (s["miss_size"], s["refused_overlap"], s["check_lifetime"]) == (0, 0, 0)


def test_plans_are_shared_by_identical_windows_and_aligned():
    ev = [(0, 0, 0, 1000, 1, 1, S1), (1, 0, -1, 1000, 0, 1, S1), (0, 1, 0, 1000, 1, 2, S1),
          (1, 1, -1, 1000, 0, 2, S1), (0, 2, 0, 3000, 1, 3, S1), (0, 2, 1, 100, 1, 4, S1),
          (1, 2, -1, 3000, 0, 3, S1), (1, 3, -1, 100, 0, 4, S1)]
    plan = plan_recorded_iteration(ev, [("fwd", 0), ("fwd", 1), ("bwd", 0), ("gap", -1)], [0, 1, 2, 3])
    assert plan.level1[0] is plan.level1[1] and plan.level1[2].peak_bytes == 3072 and ALIGNMENT == 512
    assert plan.offsets[2][1] >= 0 and plan.free_at[2] == [2, 3]  # the 100 bytes cross into the gap
    assert plan.region_bytes == 3072 + 512


def test_layer_passes_alike_share_their_plan_whatever_runs_between_their_requests():
    """Level 1 plans a pass's own requests, so only their order matters: a side stream's gather in the
    middle of the second pass (planned on level 2) must not make it a second solve. With 32 layers every
    pass would otherwise be one, each taking its share of the time limit."""
    ev = [(0, 0, 0, 1000, 1, 1, S1), (0, 0, 1, 2000, 1, 2, S1), (1, 0, -1, 1000, 0, 1, S1), (1, 0, -1, 2000, 0, 2, S1),
          (0, 1, 0, 1000, 1, 3, S1), (0, 1, 1, 4096, 0, 4, S2), (0, 1, 2, 2000, 1, 5, S1), (1, 1, -1, 1000, 0, 3, S1),
          (1, 1, -1, 2000, 0, 5, S1), (1, 1, -1, 4096, 0, 4, S2)]
    plan = plan_recorded_iteration(ev, [("fwd", 0), ("fwd", 1)], [0, 1])
    assert plan.level1[0] is plan.level1[1]
    assert [(r.start, r.end) for r in plan.level1[0].requests] == [(0, 2), (1, 3)]  # their own order
    a, b, g = plan.offsets[1][0], plan.offsets[1][2], plan.offsets[1][1]
    assert min(a, b) >= 0 and g >= 0 and b - a == plan.offsets[0][1] - plan.offsets[0][0]  # one layout, two places
    assert a + 1024 <= b or b + 2048 <= a  # live together: apart
    assert g + 4096 <= min(a, b) or max(a + 1024, b + 2048) <= g  # the gather, live over them: apart too


def test_the_time_limit_bounds_the_whole_plan_not_each_solve(monkeypatch):
    """Every rank waits in its next collective for the slowest rank's plan (on two H200s one rank planned
    for 80 s with 20 s per solve), so time_limit_s is the plan's in all: each MIP gets the time left
    divided among the solves left, level 2 the last, and none once the time is spent (the greedy plan)."""
    import longtrain.memory.planner.runtime as rt

    clock, calls, took = [100.0], [], iter([0.0, 9.0, 5.0, 0.0])  # seconds each solve takes

    def timed_solve(reqs, limit, *, use_mip=True, **kw):
        calls.append((round(limit, 6), use_mip, kw["info"]["level"]))
        clock[0] += next(took)
        return solve_plan(reqs, limit, use_mip=False, **kw)

    monkeypatch.setattr(rt, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(rt, "solve_plan", timed_solve)
    sizes = [1000, 1000, 3000, 5000]  # four layer passes, the first two alike: three level-1 solves
    ev = [e for p, n in enumerate(sizes) for e in ((0, p, 0, n, 1, p + 1, S1), (1, p, -1, n, 0, p + 1, S1))]
    layout = [("fwd", 0), ("fwd", 1), ("bwd", 1), ("bwd", 0)]
    plan = rt.plan_recorded_iteration(ev, layout, [0, 1, 2, 3], time_limit_s=12.0)
    # 12 s for 4 solves: 3; the first took none, so 12 s for 3: 4; that one took 9, so 3 s for 2: 1.5;
    # that one took 5: the time is spent, level 2 gets the greedy plan
    assert calls == [(3.0, True, 1), (4.0, True, 1), (1.5, True, 1), (0.001, False, 2)]
    assert plan.level1[0] is plan.level1[1] and plan.region_bytes == 5120


def test_planning_inside_the_forward_pins_no_activation(core, monkeypatch):
    """The plan is made inside layer 0's forward hook. A library that catches an exception there and keeps
    its traceback in a reference cycle (PuLP's first import does) must not pin the model's frames and the
    tensors they hold: on an H200 that kept 3 GiB of activations alive and their slots refused."""
    import gc

    from longtrain.memory.planner import runtime

    real = runtime.plan_recorded_iteration

    def leaves_a_cycle(*args, **kwargs):
        try:
            raise RuntimeError("an optional solver is not installed")
        except RuntimeError as e:
            tb = e.__traceback__  # frame <-> traceback: freed only by the cycle collector
        assert tb is not None
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "plan_recorded_iteration", leaves_a_cycle)
    layers = nn.ModuleList(_Layer(core) for _ in range(2))
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, record_iteration=1)
    attach_windows(layers, rt)
    marks = []

    def step():
        x = torch.ones(4, requires_grad=True)
        activation = torch.ones(64)  # what a model frame holds while its layers run
        marks.append(weakref.ref(activation))
        for m in layers:
            x = m(x)
        x.sum().backward()

    enabled = gc.isenabled()
    gc.disable()  # only an explicit collection may free the cycle: the automatic one runs when it likes
    try:
        step()  # warm-up
        step()  # recorded
        step()  # planned at its start, inside layer 0's forward hook
    finally:
        if enabled:
            gc.enable()
    assert rt.state == "replay"
    assert marks[2]() is None  # the planning step's frame let go of its tensors when it returned


class _FakeCaching:
    """A stand-in for torch's caching allocator behind the core (`lt_set_fallback`): host buffers, a cache
    it keeps until trimmed, and the calls it saw."""

    ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    RESERVED = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int)
    VOID = ctypes.CFUNCTYPE(None)

    def __init__(self, limit):
        self.limit, self.live, self.cached, self.peak = limit, {}, 0, 0
        self.calls = []
        self.fns = (self.ALLOC(self.alloc), self.FREE(self.free), self.RESERVED(self.reserved),
                    self.VOID(self.reset_peak), self.VOID(self.trim))  # kept alive while the core holds them

    def held(self):
        return sum(len(b) for b in self.live.values()) + self.cached

    def alloc(self, size, stream):
        self.calls.append(("alloc", size, stream))
        if self.held() + size > self.limit:
            return None
        buf = ctypes.create_string_buffer(size)
        self.live[ctypes.addressof(buf)] = buf
        self.peak = max(self.peak, self.held())
        return ctypes.addressof(buf)

    def free(self, ptr, size, stream):
        self.calls.append(("free", size, stream))
        assert len(self.live.pop(ptr)) == size
        self.cached += size  # kept, as a caching allocator does, until trimmed

    def reserved(self, peak):
        return self.peak if peak else self.held()

    def reset_peak(self):
        self.calls.append(("reset_peak",))
        self.peak = self.held()

    def trim(self):
        self.calls.append(("trim",))
        self.cached = 0

    def install(self, core):
        core.lib.lt_set_fallback(*(ctypes.cast(f, ctypes.c_void_p) for f in self.fns))


def test_another_fallback_allocator_serves_what_the_plan_does_not(core):
    fake = _FakeCaching(limit=8192)
    fake.install(core)
    base = _region(core, 1024)
    core.set_plan(0, [1024, 2048], [0, -1])
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)  # planned: the region
    b = core.malloc(2048, S1)  # left out of the plan: the fallback, with its stream
    assert a == base and b in fake.live and fake.calls[-1] == ("alloc", 2048, S1)
    s = core.stats()
    assert s["reserved"] == 1024 + 2048 and s["fallback_unplanned"] == 2048
    core.record_stream(b, S2)
    core.free(b, S1)
    assert b in fake.live  # S2 still reads it: not handed back yet
    core.lib.lt_host_complete_events()
    core.lib.lt_flush(0)
    assert b not in fake.live and fake.calls[-1] == ("free", 2048, S1)
    core.lib.lt_empty_cache()  # torch.cuda.empty_cache(): the fallback gives its cache back
    assert fake.calls[-1] == ("trim",) and core.stats()["reserved"] == 1024
    c = core.malloc(6144, S1)  # past the window's plan: fallback
    fake.cached = 2048  # its cache is in the way of the next request: trimmed, then retried
    d = core.malloc(2048, S2)
    assert c and d and core.stats()["oom_retries"] == 1 and ("trim",) in fake.calls[-3:]
    assert core.malloc(4096, S1) == 0  # really full: out of memory, after one more trim
    core.lib.lt_reset_peaks()
    assert fake.calls[-1] == ("reset_peak",)


def test_planner_fallback_setting_reaches_the_installer(monkeypatch):
    """memory.planner.fallback=caching: the caching allocator's mode is set (before CUDA starts) and the
    installer is asked for torch's allocator behind the plan; pool leaves the mode alone; bad values are
    refused by name."""
    from longtrain.config import ConfigError, load_config
    from longtrain.memory import arena

    seen = []

    def install(fallback="caching", mode=None):
        seen.append((fallback, mode, os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
        return f"planned ({fallback})"

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LONGTRAIN_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores whatever was there (or nothing)
        monkeypatch.delenv(name)
    monkeypatch.setattr(arena, "_applied", None)
    monkeypatch.setattr(arena, "install_planned_allocator", install)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config("debug", ["memory.planner.enabled=true"])
    assert cfg.memory.planner.fallback == "caching"  # the default: it reserved less and stepped faster on an H200
    assert arena.configure_cuda_allocator(cfg) == "planned (caching)"
    assert seen == [("caching", "expandable_segments:True", "expandable_segments:True")]
    monkeypatch.setattr(arena, "_applied", None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("LONGTRAIN_ALLOC_CONF", raising=False)
    cfg = load_config("debug", ["memory.planner.enabled=true", "memory.planner.fallback=pool"])
    assert arena.configure_cuda_allocator(cfg) == "planned (pool)"
    assert seen[-1] == ("pool", None, None)
    with pytest.raises(ConfigError, match="memory.planner.fallback"):
        load_config("debug", ["memory.planner.fallback=native"])
    from longtrain.memory.planner.runtime import install_cuda_allocator
    with pytest.raises(ValueError, match="memory.planner.fallback='native'"):
        install_cuda_allocator(0, fallback="native")


def _swap_like_step(rt, core):
    """One trainer step of two layer passes, driven window by window as the hooks do: a (1024) is freed in
    fwd0 while S2 (a swap's D2H copy) still reads it, b (512) lives in the gap, c (1024) in fwd1, e (1536)
    in the last gap. S2 is seen done only after the step, so the record has no release: the iteration's
    region is 1536 under `free` and 2048 under `next_pass` (a kept through fwd1)."""
    rt.begin_iteration()
    rt.begin(0, "fwd")
    a = core.malloc(1024, S1)
    core.record_stream(a, S2)
    core.free(a, S1)
    rt.end(0, "fwd")
    core.free(core.malloc(512, S1), S1)
    rt.begin(1, "fwd")
    core.free(core.malloc(1024, S1), S1)
    rt.end(1, "fwd")
    core.free(core.malloc(1536, S1), S1)
    rt.end_iteration()
    core.lib.lt_host_complete_events()


@pytest.mark.parametrize("limit,served_by", [(0, "next_pass"), (4096, "next_pass"), (1800, "free"), (1200, None)])
def test_a_plan_that_would_not_fit_beside_the_fallback_is_made_smaller_or_not_used(core, caplog, limit, served_by):
    """Before the region is taken, the plan's need (region, and what the fallback gains in an iteration)
    is compared with the room on the device (its free bytes and what the fallback reserves beyond its live
    bytes): `next_pass` where it fits, else `free`, the smallest region, where that fits; else no plan, and
    the fallback serves as before the plan, rather than the replayed iteration running out of memory. The
    host core's limit stands for the device (0: no limit, the room unknown)."""
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, iterations="step")  # records iteration 2
    for _ in range(3):
        _swap_like_step(rt, core)
    core.lib.lt_host_limit(limit)
    with caplog.at_level(logging.WARNING, logger="longtrain.memory.planner.runtime"):
        _swap_like_step(rt, core)  # plans at its start
    if served_by is None:
        assert rt.state == "off" and rt.plan is None and core.region_base() == 0
        assert "no plan fits beside what the fallback holds" in caplog.text
        assert rt.at_plan["need"] == 1536 and rt.at_plan["room"] == 1200
        return
    assert rt.state == "replay" and rt.plan.reuse_after == served_by and rt.report()["reuse_after"] == served_by
    assert rt.plan.region_bytes == {"free": 1536, "next_pass": 2048}[served_by]
    assert ("reuse_after=free serves instead of next_pass" in caplog.text) == (served_by == "free")
    assert rt.at_plan["room"] == (limit or None) and rt.plan.fallback_growth_bytes == 0
    _swap_like_step(rt, core)
    s = core.stats()
    assert s["served"] == 8 and s["fallback"] >= 0 and (s["miss_size"], s["miss_length"], s["refused_overlap"]) == (
        0, 0, 0), s


def test_what_the_fallback_gains_in_an_iteration_counts_beside_the_region():
    """The fallback's growth in an iteration: the bytes of the requests the plan leaves to it (a side stream's
    with side_streams=False, those that outlive the iteration), less the blocks from before the iteration
    it frees, at their most."""
    # window 0: x (S1, planned, 1024), g (S2, 2048, left out), an earlier block (512) freed; window 1: y
    # (outlives the iteration, 4096) after g is freed
    ev = [(0, 0, 0, 1024, 1, 1, S1), (0, 0, 1, 2048, 0, 2, S2), (1, 0, -1, 512, 0, 99, S1),
          (1, 0, -1, 1024, 0, 1, S1), (1, 1, -1, 2048, 0, 2, S2), (0, 1, 0, 4096, 1, 3, S1)]
    plan = plan_recorded_iteration(ev, [("fwd", 0), ("fwd", 1)], [0, 1], side_streams=False)
    assert plan.unplanned["side_stream"]["peak_live_bytes"] == 2048
    assert plan.fallback_growth_bytes == 4096 - 512  # y after the earlier block and g are gone
    assert plan_recorded_iteration(ev, [("fwd", 0), ("fwd", 1)], [0, 1]).fallback_growth_bytes == 4096 - 512


def test_a_request_between_steps_takes_the_idle_region_and_the_next_step_takes_it_back(core, caplog):
    """Between two steps (evaluation, a checkpoint: outside every window) no planned tensor is live, so when
    the device cannot serve such a request the region goes back to the device for it, and the next step
    takes the region again and replays its plan. In a window whose plan serves, or while a planned tensor is
    live, the region stays. If what ran meanwhile still holds the memory, the plan turns off with a warning
    and the fallback serves the run."""
    net = _Net(core)
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, iterations="step")
    attach_windows(net.layers, rt, model=net)

    def step():
        rt.begin_iteration()
        net(torch.ones(4, requires_grad=True)).sum().backward()
        rt.end_iteration()

    for _ in range(4):
        step()
    assert rt.state == "replay" and core.stats()["served"] == rt.plan.planned() > 0
    region = rt.plan.region_bytes
    kept = core.malloc(4096, S1)  # outside windows: the fallback's
    core.lib.lt_host_limit(core.stats()["reserved"] + 1024)  # full but for 1 KiB
    big = core.malloc(region, S1)  # fits only where the idle region was
    s = core.stats()
    assert big and s["region_given_back"] == 1 and s["region"] == 0 and core.region_base() == 0
    core.free(big, S1)
    with caplog.at_level(logging.INFO, logger="longtrain.memory.planner.runtime"):
        step()
    s = core.stats()
    assert rt.state == "replay" and core.region_base() != 0 and s["region"] == region
    assert s["served"] == 2 * rt.plan.planned() and (s["miss_size"], s["miss_length"], s["refused_overlap"]) == (
        0, 0, 0), s
    assert "taken again" in caplog.text
    rt.begin_iteration()
    emb = core.malloc(256, S1)  # the embedding, from the plan
    assert core.stats()["served"] == 2 * rt.plan.planned() + 1
    big = core.malloc(region, S1)  # a miss turns the window's plan off, but a planned tensor is live
    assert not big and core.stats()["region_given_back"] == 1 and core.region_base()
    core.free(emb, S1)
    big = core.malloc(region, S1)  # nothing planned live, no plan serving: given back, held into the next step
    assert big and core.stats()["region_given_back"] == 2
    rt.end_iteration()
    with caplog.at_level(logging.WARNING, logger="longtrain.memory.planner.runtime"):
        rt.begin_iteration()
    assert rt.state == "off" and "could not be taken again" in caplog.text
    core.lib.lt_host_limit(0)
    net(torch.ones(4, requires_grad=True)).sum().backward()  # the fallback serves the step
    rt.end_iteration()
    core.free(big, S1)
    core.free(kept, S1)
    assert core.stats()["allocated"] == 0 and core.stats()["served"] == 2 * rt.plan.planned() + 1


def test_a_window_whose_plan_still_serves_keeps_the_region(core):
    """A request the plan leaves to the fallback, on a full device, while the window's plan still serves and
    no planned tensor is live: the region stays (the window's next planned request needs it), and the
    request is carved from its top."""
    base = _region(core, 4096)
    core.set_plan(0, [1024, 2048], [-1, 0])  # k=0 to the fallback, k=1 planned
    core.lib.lt_host_limit(4096 + 512)
    core.window_begin(0, S1)
    assert core.malloc(1024, S1) == base + 3072
    assert core.region_base() == base and core.stats()["region_given_back"] == 0
    assert core.malloc(2048, S1) == base and (core.stats()["served"], core.stats()["carved"]) == (1, 1)


def test_a_request_nothing_else_serves_is_carved_from_a_gap_of_the_region(core):
    """A miss (or a refused request) at the memory limit while a planned tensor is live, so the region stays:
    the request takes the highest gap of the region no held block covers, and that block then guards its
    bytes as a planned one does (a planned request over it is refused, and carved elsewhere). None where no
    gap is large enough. Check mode does not count a carved block's free as a lifetime break."""
    core.lib.lt_set_check(1)
    base = _region(core, 4096)
    core.set_plan(0, [1024, 1024], [0, 2048])
    core.lib.lt_host_limit(4096 + 256)  # the device: 256 bytes beside the region
    core.window_begin(0, S1)
    a = core.malloc(1024, S1)
    c = core.malloc(1500, S1)  # a miss while a is live
    s = core.stats()
    assert a == base and c == base + 2560 and (s["carved"], s["miss_size"], s["served"], s["fallback"]) == (1, 1, 1, 0)
    assert not core.malloc(2048, S1)  # [0, 1024) and [2560, 4060) held: no gap of 2048
    s = core.stats()
    assert (s["failed"], s["failed_live"], s["failed_plan"], s["failed_plan_off"]) == (1, 1024 + 1500, 0, 1)
    assert "at the request that failed: 0.00 GiB live in the region, in window 0, whose plan a miss had turned off" \
        in core.holdings()
    core.free(a, S1)
    core.window_begin(0, S1)  # the plan serves again
    x = core.malloc(1024, S1)  # its slot at 0 is free
    y = core.malloc(1024, S1)  # its slot at 2048 overlaps c: refused, the fallback has no room, carved below c
    s = core.stats()
    assert x == base and y == base + 1536 and (s["served"], s["refused_overlap"], s["carved"]) == (2, 1, 2)
    core.free(x, S1)  # in its window, as planned
    core.window_end()
    for ptr in (c, y):  # carved: freed outside any window, no lifetime break
        core.free(ptr, S1)
    s = core.stats()
    assert s["allocated"] == 0 and s["planned_live"] == 0 and s["check_lifetime"] == 0 and s["region_given_back"] == 0


def test_a_carved_request_over_another_streams_freed_bytes_waits_for_that_stream(core):
    """Carving keeps stream order as a planned request does: bytes another stream freed (a ghost: its
    kernels may still run on them) are taken only after the carving request's stream waits for that stream."""
    base = _region(core, 2048)
    core.set_plan(0, [512, 1024], [0, 1024], streams=[-1, S2], ghosts=[False, True])
    core.lib.lt_host_limit(2048 + 256)
    core.window_begin(0, S1)
    held = core.malloc(512, S1)  # planned, live: the region stays
    a = core.malloc(1024, S2)  # planned on S2 at the top
    core.free(a, S2)  # a ghost: S2 may still use [1024, 2048)
    assert a == base + 1024 and core.stats()["ghosts"] == 1 and _waits(core)[0] == 0
    x = core.malloc(1024, S1)  # a miss, no room on the device: carved at the top, after S1 waits for S2
    s = core.stats()
    assert x == base + 1024 and (s["carved"], s["miss_length"], s["cross_stream_waits"]) == (1, 1, 1)
    assert _waits(core) == (1, (S1, 1))
    core.free(x, S1)
    core.free(held, S1)


@pytest.mark.parametrize("iterations", ["layer0", "step"])
def test_a_miss_on_a_full_device_takes_the_idle_region_and_the_next_iteration_takes_it_back(core, caplog, iterations):
    """A step whose requests differ from the plan (a longer sequence: every size doubles) is served by the
    fallback. Where the device has no room for it beside the region, a request that finds none takes the
    region, which then holds no planned tensor and serves no plan, rather than the step running out of
    memory. The next iteration takes the region again (also where layer 0's forward starts iterations) and
    replays its plan."""
    layers = nn.ModuleList(_Layer(core) for _ in range(2))
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, record_iteration=1)
    attach_windows(layers, rt)
    rt.iterations = iterations
    malloc = core.malloc

    def served_or_fail(size, stream=0):
        ptr = malloc(size, stream)
        assert ptr, f"a request of {size} bytes was not served"
        return ptr

    core.malloc = served_or_fail

    def step():
        if iterations == "step":
            rt.begin_iteration()
        _forward_backward(layers)
        if iterations == "step":
            rt.end_iteration()

    for _ in range(3):
        step()
    assert rt.state == "replay" and rt.plan.unplanned == {}
    region, served = rt.plan.region_bytes, core.stats()["served"]
    assert served == rt.plan.planned() and core.stats()["reserved"] == region  # everything planned
    # doubled sizes: the step's live peak is twice the plan's (the plan is at the lower bound); the device
    # has room for it without the region, not beside it
    core.lib.lt_host_limit(2 * region + region // 2)
    for m in layers:
        m.scale = 2
    with caplog.at_level(logging.WARNING, logger="longtrain.memory.planner.runtime"):
        step()
    s = core.stats()
    assert s["region_given_back"] == 1 and core.region_base() == 0 and s["miss_size"] > 0 and s["served"] == served
    assert s["allocated"] == 0
    for m in layers:
        m.scale = 1
    with caplog.at_level(logging.INFO, logger="longtrain.memory.planner.runtime"):
        step()
        step()
    s = core.stats()
    assert rt.state == "replay" and core.region_base() != 0 and s["region"] == region and "taken again" in caplog.text
    assert s["served"] == served + 2 * rt.plan.planned() and s["region_given_back"] == 1


def test_before_the_plan_a_request_the_device_cannot_hold_overflows_into_managed_memory(core):
    """While the runtime allows it (before the plan is made), a request the device cannot hold even after the
    fallback gave back its cache goes to managed memory, up to a cap of bytes held there at once. It is
    recorded as any request (the plan places it), counted apart from the fallback and from the device's
    reserved bytes, and waits for other streams before it is freed, as any block."""
    core.lib.lt_host_limit(4096)
    core.lib.lt_set_record(1)
    core.window_begin(-1, S1)
    a = core.malloc(3072, S1)  # the device
    assert not core.malloc(3072, S1)  # no overflow allowed: out of memory
    core.lib.lt_set_overflow(4096)
    b = core.malloc(3072, S1)  # the device is full: managed memory
    s = core.stats()
    assert b and (s["overflowed"], s["overflow_bytes"], s["fallback"], s["failed"]) == (1, 3072, 1, 1)
    assert s["allocated"] == 6144 and s["reserved"] == 3072 and s["fallback_no_plan"] == 3072
    assert "managed memory before the plan: 1 requests, 0.00 GiB now" in core.holdings()
    assert not core.malloc(2048, S1)  # past the cap: 3072 + 2048 bytes at once
    core.record_stream(b, S2)
    core.free(b, S1)
    assert core.stats()["overflow_bytes"] == 3072  # S2 still reads it
    core.lib.lt_host_complete_events()
    core.lib.lt_flush(0)
    c = core.malloc(4096, S1)  # up to the cap again
    core.free(c, S1)
    s = core.stats()
    assert (s["overflowed"], s["overflow_bytes"], s["overflow_peak"], s["allocated"]) == (2, 0, 4096, 3072)
    assert [e[3] for e in core.events() if e[0] == 0] == [3072, 3072, 4096]  # recorded as the device's
    core.lib.lt_set_overflow(0)  # the plan is made: none from now on
    assert not core.malloc(2048, S1) and core.stats()["overflowed"] == 2
    core.free(a, S1)
    assert core.stats()["allocated"] == 0


def _must_serve(core):
    """core.malloc that fails the test where the core serves nothing (a model step would run out of memory)."""
    malloc = core.malloc

    def served_or_fail(size, stream=0):
        ptr = malloc(size, stream)
        if not ptr:
            raise MemoryError(f"a request of {size} bytes was not served")
        return ptr

    core.malloc = served_or_fail


@pytest.mark.parametrize("overflow", [True, False])
def test_a_warmup_only_the_plan_fits_is_recorded_in_managed_memory_and_replays_on_the_device(core, caplog, overflow):
    """A fallback that rounds its blocks (as a caching allocator does) needs more than the device for the
    warm-up, while the plan, which packs the exact sizes, fits. With overflow the iterations before the plan
    put what the device cannot hold into managed memory, the recorded one is planned whole, and every later
    iteration replays it from the region on the device, with nothing in managed memory. Without it the
    warm-up runs out of memory, as without the plan."""
    def run(core, limit, overflow_bytes, steps):
        net = _Net(core)
        rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, iterations="step",
                         overflow_bytes=overflow_bytes)
        attach_windows(net.layers, rt, model=net)
        core.lib.lt_host_granule(4096)
        core.lib.lt_host_limit(limit)
        _must_serve(core)
        for _ in range(steps):
            rt.begin_iteration()
            net(torch.ones(4, requires_grad=True)).sum().backward()
            rt.end_iteration()
        return rt

    free = host_core()  # the same steps on a device without a limit: the plan's region, the warm-up's peak
    region = run(free, 0, 0, 4).plan.region_bytes
    warmup_peak = free.stats()["reserved_peak"]
    assert warmup_peak > region  # the rounding: only the plan fits a device of the region's size
    if not overflow:
        with pytest.raises(MemoryError):
            run(core, region, 0, 1)
        return
    with caplog.at_level(logging.WARNING, logger="longtrain.memory.planner.runtime"):
        rt = run(core, region, 1 << 20, 6)
    s = core.stats()
    assert rt.state == "replay" and rt.plan.region_bytes == region and rt.plan.unplanned == {}
    assert rt.at_plan["overflowed"] == s["overflowed"] > 0 and rt.at_plan["overflow_live"] == 0
    assert "went to CUDA managed memory" in caplog.text
    assert s["served"] == 3 * rt.plan.planned() and s["overflow_bytes"] == s["allocated"] == 0
    assert (s["miss_size"], s["miss_length"], s["refused_overlap"], s["failed"]) == (0, 0, 0, 0)
    before = s["overflowed"]
    core.lib.lt_host_limit(region + 1024)  # after the plan nothing overflows: beyond the device, out of memory
    assert not core.lib.lt_malloc(2 * region, 0, S1) and core.stats()["overflowed"] == before


def test_with_no_plan_fitting_after_an_overflowing_warmup_overflow_stops_and_the_warning_says_so(core, caplog):
    """Where even the plan does not fit the device, the warning says the warm-up needed managed memory (so the
    next step most likely runs out of memory), and nothing overflows any more."""
    rt = PlanRuntime(core, torch.device("cpu"), stream_of=lambda: S1, iterations="step", overflow_bytes=1 << 20)
    core.lib.lt_host_limit(1200)  # _swap_like_step's plan needs 1536 at least
    with caplog.at_level(logging.WARNING, logger="longtrain.memory.planner.runtime"):
        for _ in range(4):
            _swap_like_step(rt, core)
    assert rt.state == "off" and "no plan fits" in caplog.text and "most likely runs out of memory" in caplog.text
    assert "went to CUDA managed memory" in caplog.text
    n = core.stats()["overflowed"]
    assert n > 0 and not core.malloc(1536, S1) and core.stats()["overflowed"] == n


def test_warmup_overflow_setting_reaches_the_runtime_and_bad_values_are_refused(monkeypatch):
    """memory.planner.warmup_overflow_gib is the runtime's cap on managed memory before the plan (0: none);
    a negative value is refused by name."""
    from longtrain.config import ConfigError, load_config
    from longtrain.memory import arena
    from longtrain.memory.planner import runtime

    core = host_core()
    monkeypatch.setattr(runtime, "active_core", lambda: core)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(_Layer(core) for _ in range(2))

    assert load_config("debug").memory.planner.warmup_overflow_gib == 16.0
    for gib, served in ((2.0, True), (0.0, False)):
        cfg = load_config("debug", ["memory.planner.enabled=true", f"memory.planner.warmup_overflow_gib={gib}"])
        model = arena.apply_memory_plan(Wrapped(), cfg, torch.device("cuda"))
        assert model.plan_runtime.overflow_bytes == int(gib * 2**30)
        core.lib.lt_host_limit(1024)  # a full device: only managed memory serves
        ptr = core.malloc(4096, S1)
        assert bool(ptr) == served
        if ptr:
            core.free(ptr, S1)
    with pytest.raises(ConfigError, match=r"memory.planner.warmup_overflow_gib=-1.0 must be >= 0"):
        load_config("debug", ["memory.planner.warmup_overflow_gib=-1"])
