"""A logits GEMM whose epilogue also writes each output tile's per-row log-sum-exp statistics.

Measured by tools/epilogue_probe.py, not used by kdfuse: see docs/benchmarks.md, "Tried and
dropped (2026-11-24)".

The chunk kernel (:mod:`kdfuse.triton_chunk`) spends its first pass over a ``(C, V)`` block on
the row log-sum-exps alone: one read of both logit blocks, 4 of its 10 bytes per element. This
GEMM computes them while the logits are still on chip: for each 128 × 256 output tile it stores,
per row, the tile's max ``m`` of the bf16-rounded logits ``x`` and ``Σ exp((x − m)·τ)`` for one
or two scales τ (the temperature's 1/T, and 1 for the CE), which the chunk kernel would fold
into its log-sum-exps before going straight to the gradient pass.

A plain persistent Triton GEMM cannot hide that epilogue: its exps run between one tile's main
loop and the next (+10% on the student's GEMM, docs/benchmarks.md). Here the work is split
between warps (Gluon's ``warp_specialize``, Hopper): eight warps run the TMA loads and wgmma
main loop and hand each finished tile over in shared memory; four others store it (TMA) and
compute its statistics while the eight are already on the next tile.

Hopper (sm_90) only, bf16/fp16 operands, contiguous, with 16-byte-aligned rows (TMA).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kdfuse.triton_mm import _tile_of as _tile  # a Triton function: Gluon calls it as its own

__all__ = ["logits_with_stats", "BLOCK_N"]  # and _launch, for the probe

BLOCK_M, BLOCK_N, BLOCK_K = 128, 256, 64
_STAGES = 3  # 3 × 48 KiB of operands + the 64 KiB output tile: 208 of the 227 KiB of shared memory
_GROUP = 8  # row tiles that sweep the columns together, so the weight tiles they share stay in L2
_MMA_WARPS, _EPILOGUE_WARPS = 8, 4
_EPILOGUE_REGS = 80  # per thread; the main loop's warps get the rest of maxnreg × 12 warps (208)
_MAXNREG = 168
_SUB_ROWS = 16  # output-tile rows the epilogue loads at a time: 32 values per thread, no spills


@gluon.jit
def _load(j, total, k_tiles, a_desc, b_desc, a_bufs, b_bufs, ready, n_m, n_n,
          GROUP: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """TMA loads of this program's j-th (tile, k) step into stage j % STAGES (none past ``total``)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    pred = j < total
    pid_m, pid_n = _tile(gl.program_id(0) + (j // k_tiles) * gl.num_programs(0), n_m, n_n, GROUP)
    k = (j % k_tiles) * BK
    s = j % STAGES
    bar = ready.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(s), pred)
    tma.async_copy_global_to_shared(b_desc, [pid_n * BN, k], bar, b_bufs.index(s), pred)


@gluon.jit
def _main_loop(a_desc, b_desc, c_smem, a_bufs, b_bufs, ready, c_ready, c_empty, M, N,
               GROUP: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Loads and MMAs of this program's tiles, one flat pipeline across tiles, so the next
    tile's first loads fly while this one's last MMAs run; each tile handed over in ``c_smem``."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(a_desc.shape[1], BK)
    total = gl.cdiv(n_m * n_n - gl.program_id(0), gl.num_programs(0)) * k_tiles
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BN, 16])  # fmt: skip
    for j in gl.static_range(STAGES - 1):
        _load(j, total, k_tiles, a_desc, b_desc, a_bufs, b_bufs, ready, n_m, n_n, GROUP, STAGES)
    acc = gl.zeros((BM, BN), gl.float32, layout)
    j = 0
    # The k loop holds nothing but the MMAs: a branch on the accumulator inside it would make
    # the compiler wait for each MMA before the next (measured 1.34× cuBLAS).
    for t in range(total // k_tiles):
        for kk in range(k_tiles):
            s = j % STAGES
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True)
            # Step j − 1's MMA is done, so its stage takes step j + STAGES − 1's loads.
            acc = warpgroup_mma_wait(1, deps=(acc,))
            _load(j + STAGES - 1, total, k_tiles, a_desc, b_desc, a_bufs, b_bufs, ready, n_m, n_n, GROUP, STAGES)
            j += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.wait(c_empty, (t & 1) ^ 1)  # the epilogue is done with the last tile
        c_smem.store(acc.to(c_smem.dtype))
        fence_async_shared()  # order the stores before the epilogue's TMA store reads them
        mbarrier.arrive(c_ready, count=1)


@gluon.jit
def _epilogue(c_desc, c_smem, c_ready, c_empty, stats, scale_ptr, M, N,
              GROUP: gl.constexpr, NSTAT: gl.constexpr, SUB: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
    """Store each handed-over tile and its per-row (max, Σ exp((x − max)·τ) for each scale τ)
    into ``stats`` (M, n_n, 1 + NSTAT): τ = *scale_ptr, and τ = 1 as the second when NSTAT = 2."""
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(N, BN)
    tiles = gl.cdiv(n_m * n_n - gl.program_id(0), gl.num_programs(0))
    scale = gl.load(scale_ptr) * 1.4426950408889634  # exp(y) = exp2(y · log2 e)
    for i in range(tiles):
        pid_m, pid_n = _tile(gl.program_id(0) + i * gl.num_programs(0), n_m, n_n, GROUP)
        mbarrier.wait(c_ready, i & 1)
        tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN], c_smem)
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        for r in gl.static_range(BM // SUB if NSTAT > 0 else 0):
            x = c_smem.slice(r * SUB, SUB).load(layout).to(gl.float32)
            x = gl.where(cols[None, :] < N, x, float("-inf"))
            m = gl.max(x, axis=1)
            d = x - m[:, None]
            rows = pid_m * BM + r * SUB + gl.arange(0, SUB, layout=gl.SliceLayout(1, layout))
            ok = rows < M
            base = stats + (rows.to(gl.int64) * n_n + pid_n) * (1 + NSTAT - NSTAT // 3)
            gl.store(base, m, mask=ok)
            if NSTAT <= 2:
                gl.store(base + 1, gl.sum(gl.exp2(d * scale), axis=1), mask=ok)
            if NSTAT == 2:
                gl.store(base + 2, gl.sum(gl.exp2(d * 1.4426950408889634), axis=1), mask=ok)
            if NSTAT == 3:  # the same at τ = 1 when the first τ is 1/2: exp(d) = exp(d/2)², one exp fewer
                e = gl.exp2(d * scale)
                gl.store(base + 1, gl.sum(e, axis=1), mask=ok)
                gl.store(base + 2, gl.sum(e * e, axis=1), mask=ok)
        tma.store_wait(0)  # the TMA store has read c_smem
        mbarrier.arrive(c_empty, count=1)


@gluon.jit
def _logits_stats_kernel(a_desc, b_desc, c_desc, stats, scale_ptr, M, N,
                         NSTAT: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr,
                         SUB: gl.constexpr, EPILOGUE_WARPS: gl.constexpr, EPILOGUE_REGS: gl.constexpr,
                         num_warps: gl.constexpr):  # fmt: skip
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    c_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    c_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(c_ready, count=1)
    mbarrier.init(c_empty, count=1)
    gl.warp_specialize(
        [
            (_main_loop, (a_desc, b_desc, c_smem, a_bufs, b_bufs, ready, c_ready, c_empty, M, N, GROUP, STAGES, num_warps)),
            (_epilogue, (c_desc, c_smem, c_ready, c_empty, stats, scale_ptr, M, N, GROUP, NSTAT, SUB, EPILOGUE_WARPS)),
        ],
        [EPILOGUE_WARPS],
        [EPILOGUE_REGS],
    )


def _descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def logits_with_stats(
    hidden: Tensor,  # (M, K) bf16/fp16
    weight: Tensor,  # (N, K) same dtype
    scale: Tensor,  # (1,) float32 on the device: τ of the first statistic (> 0)
    with_unit_scale: bool,  # also the statistic at τ = 1
) -> tuple[Tensor, Tensor]:
    """(logits (M, N) = hidden @ weightᵀ in the operands' dtype, stats (M, ⌈N/BLOCK_N⌉, 1 + n)).

    ``stats[r, j]`` = (m, Σ exp((x − m)·τ) for τ in (scale, [1])) over the row's logits x of column
    tile j, as rounded to the output dtype, with m their max.
    """
    return _launch(hidden, weight, scale, 2 if with_unit_scale else 1)


def _launch(hidden: Tensor, weight: Tensor, scale: Tensor, nstat: int) -> tuple[Tensor, Tensor]:
    """:func:`logits_with_stats` with ``nstat`` statistics: 0 the GEMM alone (to time the
    epilogue's cost), 3 the two of ``nstat = 2`` with one exp per element (τ = 1/2 only)."""
    m, _ = hidden.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=hidden.device, dtype=hidden.dtype)
    n_tiles_n = triton.cdiv(n, BLOCK_N)
    stats = torch.empty(m, n_tiles_n, 1 + min(nstat, 2), device=hidden.device, dtype=torch.float32)
    if m == 0:
        return out, stats
    tiles = triton.cdiv(m, BLOCK_M) * n_tiles_n
    programs = min(torch.cuda.get_device_properties(hidden.device).multi_processor_count, tiles)
    _logits_stats_kernel[(programs,)](
        _descriptor(hidden, [BLOCK_M, BLOCK_K]), _descriptor(weight, [BLOCK_N, BLOCK_K]),
        _descriptor(out, [BLOCK_M, BLOCK_N]), stats, scale, m, n,
        NSTAT=nstat, GROUP=_GROUP, STAGES=_STAGES, SUB=_SUB_ROWS, EPILOGUE_WARPS=_EPILOGUE_WARPS,
        EPILOGUE_REGS=_EPILOGUE_REGS, num_warps=_MMA_WARPS, maxnreg=_MAXNREG,
    )  # fmt: skip
    return out, stats
