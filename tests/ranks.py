"""Run a worker on several spawned processes (one per rank) and collect what each reports."""

from __future__ import annotations

import queue

import pytest
import torch.multiprocessing as mp

from longtrain.parallel.mesh import free_port


def spawn_ranks(worker, world: int, *args, timeout: float = 120) -> list:
    """Calls worker(rank, world, port, *args, q) on `world` processes; each rank puts one report on q.
    Returns the reports (in arrival order). A rank that never reports or crashes fails the test."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = [q.get(timeout=timeout) for _ in range(world)]
    except queue.Empty:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank hung (no report within {timeout:g} s)")
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    return reports
