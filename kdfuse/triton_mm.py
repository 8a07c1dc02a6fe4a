"""A 16-bit GEMM into a float32 output whose long reductions stay accurate.

The gradient GEMMs of a chunk reduce over long dimensions: grad_hidden = dlogits @ W over the
vocabulary (K = V, 128k and more), grad_weight = dlogitsᵀ @ hidden over the chunk's rows. On
Hopper a cuBLAS bf16 GEMM with float32 accumulation drifts from the exact product in proportion
to K (docs/benchmarks.md, "Gradient error"); our reading: the tensor cores' accumulator does not
round to nearest. Summing the products of short K slices in float32 on the CUDA cores removes
the drift (docs/design.md). This kernel does that
inside one GEMM: each tile's MMAs accumulate ``PROMOTE`` K-blocks into a fresh partial, which is
then added to the tile's float32 total (the "promotion" DeepSeek-V3 uses for FP8 GEMMs), so the
drift is that of a ``PROMOTE·BK``-long GEMM, whatever K is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["MMConfig", "promoted_mm", "supported"]


@dataclass(frozen=True)
class MMConfig:
    """Tile and pipeline of ``promoted_mm``: the fastest configuration measured on Hopper
    (docs/design.md, "The promoted GEMM", has the times and errors of the alternatives). Two
    float32 (BM, BN) accumulators, the total and the partial, live in registers; 128 × 256 over 8
    warps (2 × 128 per thread) sits at the register limit, while 128 × 128 tiles, which fit, fetch
    4/3 as many operand bytes per product from L2."""

    bm: int = 128
    bn: int = 256
    bk: int = 64
    group: int = 16  # row tiles that sweep the columns together, so the B blocks they share stay in L2
    promote: int = 32  # K-blocks per partial: the drift of a 2048-long reduction
    stages: int = 4
    warps: int = 8

    def __post_init__(self) -> None:
        # One K-block per partial leaves a loop Triton folds away, and `total += dot(a, b)`
        # becomes one tensor-core accumulation over all of K: no promotion at all.
        if self.promote < 2:
            raise ValueError(f"promote must be at least 2 K-blocks per partial, got {self.promote}")


@triton.jit
def _tile_of(tile, n_m, n_n, GROUP: tl.constexpr):
    """(pid_m, pid_n) of ``tile`` in grouped order."""
    per_group = GROUP * n_n
    first_m = (tile // per_group) * GROUP
    rows = tl.minimum(n_m - first_m, GROUP)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _promoted_mm_kernel(
    a_desc,
    b_desc,
    c_desc,
    M,
    N,
    K,
    alpha,
    A_ROWS: tl.constexpr,  # a stored as (M, K) rows (True) or as its transpose (K, M)
    ACCUMULATE: tl.constexpr,  # C += alpha·A @ B (True) or C = alpha·A @ B
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
    PROMOTE: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP)
    total = tl.zeros((BM, BN), tl.float32)
    # K-blocks past K read zeros (the descriptors' out-of-bounds fill): the last group may overrun.
    for group in tl.range(tl.cdiv(tl.cdiv(K, BK), PROMOTE), num_stages=STAGES, flatten=True):
        part = tl.zeros((BM, BN), tl.float32)
        for j in range(PROMOTE):
            k = (group * PROMOTE + j) * BK
            if A_ROWS:
                a = a_desc.load([pid_m * BM, k])
            else:
                a = a_desc.load([k, pid_m * BM]).T
            part = tl.dot(a, b_desc.load([k, pid_n * BN]), part)
        total += part
    out = total * alpha
    if ACCUMULATE:
        out += c_desc.load([pid_m * BM, pid_n * BN])
    c_desc.store([pid_m * BM, pid_n * BN], out)


def _tma_ok(t: Tensor) -> bool:
    """A 2-D operand a TMA descriptor can address: unit last stride, 16-byte aligned base and rows."""
    size = t.element_size()
    return t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def supported(
    out: Tensor,  # (M, N) float32
    a: Tensor,  # (M, K) 16-bit, rows or columns contiguous
    b: Tensor,  # (K, N) same dtype, rows contiguous
) -> bool:
    """Whether ``promoted_mm`` takes these operands: a Hopper GPU (where it was measured; the
    tile choice and the drift it removes are Hopper's), 16-bit inputs, float32 out, and layouts
    the TMA descriptors can address."""
    if not (out.is_cuda and torch.cuda.get_device_capability(out.device)[0] == 9):
        return False
    if a.device != out.device or b.device != out.device or not a.dim() == b.dim() == out.dim() == 2:
        return False
    if out.stride(0) < out.shape[1]:  # rows that overlap (an expanded view) would race
        return False
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype or out.dtype != torch.float32:
        return False
    return _tma_ok(out) and _tma_ok(b) and (_tma_ok(a) or _tma_ok(a.t()))


def promoted_mm(
    out: Tensor,  # (M, N) float32, rows contiguous
    a: Tensor,  # (M, K) bf16/fp16, (M, K) or (K, M) rows contiguous
    b: Tensor,  # (K, N) same dtype, rows contiguous
    accumulate: bool,
    alpha: float = 1.0,
    config: MMConfig = MMConfig(),
) -> None:
    """out = alpha · a @ b, or out += alpha · a @ b when ``accumulate``; float32 sums of
    ``promote·bk``-long partial products (see the module's docstring). Needs ``supported``."""
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k or tuple(out.shape) != (m, n):
        raise ValueError(f"promoted_mm: out {tuple(out.shape)} = a {tuple(a.shape)} @ b {tuple(b.shape)} does not fit")
    if not (m and n):
        return
    if not k:  # an empty reduction: a @ b is zero
        if not accumulate:
            out.zero_()
        return
    c, rows = config, _tma_ok(a)
    a_desc = (
        TensorDescriptor.from_tensor(a, [c.bm, c.bk]) if rows else TensorDescriptor.from_tensor(a.t(), [c.bk, c.bm])
    )
    b_desc = TensorDescriptor.from_tensor(b, [c.bk, c.bn])
    c_desc = TensorDescriptor.from_tensor(out, [c.bm, c.bn])
    grid = (triton.cdiv(m, c.bm) * triton.cdiv(n, c.bn),)
    _promoted_mm_kernel[grid](
        a_desc,
        b_desc,
        c_desc,
        m,
        n,
        k,
        alpha,
        A_ROWS=rows,
        ACCUMULATE=accumulate,
        BM=c.bm,
        BN=c.bn,
        BK=c.bk,
        GROUP=c.group,
        PROMOTE=c.promote,
        STAGES=c.stages,
        num_warps=c.warps,
    )
