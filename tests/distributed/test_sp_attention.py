"""Sequence-parallel attention on gloo processes against a single-process, unsharded reference.

Every rank builds the same global q, k, v, dout (fresh random values per case), shards them with
`shard_sequence`, runs `sp_attention_with_lse`, and compares its output, LSE and dQ/dK/dV rows with the
reference's rows (math kernel on the full sequence, float64). Tolerances: float64 runs differ from the
reference only by the order of additions (1e-10 relative); float32 through the CPU flash kernel by
fp32 rounding of blocks and merges (1e-4 relative on gradients, which sum N contributions).
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from longtrain.parallel.sharding import shard_sequence, unshard_sequence
from longtrain.parallel.sp_attention import sp_attention_with_lse
from ranks import spawn_ranks
from reference import attention_reference as _reference, random_doc_ids

pytestmark = pytest.mark.slow

# (method, layout, causal, heads, kv_heads, dtype, kernel, packed documents)
CASES = [(m, lay, causal, h, hkv, dt, ker, docs)
         for m in ("ring", "ring_bidir", "token_ring", "ulysses")
         for lay in ("zigzag", "contiguous")
         for causal in (True, False)
         for h, hkv in ((4, 4), (4, 2))
         for dt, ker in ((torch.float64, "math"), (torch.float32, "cpu_flash"))
         for docs in ((False, True) if m in ("ring", "ring_bidir") else (False,))]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _worker(rank, world, port, cases, q_out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = []
    try:
        for i, (method, layout, causal, h, hkv, dtype, kernel, packed) in enumerate(cases):
            g = torch.Generator().manual_seed(1000 * world + i)
            s_global, b, d = 4 * world * 3, 2, 8  # divisible by 2N for zigzag
            q = torch.randn(b, s_global, h, d, generator=g, dtype=torch.float64)
            k = torch.randn(b, s_global, hkv, d, generator=g, dtype=torch.float64)
            v = torch.randn(b, s_global, hkv, d, generator=g, dtype=torch.float64)
            dout = torch.randn(b, s_global, h, d, generator=g, dtype=torch.float64)
            doc_ids = random_doc_ids(b, s_global, g) if packed else None
            ref = _reference(q, k, v, dout, causal, doc_ids)
            loc = [shard_sequence(t, 1, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v)]
            out, lse = sp_attention_with_lse(*loc, group=None, method=method, causal=causal, layout=layout,
                                             kernel=kernel, doc_ids=None if doc_ids is None else
                                             shard_sequence(doc_ids, 1, layout=layout))
            out.backward(shard_sequence(dout, 1, layout=layout).to(dtype))
            got = [out, lse, *(t.grad for t in loc)]
            want = [shard_sequence(ref[0], 1, layout=layout), shard_sequence(ref[1], 2, layout=layout)]
            want += [shard_sequence(t, 1, layout=layout) for t in ref[2:]]
            errs = [_rel(a, w) for a, w in zip(got, want)]
            # unshard_sequence inverts shard_sequence (the data path relies on it)
            round_trip = torch.equal(unshard_sequence(loc[0].detach(), 1, layout=layout), q.to(dtype))
            results.append((i, errs, round_trip))
        q_out.put((rank, results, None))
    except Exception:
        q_out.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_cases(world: int, cases: list) -> None:
    """Run `cases` on `world` gloo processes and assert every rank's errors are within TOL."""
    reports = spawn_ranks(_worker, world, cases)
    failures = []
    for rank, results, err in reports:
        assert err is None, f"rank {rank}:\n{err}"
        for i, errs, round_trip in results:
            tol = TOL[cases[i][5]]
            names = ["out", "lse", "dq", "dk", "dv"]
            bad = [f"{n}={e:.2e}" for n, e in zip(names, errs) if not e <= tol]
            if bad or not round_trip:
                failures.append(f"rank {rank} {cases[i][:5]} {cases[i][6:]}: {bad} round_trip={round_trip}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_matches_unsharded_reference(world):
    run_cases(world, [c for c in CASES if c[0] == "ring"])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bidirectional_ring_matches_unsharded_reference(world):
    run_cases(world, [c for c in CASES if c[0] == "ring_bidir"])


def test_bad_layout_length_is_refused():
    from longtrain.parallel.sharding import check_layout

    with pytest.raises(ValueError, match=r"sequence length 100 is not divisible by 8 \(zigzag layout over 4 ranks"):
        check_layout(100, 4, "zigzag")
    check_layout(100, 4, "contiguous")


def _refusal_worker(rank, world, port, case, q_out):
    """Bad input that only the group as a whole can see: every rank must raise, none may hang."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        if case == "shapes":  # rank 0 holds fewer tokens than the others
            q, k, v = (torch.randn(1, 8 if rank == 0 else 12, 2, 8) for _ in range(3))
            kw = dict(method="ring")
        else:  # packed documents, a boundary between the two shards, under a method without masks
            q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
            kw = dict(method="token_ring", doc_ids=torch.tensor([[rank] * 8]))
        sp_attention_with_lse(q, k, v, group=None, layout="contiguous", kernel="math", **kw)
        q_out.put((rank, "no error"))
    except ValueError as e:
        q_out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_mismatched_shapes_across_ranks_fail_on_every_rank():
    got = dict(spawn_ranks(_refusal_worker, 2, "shapes"))
    assert all("differ across the sp group" in m and "rank 0: q (1, 8, 2, 8)" in m for m in got.values()), got


def test_packed_documents_under_a_method_without_masks_fail_on_every_rank():
    got = dict(spawn_ranks(_refusal_worker, 2, "documents"))
    assert all("does not take per-document masks" in m for m in got.values()), got
