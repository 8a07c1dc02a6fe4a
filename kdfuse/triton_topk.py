"""Fused chunk step for the built-in sparse (top-k teacher) divergences, with CE, on CUDA.

A top-k teacher makes the per-row loss a function of a few numbers per row, not of the whole
``(C, V)`` student logits x: the student's log-probs at the k ids and its mass outside them
(:func:`kdfuse.topk._reduced_loss`), plus, for the hard CE, the label's logit and the
log-sum-exp at temperature 1. Writing L = log-sum-exp over the *complement* of the real top-k
(the vocabulary minus the teacher's real ids), every quantity the loss reads is a function of

    g = x[ids]  (C, k),   x[label]  (C,),   L_τ = lse_{v ∉ top-k}(τ x_v),   L_1 = lse_{v ∉ top-k}(x_v)

(the full log-sum-exp is logaddexp(L_τ, lse_k(τ g)); log(1 − S) = L_τ − that, exact even when
S → 1). So the step is:

1. gather g and x[label], then overwrite the real top-k positions of x (the chunk's own
   temporary) with −inf, which takes them out of the complement;
2. one read of x (Triton): L_τ and, with CE, L_1, online, one program per row, each kept as
   (max m, log-sum-exp relative to m): every log-prob is then formed as (x − m) − log z, never
   as x − L, which would carry the rounding of a logit-sized L (eps·|x|, ~2e-6 at |x| = 30);
3. the loss of those (C, k)/(C,) numbers and its gradient w.r.t. them via ``torch.func.grad`` of
   the divergence's reduced form (so forward and backward are one function, as everywhere);
4. one read and one write of x (Triton): dL/dx_v = dL/dL_τ · τ e^{τx_v − L_τ} + dL/dL_1 ·
   e^{x_v − L_1} outside the top-k (0 at the −inf positions), plus the label's term when the
   label is not a real top-k id;
5. the top-k positions' gradient (which includes the label's when it is one of them) is scattered
   into those zeros.

Three passes over the student logits in their own dtype and no teacher logits at all, against
the generic path's float32 ``(C, V)`` intermediates. Softcap stays on the generic path (capping
would turn the −inf marks into −cap). Tests compare this with the generic torch.func path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import scalars as S
from .compiled import compile_bound
from .topk import reduced_grads, reduced_parts

__all__ = ["chunk_step"]

# Vocabulary elements per program step and warps: about the device's copy rate
# (tools/kernel_bench.py times the alternatives; docs/design.md has the results).
_BLOCK = 4096
_NUM_WARPS = 4
_INV_T = tl.constexpr(S.INV_T)


@triton.jit
def _online_lse(m, z, x, x_max):
    """Fold the block ``x`` (whose max is ``x_max``) into the running (max, sum of exp(x − max))
    scalars, rescaling once per block: one exp per element."""
    m_new = tl.maximum(m, x_max)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0)
    return m_new, z


@triton.jit
def _complement_lse_kernel(X, STATS, SCALARS, V, stride_x, HAS_CE: tl.constexpr, BLOCK: tl.constexpr):
    """STATS[row] = (max, log Σ e^{· − max}) of τx and, with CE, of x, over the row's finite x."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x
    inv_t = tl.load(SCALARS + _INV_T)
    offs = tl.arange(0, BLOCK)
    m_t = float("-inf")
    z_t = 0.0
    m_1 = float("-inf")
    z_1 = 0.0
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(x_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        x_max = tl.max(x, axis=0)  # max(τx) = τ·max(x) exactly (τ > 0, rounding is monotonic)
        m_t, z_t = _online_lse(m_t, z_t, x * inv_t, x_max * inv_t)
        if HAS_CE:
            m_1, z_1 = _online_lse(m_1, z_1, x, x_max)
    out = STATS + row * 4
    tl.store(out + 0, m_t)
    tl.store(out + 1, tl.log(z_t))
    if HAS_CE:
        tl.store(out + 2, m_1)
        tl.store(out + 3, tl.log(z_1))


@triton.jit
def _shifted_softmax(x, m, log_z):
    """e^{(x − m) − log z}: x − m is exact near the max, so a log-prob never carries the
    rounding of a logit-sized log-sum-exp. An empty complement (m = log z = −inf) gives 0."""
    m = tl.where(m == float("-inf"), 0.0, m)
    log_z = tl.where(log_z == float("-inf"), 0.0, log_z)
    return tl.exp((x - m) - log_z)


@triton.jit
def _complement_grad_kernel(
    X,
    STATS,
    COEF_T,
    COEF_1,
    LABELS,
    COEF_LABEL,
    SCALARS,
    V,
    stride_x,
    HAS_CE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x
    inv_t = tl.load(SCALARS + _INV_T)
    stats = STATS + row * 4
    m_t = tl.load(stats + 0)
    lz_t = tl.load(stats + 1)
    coef_t = tl.load(COEF_T + row) * inv_t
    m_1 = 0.0
    lz_1 = 0.0
    coef_1 = 0.0
    coef_label = 0.0
    label = -1
    if HAS_CE:
        m_1 = tl.load(stats + 2)
        lz_1 = tl.load(stats + 3)
        coef_1 = tl.load(COEF_1 + row)
        coef_label = tl.load(COEF_LABEL + row)
        label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
        x = tl.load(x_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        dx = coef_t * _shifted_softmax(x * inv_t, m_t, lz_t)
        if HAS_CE:
            dx += coef_1 * _shifted_softmax(x, m_1, lz_1) + tl.where(idx == label, coef_label, 0.0)
        tl.store(x_ptr + idx, dx.to(X.dtype.element_ty), mask=mask)


def _complement_stats(student: Tensor, scalars: Tensor, has_ce: bool) -> Tensor:
    """(C, 4) float32: max and log-sum-exp relative to it, of τx then x, over the complement."""
    rows, vocab = student.shape
    stats = torch.zeros(rows, 4, dtype=torch.float32, device=student.device)
    if rows:
        _complement_lse_kernel[(rows,)](
            student,
            stats,
            scalars,
            vocab,
            student.stride(0),
            HAS_CE=has_ce,
            BLOCK=min(_BLOCK, triton.next_power_of_2(vocab)),
            num_warps=_NUM_WARPS,
        )
    return stats


@functools.cache
def _small_fn(reduced: Callable[..., Tensor], has_ce: bool, with_grad: bool, compiled: bool) -> Callable:
    """The (C, k)-sized part, compiled once per configuration, each with its own code object
    (kdfuse.compiled; rows dynamic: marked per call)."""
    return compile_bound(
        reduced_grads if with_grad else reduced_parts, reduced, has_ce, compiled=compiled, name="kdfuse_topk"
    )


def chunk_step(
    reduced: Callable[..., Tensor],  # a built-in top-k divergence's reduced loss (kdfuse.divergences.Builtin)
    has_ce: bool,
    student: Tensor,  # (C, V) raw student logits; overwritten (its masked copy, then dlogits)
    ids: Tensor,  # (C, k) int64
    logprobs: Tensor,  # (C, k)
    labels: Tensor,  # (C,) int64
    valid: Tensor,  # (C,) bool
    row_weight: Tensor | None,  # (C,) float32, or None for the loss only
    scalars: Tensor,  # kdfuse.scalars' layout, float32
    compiled: bool = True,
) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor]]:
    """(dlogits (C, V) written over ``student``, or None; (loss, soft, hard) each (C,) float32)."""
    rows, vocab = student.shape
    if student.stride(-1) != 1:
        student = student.contiguous()
    real = ~torch.isneginf(logprobs)
    gathered = student.gather(1, ids).float()
    label_logit = student.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0].float()
    # Take the real top-k out of the complement. amin with +inf leaves a padding entry's position
    # as it is, even when padding repeats a real id (a plain scatter of both would race).
    marks = torch.where(real, float("-inf"), float("inf")).to(student.dtype)
    student.scatter_reduce_(1, ids, marks, "amin")
    stats = _complement_stats(student, scalars, has_ce)
    args = [gathered, label_logit, stats[:, 1], stats[:, 3], stats, logprobs.float(), real, valid]
    if compiled:
        for t in args:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    small = _small_fn(reduced, has_ce, row_weight is not None, compiled)
    if row_weight is None:
        return None, small(*args, scalars)
    if compiled:
        torch._dynamo.maybe_mark_dynamic(row_weight, 0)
    (d_gathered, d_label, d_lz_t, d_lz_1), parts = small(*args, row_weight, scalars)
    # The label's gradient goes with the top-k's when the label is a real top-k id (its position
    # holds −inf, so the kernel writes 0 there), else the kernel adds it at the label.
    at_label = real & (ids == labels[:, None])
    d_gathered = d_gathered + torch.where(at_label, d_label[:, None], 0)
    d_label = torch.where(at_label.any(-1), 0, d_label)
    if rows:
        _complement_grad_kernel[(rows,)](
            student,
            stats,
            d_lz_t,
            d_lz_1,
            labels,
            d_label,
            scalars,
            vocab,
            student.stride(0),
            HAS_CE=has_ce,
            BLOCK=min(_BLOCK, triton.next_power_of_2(vocab)),
            num_warps=_NUM_WARPS,
        )
    # The real top-k positions hold exactly 0 now, padding entries add exactly 0: order-free.
    student.scatter_add_(1, ids, d_gathered.to(student.dtype))
    return student, parts
