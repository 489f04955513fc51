"""TokenRing attention (method="token_ring") on gloo processes: results against the unsharded reference
(the harness of test_sp_attention.py), and the bytes it puts on the wire per step against the table in
token_ring.py's docstring (computed from the posted tensors' shapes, not measured on a link)."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from test_sp_attention import CASES, run_cases  # noqa: E402

from longtrain.parallel.sharding import shard_sequence  # noqa: E402
from longtrain.parallel.token_ring import wire_bytes  # noqa: E402
from ranks import spawn_ranks


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_token_ring_matches_unsharded_reference(world):
    cases = [c for c in CASES if c[0] == "token_ring"]
    assert len(cases) == 16
    run_cases(world, cases)


def test_wire_bytes_table():
    """DESIGN.md section 3: MHA, TokenRing's forward moves the ring's bytes split over both directions;
    GQA, its busy direction carries g/2 times the ring's bytes (forward, and bf16 backward up to the lse)."""
    b, s, d, hkv = 1, 1024, 128, 8
    for g in (1, 2, 4, 8):
        w = wire_bytes((b, s, g * hkv, d), (b, s, hkv, d), torch.bfloat16)
        lse = b * s * g * hkv * 4
        assert w["token_ring_fwd"][0] * 2 == g * w["ring_fwd"][0]
        assert w["token_ring_bwd"][0] - lse == g * w["ring_bwd"][0] // 2  # 6g vs 12 units of T*Hkv*D
        if g == 1:
            assert w["token_ring_fwd"][0] + w["token_ring_fwd"][1] == w["ring_fwd"][0] + lse
            assert w["token_ring_fwd"][0] == w["ring_fwd"][0] // 2


# (layout, causal, heads, kv_heads)
BYTE_CASES = [("zigzag", True, 4, 2), ("contiguous", True, 4, 4), ("zigzag", False, 8, 2)]


def _bytes_worker(rank, world, port, q_out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from longtrain.parallel import comm
    from longtrain.parallel.sp_attention import sp_attention_with_lse

    log = []  # (channel, bytes this rank sent in one batch), in posting order; ring batches are named "ring"
    post = comm.P2PComm.post
    comm.P2PComm.post = lambda self, sends, recvs: (
        log.append((self.name, sum(t.numel() * t.element_size() for t, _ in sends))), post(self, sends, recvs))[1]
    try:
        results = []
        for layout, causal, h, hkv in BYTE_CASES:
            g = torch.Generator().manual_seed(7)
            qkv = [torch.randn(2, 4 * world, n, 8, generator=g) for n in (h, hkv, hkv)]
            for method in ("ring", "token_ring"):
                loc = [shard_sequence(t, 1, layout=layout, rank=rank, world=world).requires_grad_(True) for t in qkv]
                log.clear()
                out, _ = sp_attention_with_lse(*loc, group=None, method=method, causal=causal, layout=layout,
                                               kernel="cpu_flash")
                fwd = list(log)
                log.clear()
                out.backward(torch.ones_like(out))
                results.append(((layout, causal, h, hkv, method), tuple(loc[0].shape), tuple(loc[1].shape), fwd,
                                list(log)))
        q_out.put((rank, results, None))
    except Exception:
        q_out.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _expected(rank, world, layout, causal, method, w, s_local):
    """Per-batch bytes (forward, backward) from the docstring's byte table, with the rows each step
    returns read off its schedule table (written out again here, independently of `_block`)."""
    if method == "ring":  # forward: K,V each step; backward: K,V then the fp32 dK,dV accumulators each step
        kv, dkv = w["ring_fwd"][0], w["ring_bwd"][0] - w["ring_fwd"][0]
        return [("ring", kv)] * (world - 1), [("ring", kv), ("ring", dkv)] * (world - 1) + [("ring", dkv)]

    def rows(computer, owner):  # query rows of `owner` that `computer` works on (owner != computer)
        if not causal:
            return s_local
        if layout == "contiguous":
            return s_local if owner > computer else 0
        return s_local if owner > computer else s_local // 2

    fwd, bwd = [], []
    for step in range(world):
        if step < world - 1:
            fwd.append(("hop", w["token_ring_fwd"][0]))
            bwd.append(("hop", w["token_ring_bwd"][0]))
        if step == 0:
            continue  # own queries: nothing returns
        sent, received = rows(rank, (rank - step) % world), rows((rank + step) % world, rank)
        if sent or received:  # a return batch is posted when this rank sends or receives anything
            fwd.append(("ret", w["token_ring_fwd"][1] * sent // s_local))
            bwd.append(("ret", w["token_ring_bwd"][1] * sent // s_local))
    return fwd, bwd


@pytest.mark.slow
def test_wire_bytes_posted_per_step():
    world = 3
    reports = spawn_ranks(_bytes_worker, world)
    for rank, results, err in reports:
        assert err is None, f"rank {rank}:\n{err}"
        for (layout, causal, h, hkv, method), q_shape, kv_shape, fwd, bwd in results:
            w = wire_bytes(q_shape, kv_shape, torch.float32)
            want = _expected(rank, world, layout, causal, method, w, q_shape[1])
            assert (fwd, bwd) == want, (rank, layout, causal, h, hkv, method)
        # the headline: with GQA g = 2 TokenRing's query hop carries g/2 = 1 times the ring's K/V hop
        w = wire_bytes(results[0][1], results[0][2], torch.float32)
        assert w["token_ring_fwd"][0] == w["ring_fwd"][0]
