"""Attention block kernels (math reference, CPU flash op) and the LSE merge, on CPU.

Errors are measured as max|actual - expected| / max|expected| ("relative to the tensor's scale"), which
does not blow up on elements that happen to be near zero; LSE is compared in absolute terms (it is a log).
"""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.attention import (
    KERNELS,
    block_attention,
    block_attention_with_lse,
    get_kernel,
    merge_partials,
)

HEADS = [(4, 4), (4, 2), (8, 1)]  # (q_heads, kv_heads): MHA, GQA g=2, MQA g=8
SIZES = [(37, 16), (8, 32)]  # (S, head_dim): odd S that no block size divides, and a tiny one


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_rel(actual, expected, tol, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_qkv(seed, B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def naive_attention(q, k, v, causal, scale=None):
    """float64 softmax(QK^T)V with expanded K/V: independent of every trick in kernels.py."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def naive_grads(q, k, v, dout, causal, scale=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = naive_attention(*leaves, causal, scale)
    return out, lse, torch.autograd.grad(out, leaves, dout.double())


# ---------------------------------------------------------------- math kernel vs naive float64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_math_matches_naive(causal, heads, size, dtype):
    (Hq, Hkv), (S, D) = heads, size
    q, k, v, dout = make_qkv(1, 2, Hq, Hkv, S, S, D, dtype)
    ref_out, ref_lse, ref_grads = naive_grads(q, k, v, dout, causal)
    math_k = KERNELS["math"]
    out, lse = math_k.forward(q, k, v, causal=causal, scale=None)
    grads = math_k.backward(dout, q, k, v, out, lse, causal=causal, scale=None)
    # float64 differs only by summation order (~1e-15); float32 computes in float32 (unit roundoff 6e-8,
    # sums of <= 37 terms and one softmax): 1e-5 leaves two orders of margin.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel(out, ref_out, tol, "out")
    assert (lse.double() - ref_lse).abs().max().item() <= tol * 10, "lse"  # lse ~ log(S) + O(1): absolute
    for name, got, ref in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype
        assert_rel(got, ref, tol, f"d{name}")


@pytest.mark.parametrize("heads", HEADS)
def test_math_noncausal_unequal_lengths(heads):
    Hq, Hkv = heads
    q, k, v, dout = make_qkv(2, 1, Hq, Hkv, 13, 29, 16, torch.float64)
    ref_out, ref_lse, ref_grads = naive_grads(q, k, v, dout, False, scale=0.3)
    out, lse = KERNELS["math"].forward(q, k, v, causal=False, scale=0.3)
    grads = KERNELS["math"].backward(dout, q, k, v, out, lse, causal=False, scale=0.3)
    assert_rel(out, ref_out, 1e-12, "out")  # float64 vs float64: reordering only
    assert_rel(lse, ref_lse, 1e-12, "lse")
    for name, got, ref in zip("qkv", grads, ref_grads):
        assert_rel(got, ref, 1e-12, f"d{name}")


def test_math_empty_key_set():
    """S_k = 0 (a block with no keys): out 0, lse -inf, no NaN; ring code relies on merging such blocks."""
    q, k, v, dout = make_qkv(3, 1, 4, 2, 5, 0, 16)
    out, lse = KERNELS["math"].forward(q, k, v, causal=False, scale=None)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = KERNELS["math"].backward(dout, q, k, v, out, lse, causal=False, scale=None)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.numel() == 0 and dv.numel() == 0


# ---------------------------------------------------------------- CPU flash op vs math

# float32: both compute in float32 with different blocking/summation order; observed max error ~5e-7 of
# the tensor's scale, so 1e-5 is the flash-vs-math float32 budget. bf16: both kernels read the same bf16
# inputs and round the result to bf16 (unit roundoff 2^-8 = 3.9e-3); the flash op also rounds P to bf16
# before the PV product and the gradients chain a few such roundings; observed <= 8e-3, so 2e-2. The lse
# is float32 in both and depends only on the (shared) bf16 inputs: absolute 1e-5 / 1e-3 (observed 6e-5).
FLASH_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-3)}  # (values and grads, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("size", SIZES)
def test_cpu_flash_matches_math(dtype, causal, heads, size):
    (Hq, Hkv), (S, D) = heads, size
    q, k, v, dout = make_qkv(4, 2, Hq, Hkv, S, S, D, dtype)
    tol, lse_tol = FLASH_TOL[dtype]
    outs = {}
    for name in ("math", "cpu_flash"):
        kern = KERNELS[name]
        out, lse = kern.forward(q, k, v, causal=causal, scale=None)
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, Hq, S)
        outs[name] = (out, lse, kern.backward(dout, q, k, v, out, lse, causal=causal, scale=None))
    (o_m, l_m, g_m), (o_f, l_f, g_f) = outs["math"], outs["cpu_flash"]
    assert_rel(o_f, o_m, tol, "out")
    assert (l_f - l_m).abs().max().item() <= lse_tol, "lse"
    for name, got, ref in zip("qkv", g_f, g_m):
        assert got.dtype == dtype
        assert_rel(got, ref, tol, f"d{name}")


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
def test_transposed_views_accepted(kernel):
    """The model passes (B, S, H, D) tensors transposed to BHSD: results must match contiguous inputs."""
    q, k, v, dout = make_qkv(5, 2, 4, 2, 37, 37, 16)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout)]
    assert not views[0].is_contiguous()
    kern = KERNELS[kernel]
    out, lse = kern.forward(q, k, v, causal=True, scale=None)
    out_v, lse_v = kern.forward(*views[:3], causal=True, scale=None)
    grads = kern.backward(dout, q, k, v, out, lse, causal=True, scale=None)
    grads_v = kern.backward(views[3], *views[:3], out_v, lse_v, causal=True, scale=None)
    assert_rel(out_v, out, 1e-6, "out")  # same math, only memory order differs: float32 reordering at most
    assert_rel(lse_v, lse, 1e-6, "lse")
    for name, got, ref in zip("qkv", grads_v, grads):
        assert_rel(got, ref, 1e-6, f"d{name}")


# ---------------------------------------------------------------- autograd wrapper


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", HEADS)
def test_block_attention_autograd(kernel, causal, heads):
    Hq, Hkv = heads
    q, k, v, dout = make_qkv(6, 2, Hq, Hkv, 37, 37, 16)
    ref_out, ref_lse, ref_grads = naive_grads(q, k, v, dout, causal, scale=0.2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = block_attention_with_lse(*leaves, causal=causal, scale=0.2, kernel=kernel)
    assert not lse.requires_grad  # lse is marked non-differentiable
    out.backward(dout)
    # float32 kernels vs a float64 reference: float32 rounding through softmax and two matmuls, 1e-5.
    assert_rel(out, ref_out, 1e-5, "out")
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5, "lse"
    for name, leaf, ref in zip("qkv", leaves, ref_grads):
        assert_rel(leaf.grad, ref, 1e-5, f"d{name}")
    # block_attention is the same function returning out only; a kernel object is accepted too.
    out2 = block_attention(q, k, v, causal=causal, scale=0.2, kernel=KERNELS[kernel])
    assert torch.equal(out2, out.detach())


# ---------------------------------------------------------------- split keys, merge, external (out, lse)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_split_keys_merge_external_backward(kernel, heads, causal):
    """What ring attention does with two ranks.

    Queries and keys are cut into halves 0 and 1. Query half r attends to key half c through a block:
    causal (diagonal, c == r), full (c < r, or any c when not causal), or skipped (c > r under causal).
    The blocks of a query half are merged with merge_partials; then every block's backward is called with
    the *merged* out/lse of its query half and the same dout. Summed, the pieces must equal the gradients
    of full attention.
    """
    Hq, Hkv = heads
    S, D, n = 38, 16, 19
    q, k, v, dout = make_qkv(7, 2, Hq, Hkv, S, S, D)
    kern = KERNELS[kernel]
    half = lambda t, i: t[:, :, i * n:(i + 1) * n]  # noqa: E731
    blocks = {r: [(c, causal and c == r) for c in (0, 1) if not (causal and c > r)] for r in (0, 1)}

    merged = {}
    for r, row in blocks.items():
        out_r, lse_r = None, None
        for c, block_causal in row:
            o, l = kern.forward(half(q, r), half(k, c), half(v, c), causal=block_causal, scale=None)
            out_r, lse_r = (o.float(), l) if out_r is None else merge_partials(out_r, lse_r, o, l)
        merged[r] = (out_r, lse_r)

    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for r, row in blocks.items():
        out_r, lse_r = merged[r]
        for c, block_causal in row:
            # the merged out is float32: backward takes it as is (cast inside the kernel)
            dq_b, dk_b, dv_b = kern.backward(half(dout, r), half(q, r), half(k, c), half(v, c), out_r, lse_r,
                                             causal=block_causal, scale=None)
            half(dq, r).add_(dq_b)
            half(dk, c).add_(dk_b)
            half(dv, c).add_(dv_b)

    ref_out, ref_lse, ref_grads = naive_grads(q, k, v, dout, causal)
    # float32 blocks, merge in float32, and sums of two pieces: same float32 budget as a single kernel.
    assert_rel(torch.cat([merged[0][0], merged[1][0]], dim=2), ref_out, 1e-5, "merged out")
    assert (torch.cat([merged[0][1], merged[1][1]], dim=2).double() - ref_lse).abs().max().item() <= 1e-5
    for name, got, ref in zip("qkv", (dq, dk, dv), ref_grads):
        assert_rel(got, ref, 1e-5, f"d{name}")


# ---------------------------------------------------------------- merge


def test_merge_matches_logaddexp_with_large_lse():
    """Against the exact form; lse ~ 500 would overflow a naive exp-weighted sum in float32."""
    g = torch.Generator().manual_seed(8)
    o1, o2 = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    l1 = 500 + 10 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    l2 = 500 + 10 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    out, lse = merge_partials(o1, l1, o2, l2)
    ref_l = torch.logaddexp(l1, l2)
    ref_o = torch.exp(l1 - ref_l)[..., None] * o1.double() + torch.exp(l2 - ref_l)[..., None] * o2.double()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_rel(out, ref_o, 1e-5, "out")  # float32 merge: a few roundings of O(1) values
    assert (lse.double() - ref_l).abs().max().item() <= 1e-4  # float32 of ~500 has ulp 3e-5


def test_merge_with_empty_side():
    g = torch.Generator().manual_seed(9)
    o, o_other = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    lse = torch.randn(1, 2, 6, generator=g)
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    for args in [(empty_o, empty_l, o, lse), (o, lse, empty_o, empty_l)]:
        out, l = merge_partials(*args)
        assert torch.equal(out, o) and torch.equal(l, lse)  # the empty side contributes exactly nothing
    out, l = merge_partials(empty_o, empty_l, empty_o, empty_l)
    assert not out.isnan().any() and torch.isneginf(l).all()
    # Mixed rows: only some rows empty on one side, and garbage (inf) in the empty side's out is ignored.
    mask = torch.tensor([True, False, True, False, False, True])
    l2 = torch.where(mask, float("-inf"), lse)
    o2 = torch.where(mask[:, None], float("inf"), o_other)
    out, l = merge_partials(o, lse, o2, l2)
    assert torch.isfinite(out).all() and torch.isfinite(l).all()
    assert torch.equal(out[:, :, mask], o[:, :, mask]) and torch.equal(l[:, :, mask], lse[:, :, mask])


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching shapes"):
        merge_partials(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4))


# ---------------------------------------------------------------- kernel selection and user errors


@pytest.mark.parametrize("dtype,expected", [(torch.float32, "cpu_flash"), (torch.bfloat16, "cpu_flash"),
                                            (torch.float64, "math")])
def test_auto_on_cpu(dtype, expected):
    assert get_kernel("auto", torch.device("cpu"), dtype).name == expected
    assert get_kernel("auto", "cpu", dtype) is KERNELS[expected]


def test_unavailable_kernel_raises_helpful_error():
    with pytest.raises(ValueError) as info:
        get_kernel("cudnn", torch.device("cpu"), torch.float32)
    msg = str(info.value)
    for word in ("cudnn", "cpu", "torch.float32", "math", "cpu_flash"):
        assert word in msg, msg
    with pytest.raises(ValueError, match="flash"):
        block_attention(*make_qkv(10, 1, 2, 2, 4, 4, 8)[:3], kernel="flash")
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'"):
        get_kernel("fast", "cpu", torch.float32)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
def test_bad_shapes_raise(kernel):
    q, k, v, _ = make_qkv(11, 1, 4, 2, 8, 6, 16)
    with pytest.raises(ValueError, match="S_q == S_k"):
        block_attention(q, k, v, causal=True, kernel=kernel)
    assert block_attention(q, k, v, causal=False, kernel=kernel).shape == q.shape  # non-causal: any S_k
    q3, k3, v3, _ = make_qkv(12, 1, 4, 3, 8, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        KERNELS[kernel].forward(q3, k3, v3, causal=True, scale=None)
