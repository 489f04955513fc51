"""Fused CUDA attention kernels (cuDNN, flash) against the math reference, on a GPU.

Every comparison feeds the *same* bf16 inputs to the fused kernel and to the math kernel (which computes in
float32 and materialises P), then compares in float32. The error metric is max|a - b| / max|b|, relative to
the tensor's scale (robust to near-zero elements); LSE is compared in absolute terms (it is a log).

Tolerance budget, bf16 (unit roundoff 2^-8 = 3.9e-3). Measured on an H200 (torch 2.11, cuDNN 9.19) over
every case below, the largest errors were: out 5.7e-3, dq/dk/dv 7.8e-3, lse 1.9e-6 (both kernels alike).
- out: both results are rounded to bf16 once (<= 3.9e-3 of an element); the fused kernels also round P to
  bf16 before the P @ V matmul, adding about as much again: 1.5e-2 (2.6x the largest seen).
- dq/dk/dv: the fused backward also rounds P and dS to bf16 before its matmuls: 2e-2 (2.6x).
- lse: float32 in both, from the same bf16 q/k with fp32 accumulation; only summation order and exp
  implementation differ (float32 ulp at lse ~ 10 is 1e-6): absolute 1e-4.
The measured errors are printed (run with -s), so the budget can be re-derived on other hardware.
"""

from __future__ import annotations

import pytest
import torch

from longtrain.attention import KERNELS, block_attention_with_lse, get_kernel, merge_partials

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16
OUT_TOL, GRAD_TOL, LSE_TOL = 1.5e-2, 2e-2, 1e-4
FUSED = ["cudnn", "flash"]
HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA g=4, MQA


def rel_err(actual, expected) -> float:
    a, e = actual.float(), expected.float()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def check(actual, expected, tol, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    print(f"  {what}: {err:.2e} (tol {tol:.1e})")
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def check_lse(actual, expected, what="lse"):
    assert actual.shape == expected.shape and actual.dtype == torch.float32, (what, actual.shape, actual.dtype)
    err = (actual - expected.float()).abs().max().item()
    print(f"  {what}: abs {err:.2e} (tol {LSE_TOL:.1e})")
    assert err <= LSE_TOL, f"{what}: absolute error {err:.3e} > {LSE_TOL:.1e}"


def need(kernel: str) -> None:
    if not KERNELS[kernel].available(torch.device("cuda"), BF16):
        pytest.skip(f"{kernel} is not available on {torch.cuda.get_device_name()}")


def make_qkv(seed, B, Hq, Hkv, S, D, layout="bhsd"):
    """bf16 inputs; layout 'bshd' gives the transposed views of (B, S, H, D) tensors the model passes."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(H):
        if layout == "bshd":
            return torch.randn(B, S, H, D, generator=g, device="cuda", dtype=BF16).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g, device="cuda", dtype=BF16)

    return rand(Hq), rand(Hkv), rand(Hkv), rand(Hq)


def run_kernel(name, q, k, v, dout, causal):
    kern = KERNELS[name]
    out, lse = kern.forward(q, k, v, causal=causal, scale=None)
    return out, lse, kern.backward(dout, q, k, v, out, lse, causal=causal, scale=None)


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("S,D,layout", [(257, 64, "bhsd"), (1024, 128, "bshd"), (4096, 128, "bhsd")])
def test_fused_matches_math(kernel, causal, heads, S, D, layout):
    need(kernel)
    Hq, Hkv = heads
    q, k, v, dout = make_qkv(1, 2, Hq, Hkv, S, D, layout)
    print(f"\n{kernel} causal={causal} heads={heads} S={S} D={D} {layout}")
    out, lse, grads = run_kernel(kernel, q, k, v, dout, causal)
    ref_out, ref_lse, ref_grads = run_kernel("math", q, k, v, dout, causal)
    assert out.dtype == BF16 and out.shape == q.shape and lse.shape == (2, Hq, S)
    check(out, ref_out, OUT_TOL, "out")
    check_lse(lse, ref_lse)
    for name, got, ref, like in zip("qkv", grads, ref_grads, (q, k, v)):
        assert got.dtype == BF16 and got.shape == like.shape
        check(got, ref, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_backward_with_external_merged_out_lse(kernel, heads, causal):
    """Ring attention's use: each block's backward gets the merged (float32) out/lse of its query rows.

    Queries and keys are cut into halves; query half r attends to key half c (causal on the diagonal,
    full below it, skipped above it when causal). Summed block gradients must match the whole-sequence
    math reference computed from the same bf16 inputs.
    """
    need(kernel)
    Hq, Hkv = heads
    S, D, n = 2048, 128, 1024
    q, k, v, dout = make_qkv(2, 1, Hq, Hkv, S, D)
    kern = KERNELS[kernel]
    half = lambda t, i: t[:, :, i * n:(i + 1) * n]  # noqa: E731
    blocks = {r: [(c, causal and c == r) for c in (0, 1) if not (causal and c > r)] for r in (0, 1)}
    merged = {}
    for r, row in blocks.items():
        acc = None
        for c, block_causal in row:
            o, l = kern.forward(half(q, r), half(k, c), half(v, c), causal=block_causal, scale=None)
            acc = (o.float(), l) if acc is None else merge_partials(*acc, o, l)
        merged[r] = acc
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for r, row in blocks.items():
        for c, block_causal in row:
            g = kern.backward(half(dout, r), half(q, r), half(k, c), half(v, c), *merged[r],
                              causal=block_causal, scale=None)
            half(dq, r).add_(g[0])  # accumulate pieces in float32, as ring attention does
            half(dk, c).add_(g[1])
            half(dv, c).add_(g[2])
    print(f"\n{kernel} split/merge causal={causal} heads={heads}")
    ref_out, ref_lse, ref_grads = run_kernel("math", q, k, v, dout, causal)
    check(torch.cat([merged[0][0], merged[1][0]], dim=2), ref_out, OUT_TOL, "merged out")
    check_lse(torch.cat([merged[0][1], merged[1][1]], dim=2), ref_lse, "merged lse")
    for name, got, ref in zip("qkv", (dq, dk, dv), ref_grads):
        check(got, ref, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("kernel", FUSED)
def test_autograd_through_fused_kernel(kernel):
    need(kernel)
    q, k, v, dout = make_qkv(3, 2, 8, 2, 512, 128, "bshd")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = block_attention_with_lse(*leaves, causal=True, kernel=kernel)
    assert not lse.requires_grad
    out.backward(dout)
    print(f"\n{kernel} autograd")
    ref_out, ref_lse, ref_grads = run_kernel("math", q, k, v, dout, True)
    check(out.detach(), ref_out, OUT_TOL, "out")
    check_lse(lse, ref_lse)
    for name, leaf, ref in zip("qkv", leaves, ref_grads):
        check(leaf.grad, ref, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("kernel", FUSED)
def test_fused_layouts_give_same_results(kernel):
    """BSHD views, BHSD-contiguous copies, and a mix (q/k/v BSHD, float32 BHSD out and BHSD dout, as ring
    attention passes a merged out) must give the same results, whatever order the calls come in.

    Regression: on torch 2.11 / cuDNN 9.19 the mixed call, made after the all-BSHD one, returned dq off by
    280% until CudnnKernel put every tensor in one layout.
    """
    need(kernel)
    kern = KERNELS[kernel]
    q, k, v, dout = make_qkv(5, 1, 8, 2, 384, 128, "bshd")
    q2, k2, v2, dout2 = (t.contiguous() for t in (q, k, v, dout))
    out, lse = kern.forward(q, k, v, causal=True, scale=None)
    out2, lse2 = kern.forward(q2, k2, v2, causal=True, scale=None)
    ref = kern.backward(dout, q, k, v, out, lse, causal=True, scale=None)
    got = {
        "bhsd": kern.backward(dout2, q2, k2, v2, out2.float(), lse2, causal=True, scale=None),
        "mixed": kern.backward(dout2, q, k, v, out.float().contiguous(), lse.contiguous(), causal=True, scale=None),
    }
    print(f"\n{kernel} layouts")
    # same values and kernel, only memory order differs: at most a different reduction order in bf16.
    check(out2, out, 1e-2, "out")
    check_lse(lse2, lse)
    for case, grads in got.items():
        for name, a, b in zip("qkv", grads, ref):
            check(a, b, 1e-2, f"{case} d{name}")


def test_auto_picks_cudnn_on_h200():
    name = torch.cuda.get_device_name()
    picked = get_kernel("auto", torch.device("cuda"), BF16).name
    if "H200" in name or "H100" in name:
        assert picked == "cudnn", f"auto picked {picked!r} on {name}"
    else:
        assert picked in ("cudnn", "flash", "math")
    # float32 is not supported by the fused ops: auto falls back to math, and asking for cudnn is an error.
    assert get_kernel("auto", "cuda", torch.float32).name == "math"
    with pytest.raises(ValueError, match="cudnn"):
        get_kernel("cudnn", "cuda", torch.float32)


@pytest.mark.parametrize("kernel", FUSED)
def test_fused_rejects_odd_head_dim(kernel):
    need(kernel)
    q, k, v, _ = make_qkv(4, 1, 2, 2, 16, 12)
    with pytest.raises(ValueError, match="head_dim"):
        KERNELS[kernel].forward(q, k, v, causal=True, scale=None)
