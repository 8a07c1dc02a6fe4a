"""kdfuse.triton_mm: the promoted GEMM against the float64 product, and where kdfuse uses it.

Without a GPU the kernel runs under Triton's interpreter (see conftest.py) in float16 with small
tiles, so CI checks the tiling, the promotion, both layouts of ``a``, the accumulation and the
K tail of the kernel source the GPU runs (the interpreter reads bfloat16 through a tensor
descriptor as raw bits, so bfloat16 is checked on the GPU only). On a GPU the default tiles run.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import sparse_floats
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16]


def _mm():
    return importlib.import_module("kdfuse.triton_mm")


def _config():
    mm = _mm()
    # Small tiles under the interpreter (it is slow); two K-blocks per partial, so K = 8..240
    # spans up to 8 partials and may end in a partly filled one.
    return mm.MMConfig() if CUDA else mm.MMConfig(bm=32, bn=32, bk=16, group=2, promote=2, stages=2, warps=4)


def _bound(a: torch.Tensor, b: torch.Tensor, alpha: float, old: torch.Tensor | None) -> torch.Tensor:
    """Elementwise error bound: float32 sums of exact 16-bit products, each addition off by at
    most one float32 ulp of the running sum (the tensor cores truncate: 2^-23, not 2^-24), plus
    the rounding of the scale and the final addition."""
    k = a.shape[1]
    mag = abs(alpha) * (a.double().abs() @ b.double().abs())
    bound = (k + 4) * 2.0**-23 * mag
    if old is not None:
        bound += 2.0**-23 * (old.double().abs() + mag)
    return bound + 1e-30


@settings(deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.sampled_from([8, 40]),
    k=st.integers(1, 30).map(lambda i: 8 * i),  # rows of a (M, K) and of b are 16-byte aligned
    rows=st.booleans(),  # a stored as (M, K) or as the transpose of a (K, M) tensor
    accumulate=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -3.0, 2.0**-14]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_promoted_mm_is_the_float32_product(m, n, k, rows, accumulate, alpha, dtype, data):
    mm = _mm()
    if not rows:
        m = 8 * (m // 8 + 1)  # the (K, M) storage's rows are 16-byte aligned too
    # Operands of up to 16800 entries: hypothesis' sparse arrays (a few hundred drawn entries at
    # drawn positions, the rest one drawn value), float16 values, exact in the operand dtype.
    a = data.draw(sparse_floats((m, k) if rows else (k, m), 4.0, dtype, width=16), label="a")
    a = a if rows else a.t()
    b = data.draw(sparse_floats((k, n), 4.0, dtype, width=16), label="b")
    old = data.draw(sparse_floats((m, n), 30.0, torch.float32), label="out")
    a, b, out = a.to(DEVICE), b.to(DEVICE), old.clone().to(DEVICE)
    mm.promoted_mm(out, a, b, accumulate=accumulate, alpha=alpha, config=_config())
    exact = alpha * (a.double() @ b.double()) + (old.double().to(DEVICE) if accumulate else 0)
    bound = _bound(a, b, alpha, old.to(DEVICE) if accumulate else None)
    assert ((out.double() - exact).abs() <= bound).all(), ((out.double() - exact).abs() / bound).max().item()


def test_promoted_mm_empty_reduction():
    mm = _mm()
    a = torch.empty(16, 0, dtype=torch.float16, device=DEVICE)
    b = torch.empty(0, 8, dtype=torch.float16, device=DEVICE)
    out = torch.full((16, 8), 3.0, device=DEVICE)
    mm.promoted_mm(out, a, b, accumulate=True, config=_config())
    assert (out == 3).all()
    mm.promoted_mm(out, a, b, accumulate=False, config=_config())
    assert (out == 0).all()


def test_supported_only_on_cuda_with_aligned_16_bit_operands():
    mm = _mm()
    a = torch.randn(64, 64).bfloat16()
    b = torch.randn(64, 32).bfloat16()
    out = torch.empty(64, 32)
    assert not mm.supported(out, a, b)  # CPU tensors
    if not CUDA:
        return
    a, b, out = a.cuda(), b.cuda(), out.cuda()
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert mm.supported(out, a, b) == hopper
    assert mm.supported(out, a.t().contiguous().t(), b) == hopper  # (K, M) storage
    assert not mm.supported(out, a.float(), b.float())
    assert not mm.supported(out.bfloat16(), a, b)
    assert not mm.supported(out, a[:, 1:], b[1:])  # rows not 16-byte aligned


@pytest.mark.gpu
def test_long_reduction_does_not_drift():
    """K = 131072: the promoted GEMM stays within 1e-5 of the float64 product (the drift of a
    2048-long reduction, ~2.5e-6), where one cuBLAS bf16 GEMM drifts by ~1.2e-9·K ≈ 1.6e-4 on an
    H100 (docs/benchmarks.md, "Gradient error")."""
    mm = _mm()
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the promoted GEMM runs on Hopper")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(512, 131072, generator=g, device="cuda").bfloat16()
    b = torch.randn(131072, 256, generator=g, device="cuda").bfloat16()
    exact = a.double() @ b.double()
    out = torch.empty(512, 256, device="cuda")
    mm.promoted_mm(out, a, b, accumulate=False)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n, chunk", [(300, 128), (4500, 4224)])
def test_fused_step_routes_long_reductions_to_the_promoted_gemm(monkeypatch, n, chunk):
    """On Hopper, grad_hidden (K = V > 4096) goes through promoted_mm, and so does grad_weight
    where a chunk has more than 4096 rows; shorter reductions stay with cuBLAS. The gradients
    match the float64 reference."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the promoted GEMM runs on Hopper")
    from kdfuse import fused_linear_distill, fused_linear_distill_ref

    mm = _mm()
    calls = []
    real = mm.promoted_mm

    def spy(out, a, b, accumulate, alpha=1.0, config=None):
        calls.append((tuple(a.shape), tuple(b.shape), accumulate))
        real(out, a, b, accumulate, alpha, config or mm.MMConfig())

    monkeypatch.setattr(mm, "promoted_mm", spy)
    v, hs, ht = 8200, 64, 96
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hs, generator=g, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(v, hs, generator=g, device="cuda") / 8).bfloat16().requires_grad_()
    th = torch.randn(n, ht, generator=g, device="cuda").bfloat16()
    tw = (torch.randn(v, ht, generator=g, device="cuda") / 8).bfloat16()
    loss = fused_linear_distill(h, w, th, tw, chunk_size=chunk, impl="compile")
    gh, gw = torch.autograd.grad(loss, (h, w))
    want = []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        want.append(((rows, v), (v, hs), False))  # grad_hidden of the chunk's rows
        if rows > 4096:
            want.append(((v, rows), (rows, hs), start > 0))  # grad_weight, added after the first chunk
    assert calls == want
    # And the step's gradients are those of the float64 reference: within test_gpu.py's bf16
    # bound, 6 units beyond the rounding of the exact gradient to bf16.
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref = fused_linear_distill_ref(h64, w64, th.double(), tw.double())
    for got, want in zip((gh, gw), torch.autograd.grad(ref, (h64, w64))):
        inherent = ((want.bfloat16().double() - want).norm() / want.norm()).item()
        assert ((got.double() - want).norm() / want.norm()).item() < 6 * 2.0**-8 + inherent


def test_a_config_without_promotion_is_refused():
    # promote = 1 compiles to one tensor-core accumulation over all of K (a review found it).
    with pytest.raises(ValueError, match="promote"):
        _mm().MMConfig(promote=1)
    assert _mm().MMConfig(promote=2).promote == 2


@pytest.mark.parametrize(
    "a_shape, b_shape, out_shape", [((40, 16), (24, 40), (40, 40)), ((40, 16), (16, 40), (40, 48))]
)
def test_mismatched_shapes_are_refused(a_shape, b_shape, out_shape):
    a = torch.zeros(a_shape, dtype=DTYPES[0], device=DEVICE)
    b = torch.zeros(b_shape, dtype=DTYPES[0], device=DEVICE)
    out = torch.zeros(out_shape, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        _mm().promoted_mm(out, a, b, accumulate=False)
