"""Sequence-parallel attention on NCCL, in bf16, for every method and CUDA kernel, against an fp32
unsharded reference (math kernel on the whole sequence, computed on every rank)."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from longtrain.attention import block_attention_with_lse
from longtrain.parallel.sharding import shard_sequence
from longtrain.parallel.sp_attention import METHODS, sp_attention_with_lse
from ranks import spawn_ranks
from reference import attention_reference, random_doc_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")]

# bf16 operands (8-bit mantissa): the single-GPU kernels already differ from fp32 by up to ~8e-3
# (tests/gpu/test_attention_gpu.py); merging N fp32 partials of bf16 block outputs adds little.
TOL = 2e-2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _worker(rank, world, port, q_out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    res = []
    case = 0
    try:
        for method in sorted(METHODS):
            for kernel in ("cudnn", "flash"):
                for causal in (True, False):
                    for h, hkv in ((8, 2), (8, 8)):
                        case += 1  # the same seed on every rank (str hashes differ between processes)
                        g = torch.Generator(device=dev).manual_seed(case)
                        s, d = 2048 * world, 128
                        q, k, v, dout = (torch.randn(1, s, hh, d, generator=g, device=dev)
                                         for hh in (h, hkv, hkv, h))
                        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                        o, lse = block_attention_with_lse(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                                          causal=causal, kernel="math")
                        o.transpose(1, 2).backward(dout)
                        loc = [shard_sequence(t, 1).to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
                        out, l2 = sp_attention_with_lse(*loc, group=None, method=method, causal=causal, kernel=kernel)
                        out.backward(shard_sequence(dout, 1).to(torch.bfloat16))
                        errs = [_rel(out, shard_sequence(o.transpose(1, 2), 1)),
                                _rel(l2, shard_sequence(lse, 2))] + [
                            _rel(t.grad, shard_sequence(r.grad, 1)) for t, r in zip(loc, (qr, kr, vr))]
                        res.append(((method, kernel, causal, h, hkv), errs))
        for method in ("ring", "ring_bidir"):  # packed documents: per-document masks
            for kernel in ("cudnn", "flash"):
                case += 1
                g = torch.Generator(device=dev).manual_seed(case)
                s, d, h, hkv = 1024 * world, 128, 8, 2
                q, k, v, dout = (torch.randn(1, s, hh, d, generator=g, device=dev) for hh in (h, hkv, hkv, h))
                doc_ids = random_doc_ids(1, s, torch.Generator().manual_seed(case), n_docs=24).to(dev)
                want = attention_reference(q, k, v, dout, True, doc_ids)
                loc = [shard_sequence(t, 1).to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
                out, l2 = sp_attention_with_lse(*loc, group=None, method=method, causal=True, kernel=kernel,
                                                doc_ids=shard_sequence(doc_ids, 1))
                out.backward(shard_sequence(dout, 1).to(torch.bfloat16))
                errs = [_rel(out, shard_sequence(want[0], 1)), _rel(l2, shard_sequence(want[1], 2))] + [
                    _rel(t.grad, shard_sequence(r, 1)) for t, r in zip(loc, want[2:])]
                res.append(((method, kernel, "packed documents", h, hkv), errs))
        q_out.put((rank, res, None))
    except Exception:
        q_out.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_sp_attention_bf16_nccl_matches_fp32_reference():
    world = min(4, torch.cuda.device_count())
    reports = spawn_ranks(_worker, world, timeout=300)
    bad = []
    for rank, res, err in reports:
        assert err is None, f"rank {rank}:\n{err}"
        for case, errs in res:
            print(rank, case, " ".join(f"{e:.1e}" for e in errs))
            if not all(e <= TOL for e in errs):
                bad.append((rank, case, errs))
    assert not bad, bad
