"""Ring attention: each rank keeps its queries; K/V blocks travel the ring, one hop per step.

Legend: q_BSHD local queries (batch, S_local, H, D); k/v (batch, S_local, Hkv, D) (GQA: never
expanded, neither in memory nor on the wire); the running result is (B, H, S_local, D) with lse
(B, H, S_local), both fp32 (fp64 for fp64 inputs) while merging; N ranks in the sp group, r this rank.

At step s rank r holds the K/V of rank src = r - s (mod N). Which queries meet which keys at that
step (`_blocks`) follows from the layout (sharding.py):
  non-causal                       all local queries x all received keys
  causal, step 0 (own keys)        the local causal block
  causal, contiguous, src < r      all x all (earlier tokens); src > r: nothing (later tokens)
  causal, zigzag, src < r          all queries x the first half of the keys (chunk src; chunk
                                   2N-1-src lies after every local query)
  causal, zigzag, src > r          the second half of the queries (chunk 2N-1-r) x all keys
                                   (chunk r lies before both received chunks)
so under zigzag every rank does half a block at every step. Packed documents (`docs`, see
attention/documents.py) refine each of these blocks into per-document dense sub-blocks, batch row by
batch row; rows of documents with no key at this step are not touched.

`bidirectional=True` (method `ring_bidir`): two lanes, the first half of the KV heads (with the query
heads that read them) moving +1, the second half -1 (src = r + s), each with the same block schedule
for its own src; both directions of every link then carry half the bytes.

Forward: the next K/V are in flight while the current block runs; partial results are merged in
fp32 with their LSE (merge.py). Backward (DESIGN.md section 3): every block's backward uses the
*final* out and LSE; dQ accumulates locally in fp32; dK/dV accumulators (fp32) travel the ring
behind the K/V they belong to, each rank adding its contribution, and after N hops arrive home.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.attention import get_kernel, merge_partials
from longtrain.attention.documents import Documents
from longtrain.attention.kernels import BlockKernel
from longtrain.parallel.comm import P2PComm

ALL = slice(None)


def _blocks(step: int, rank: int, n: int, s_local: int, causal: bool, layout: str,
            direction: int = 1) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal?) of the block work at `step`, K/V moving `direction` (+1: from
    rank - step; -1: from rank + step)."""
    if not causal:
        return [(ALL, ALL, False)]
    if step == 0:
        return [(ALL, ALL, True)]
    src = (rank - direction * step) % n
    if layout == "contiguous":
        return [(ALL, ALL, False)] if src < rank else []
    half = s_local // 2
    if src < rank:
        return [(ALL, slice(0, half), False)]
    return [(slice(half, None), ALL, False)]


def _work(step: int, rank: int, n: int, s_local: int, causal: bool, layout: str, direction: int,
          docs: Documents | None, batch: int, kernel: BlockKernel):
    """(batch rows, query rows, key rows, causal?, kernel) of every kernel call at `step`."""
    src = (rank - direction * step) % n
    for qs, ks, c in _blocks(step, rank, n, s_local, causal, layout, direction):
        if docs is None:
            yield ALL, qs, ks, c, kernel
            continue
        for b in range(batch):
            for q_rows, k_rows, c_doc in docs.blocks(b, rank, src, qs, ks, c):
                yield slice(b, b + 1), q_rows, k_rows, c_doc, kernel.for_varying_shapes()


def _t(x_BSHD: Tensor) -> Tensor:
    return x_BSHD.transpose(1, 2)  # a BHSD view over BSHD memory (what the kernels take)


def _lanes(h: int, hkv: int, bidirectional: bool) -> list[tuple[slice, slice, int]]:
    """(query heads, KV heads, direction) of each lane. Bidirectional: the first half of the KV heads
    (and the query heads that read them under GQA) travel clockwise, the second half counter-clockwise,
    so both directions of every link carry half the bytes."""
    if not bidirectional:
        return [(ALL, ALL, 1)]
    if hkv % 2:
        raise ValueError(f"the bidirectional ring splits the KV heads in two: {hkv} KV heads is odd; use method=ring")
    return [(slice(0, h // 2), slice(0, hkv // 2), 1), (slice(h // 2, None), slice(hkv // 2, None), -1)]


def _hop(comm: P2PComm, lanes, tensors_per_lane: list[list[Tensor]]) -> list[list[Tensor]]:
    """Post every lane's tensors one hop in its direction, in one batch; returns the receive buffers."""
    r = comm.rank
    sends = [(t, r + d) for (_, _, d), ts in zip(lanes, tensors_per_lane) for t in ts]
    recvs = [(t.shape, t.dtype, r - d) for (_, _, d), ts in zip(lanes, tensors_per_lane) for t in ts]
    flat = iter(comm.post(sends, recvs))
    return [[next(flat) for _ in ts] for ts in tensors_per_lane]


def ring_forward(q: Tensor, k: Tensor, v: Tensor, comm: P2PComm, *, causal: bool, layout: str,
                 kernel: BlockKernel, scale: float | None, bidirectional: bool = False,
                 docs: Documents | None = None) -> tuple[Tensor, Tensor]:
    b, s, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 running result (fp64 stays fp64)
    out = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    n, lanes = comm.world, _lanes(h, k.shape[2], bidirectional)
    kv = [[k[:, :, kh], v[:, :, kh]] for _, kh, _ in lanes]
    for step in range(n):
        nxt = _hop(comm, lanes, kv) if step < n - 1 else None
        for (qh, _, direction), (k_l, v_l) in zip(lanes, kv):
            for bs, qs, ks, c, kern in _work(step, comm.rank, n, s, causal, layout, direction, docs, b, kernel):
                o_blk, l_blk = kern.forward(_t(q[bs, qs, qh]), _t(k_l[bs, ks]), _t(v_l[bs, ks]), causal=c,
                                              scale=scale)
                out[bs, qh, qs], lse[bs, qh, qs] = merge_partials(out[bs, qh, qs], lse[bs, qh, qs], o_blk, l_blk)
        if nxt is not None:
            comm.wait()
            kv = nxt
    return out.transpose(1, 2).to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_comm: P2PComm,
                  dkv_comm: P2PComm, *, causal: bool, layout: str, kernel: BlockKernel,
                  scale: float | None, bidirectional: bool = False,
                  docs: Documents | None = None) -> tuple[Tensor, Tensor, Tensor]:
    b, s, h, d = q.shape
    n, lanes = kv_comm.world, _lanes(h, k.shape[2], bidirectional)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [[k[:, :, kh], v[:, :, kh]] for _, kh, _ in lanes]
    dkv = [[torch.zeros(t.shape, dtype=acc, device=t.device) for t in pair] for pair in kv]
    dkv_in_flight = None
    for step in range(n):
        nxt = _hop(kv_comm, lanes, kv) if step < n - 1 else None
        blk = [[torch.zeros_like(t) for t in pair] for pair in dkv]
        for (qh, _, direction), (k_l, v_l), (dk_b, dv_b) in zip(lanes, kv, blk):
            for bs, qs, ks, c, kern in _work(step, kv_comm.rank, n, s, causal, layout, direction, docs, b,
                                             kernel):
                dq_i, dk_i, dv_i = kern.backward(_t(dout[bs, qs, qh]), _t(q[bs, qs, qh]), _t(k_l[bs, ks]),
                                                   _t(v_l[bs, ks]), _t(out[bs, qs, qh]), lse[bs, qh, qs],
                                                   causal=c, scale=scale)
                dq[bs, qs, qh] += _t(dq_i)
                dk_b[bs, ks] += _t(dk_i)
                dv_b[bs, ks] += _t(dv_i)
        if dkv_in_flight is not None:  # the accumulators of this step's K/V, from the previous rank
            dkv_comm.wait()
            dkv = dkv_in_flight
        for pair, pair_b in zip(dkv, blk):
            for t, t_b in zip(pair, pair_b):
                t += t_b
        dkv_in_flight = _hop(dkv_comm, lanes, dkv)
        if nxt is not None:
            kv_comm.wait()
            kv = nxt
    dkv_comm.wait()  # after N hops the accumulators of our own K/V are back, with every rank's share
    dk = torch.cat([pair[0] for pair in dkv_in_flight], dim=2)
    dv = torch.cat([pair[1] for pair in dkv_in_flight], dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, kernel: BlockKernel, scale, bidirectional: bool,
                docs: Documents | None):
        out, lse = ring_forward(q, k, v, P2PComm(group, "ring", q.device), causal=causal, layout=layout,
                                kernel=kernel, scale=scale, bidirectional=bidirectional, docs=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, kernel, scale, bidirectional, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, kernel, scale, bidirectional, docs = ctx.args
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, P2PComm(group, "ring", q.device),
                                   P2PComm(group, "ring", q.device), causal=causal, layout=layout, kernel=kernel,
                                   scale=scale, bidirectional=bidirectional, docs=docs)
        return dq, dk, dv, None, None, None, None, None, None, None


def ring_attention(q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, *, group, causal: bool = True,
                   layout: str = "zigzag", kernel: str | BlockKernel = "auto", scale: float | None = None,
                   bidirectional: bool = False, docs: Documents | None = None) -> tuple[Tensor, Tensor]:
    """Attention of the whole sequence for this rank's queries; returns (out_BSHD, lse_BHS fp32).
    `docs`: packed documents (attention/documents.py), each token attending only to its own document."""
    kern = get_kernel(kernel, q_BSHD.device, q_BSHD.dtype)
    _lanes(q_BSHD.shape[2], k_BSHD.shape[2], bidirectional)  # refuse odd KV heads before any communication
    return RingAttention.apply(q_BSHD.contiguous(), k_BSHD.contiguous(), v_BSHD.contiguous(), group, causal, layout,
                               kern, scale, bidirectional, docs)


def bidirectional_ring_attention(q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Two counter-rotating K/V rings, half of the KV heads each: both directions of every link busy
    with half the ring's bytes (the GQA alternative to TokenRing, DESIGN.md section 3)."""
    return ring_attention(q_BSHD, k_BSHD, v_BSHD, bidirectional=True, **kw)
