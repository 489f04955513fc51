"""Ulysses attention on gloo processes: the unsharded-reference harness of test_sp_attention.py for every
head distribution (scatter, replicated KV, one KV copy per query head), and refusal of an sp degree that
does not divide the heads: a ValueError on every rank, no hang, the group still usable afterwards.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from longtrain.parallel.ulysses import kv_replication
from ranks import spawn_ranks

# tests/ is no package: import the harness by module name from this folder, which spawned workers can repeat
from test_sp_attention import CASES, TOL, _reference, _rel, run_cases  # noqa: E402

pytestmark = pytest.mark.slow

ULYSSES = [c for c in CASES if c[0] == "ulysses"]


def _with_heads(h: int, hkv: int) -> list:
    return [(*c[:3], h, hkv, *c[5:]) for c in ULYSSES if c[3:5] == (4, 4)]


def test_head_distribution_rule():
    assert kv_replication(4, 4, 2) == 1 and kv_replication(4, 2, 2) == 1   # scatter
    assert kv_replication(4, 2, 4) == 2 and kv_replication(8, 2, 4) == 2   # one shared KV head per rank
    assert kv_replication(6, 2, 3) == 3 and kv_replication(28, 4, 7) == 7  # one KV copy per query head
    with pytest.raises(ValueError, match=r"H=4 query heads \(Hkv=2 KV heads\) over N=3 ranks; valid degrees: "
                                         r"\[1, 2, 4\]"):
        kv_replication(4, 2, 3)


@pytest.mark.parametrize("world, cases", [
    (2, ULYSSES + _with_heads(4, 1)),             # (4,4), (4,2): scatter; (4,1): KV head on both ranks
    (4, ULYSSES + _with_heads(8, 2)),             # (4,4): scatter; (4,2), (8,2): replicated KV heads
    (3, _with_heads(6, 2) + _with_heads(3, 3)),   # (6,2): per-query-head KV copies; (3,3): scatter
], ids=["world2", "world4", "world3"])
def test_ulysses_matches_unsharded_reference(world, cases):
    run_cases(world, cases)


def _batch1_worker(rank, world, port, q_out):
    """B = 1: the plan skips the row gather where the order already fits (contiguous, or non-causal), so the
    kernel gets strided views of the receive buffer and its (B, S, H, D)-strided out goes back as is."""
    from longtrain.parallel.sharding import shard_sequence
    from longtrain.parallel.ulysses import ulysses_attention

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        bad = []
        for i, (_, layout, causal, h, hkv, dtype, kernel, _) in enumerate(c for c in ULYSSES if c[3:5] == (4, 2)):
            g = torch.Generator().manual_seed(i)
            q, k, v, dout = (torch.randn(1, 8 * world, n, 8, generator=g, dtype=torch.float64)
                             for n in (h, hkv, hkv, h))
            ref = _reference(q, k, v, dout, causal)
            loc = [shard_sequence(t, 1, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v)]
            out, lse = ulysses_attention(*loc, group=None, causal=causal, layout=layout, kernel=kernel)
            out.backward(shard_sequence(dout, 1, layout=layout).to(dtype))
            want = [shard_sequence(ref[0], 1, layout=layout), shard_sequence(ref[1], 2, layout=layout)]
            want += [shard_sequence(t, 1, layout=layout) for t in ref[2:]]
            errs = [_rel(a, w) for a, w in zip([out, lse, *(t.grad for t in loc)], want)]
            if not max(errs) <= TOL[dtype]:
                bad.append(f"{layout} causal={causal} {kernel}: {errs}")
        q_out.put((rank, bad, None))
    except Exception:
        q_out.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_batch1_without_reordering():
    for rank, bad, err in spawn_ranks(_batch1_worker, 2):
        assert err is None, f"rank {rank}:\n{err}"
        assert not bad, f"rank {rank}: " + "\n".join(bad)


def _refusal_worker(rank, world, port, q_out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from longtrain.parallel.sp_attention import sp_attention_with_lse
    from longtrain.parallel.ulysses import ulysses_attention

    try:
        msgs = []
        q = torch.randn(1, 4, 4, 8, requires_grad=True)  # 4 heads over 3 ranks; S_g = 12 fits zigzag
        kv = torch.randn(1, 4, 2, 8)
        for call in (lambda: sp_attention_with_lse(q, kv, kv, group=None, method="ulysses", kernel="math"),
                     lambda: ulysses_attention(q, kv, kv, group=None, kernel="math")):
            try:
                call()
                msgs.append("no error")
            except ValueError as e:
                msgs.append(str(e))
        # the group is still in step: nobody is stuck inside a collective
        ok = torch.ones(1)
        dist.all_reduce(ok)
        q_out.put((rank, msgs, int(ok.item()), None))
    except Exception:
        q_out.put((rank, None, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_indivisible_heads_refused_on_every_rank():
    world = 3
    reports = spawn_ranks(_refusal_worker, world)
    for rank, msgs, ok, err in reports:
        assert err is None, f"rank {rank}:\n{err}"
        assert ok == world, f"rank {rank}: the group is out of step after the refusal"
        for msg in msgs:
            assert "H=4" in msg and "Hkv=2" in msg and "N=3" in msg and "[1, 2, 4]" in msg, f"rank {rank}: {msg}"
