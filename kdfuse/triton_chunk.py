"""Hand-written Triton kernel for one chunk of the built-in divergences, with CE and softcap.

The generic path (``torch.func.grad`` of the pure divergence, compiled by Inductor) is right for
any divergence but makes several passes over the ``(C, V)`` logits with float32 intermediates.
For the built-ins whose logit gradient has a closed form in a few per-row statistics this kernel
does the least work a row needs, one program per row, looping over the vocabulary:

* pass 1 reads the student and teacher logits once for the online log-sum-exps (temperature-
  scaled student and teacher, and the student at temperature 1 for the CE) and the label's logit;
* pass 2 reads them again, back to front (the blocks pass 1 read last may still be in L2), for
  the divergence value and, for ``forward_kl``/``soft_ce``, writes the logit gradient in the same
  loop;
* ``reverse_kl``/``jsd`` need the row's divergence inside their gradient, so a pass 3 writes it.

The loops are software-pipelined (``tl.range(num_stages=...)``): the next blocks' loads are in
flight while a block's reductions wait on each other.

So 2 reads of both logit tensors plus one write of the gradient (3 reads for reverse KL / JSD),
all in the logits' own dtype, against ~6 float32 passes for the generic path. The math is the
divergences module's, term by term (same ``LOGPROB_FLOOR`` clamps), so values agree with the
generic path to float32 rounding; tests check values and gradients against it.

Closed forms, with s, t the temperature-scaled logits, p = softmax, F the floor, w the row
weight, τ = 1/T, a the (capped) student logits at T = 1:

    forward_kl, soft_ce   dD/ds = p_s − p_t
    reverse_kl            dD/ds = p_s ⊙ (max(log p_s, F) − max(log p_t, F) − KL(P_s‖P_t))
    jsd(β), 0 < β < 1     dD/ds = (1−β) p_s ⊙ (max(log p_s, F) − max(log m, F) − KL(P_s‖M))
    dL/da = sw·τ·dD/ds + hw·(softmax(a) − onehot(label));  dL/dx = dL/da ⊙ (1 − (a/cap)²) with softcap
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import divergences as D

__all__ = ["supported", "chunk_step"]

_FORWARD_KL, _SOFT_CE, _REVERSE_KL, _JSD = 0, 1, 2, 3
_KERNEL_IDS = {
    D._forward_kl: _FORWARD_KL,
    D._soft_ce: _SOFT_CE,
    D._reverse_kl: _REVERSE_KL,
    D._jsd_mixture: _JSD,
}
# tools/kernel_bench.py on an H100, 4096 x 128256 bf16 logits, + CE (ms; BLOCK/warps/stages):
# forward KL 2.12 (1024/4/3), 2.23 (1024/4/2), 2.31 (1024/4/1), 2.24 (2048/4/3), 2.39 (2048/4/1);
# JSD        3.86 (1024/4/2), 4.02 (1024/4/3), 3.89 (1024/4/1), 3.95 (2048/4/1), 5.43 (2048/4/3).
# (Before pipelining and the back-to-front pass 2: 2.40 and 3.98 ms at 2048/4.)
_BLOCK = 1024
_NUM_WARPS = 4
_STAGES = {D._forward_kl: 3, D._soft_ce: 3, D._reverse_kl: 2, D._jsd_mixture: 2}


def supported(kernel, compute_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`chunk_step` implements this divergence kernel here."""
    return kernel in _KERNEL_IDS and compute_dtype == torch.float32 and device.type == "cuda"


@triton.jit
def _online_lse(m, z, x, x_max):
    """Fold the block ``x`` (whose max is ``x_max``) into the running (max, sum of exp(x − max))
    scalars.

    Rescaling once per block (not per lane and element) keeps this at one exp per element: the
    kernel is otherwise limited by the special-function unit. The caller passes the max so that a
    block shared by two log-sum-exps (x at T and at 1) is reduced once. (Per-lane sums, one
    reduction per block fewer, measured no faster on an H100 and need more registers; per-lane
    maxes too, with no reduction until the row's end and still one exp per element, exp(−|x − m|),
    measured slower: 2.21 vs 2.14 ms forward KL, 4.33 vs 3.86 JSD, docs/benchmarks.md.)
    """
    m_new = tl.maximum(m, x_max)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0)
    return m_new, z


@triton.jit
def _lse_finish(m, z):
    """log Σ exp from :func:`_online_lse`'s (max, sum), as (m, log z) with m finite:
    a log-prob is then formed as (x − m) − log z, exact near the max, never as x − lse, which
    carries the rounding of a logit-sized lse (eps·|x|: ~2e-6 at |x| = 30)."""
    return tl.where(m == float("-inf"), 0.0, m), tl.log(z)


@triton.jit
def _cap(x, cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        x = cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)  # cap * tanh(x / cap)
    return x


@triton.jit
def _scaled_logprobs(s_ptr, t_ptr, idx, mask, cap, inv_t, m_s, lz_s, m_t, lz_t, SOFTCAP: tl.constexpr):
    """One block: (capped student logits a, student log-probs ls, teacher log-probs lt) at T."""
    a = _cap(tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
    b = _cap(tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32), cap, SOFTCAP)
    b = tl.where(mask, b, float("-inf"))
    return a, (a * inv_t - m_s) - lz_s, (b * inv_t - m_t) - lz_t


@triton.jit
def _log_mix(lt, ls, log_beta, log_1m_beta):
    """log(β·p_t + (1−β)·p_s), a two-term log-sum-exp."""
    hi = tl.maximum(log_beta + lt, log_1m_beta + ls)
    lo = tl.minimum(log_beta + lt, log_1m_beta + ls)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def _store_grad(dx_ptr, idx, mask, g, a, m_a, lz_a, label, w, soft_w, hard_w, inv_t, cap,
                HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """Chain dD/ds (``g``) with the CE and softcap terms and store w·dL/dx."""
    da = soft_w * inv_t * g
    if HAS_CE:
        da += hard_w * (tl.exp((a - m_a) - lz_a) - tl.where(idx == label, 1.0, 0.0))
    if SOFTCAP:
        r = a / cap
        da = da * (1.0 - r * r)
    # An ignored row (w = 0) may hold garbage, e.g. an all -inf teacher row: 0 · nan is nan.
    tl.store(dx_ptr + idx, tl.where(w != 0, da * w, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kd_chunk_kernel(
    S, T, DX, LABELS, VALID, ROW_W, LOSS, SOFT, HARD, SCALARS,
    V, stride_s, stride_t, stride_dx, ignore_index,
    DIV: tl.constexpr, HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    t_ptr = T + row * stride_t
    inv_t = tl.load(SCALARS + 0)
    soft_w = tl.load(SCALARS + 1)
    hard_w = tl.load(SCALARS + 2)
    cap = tl.load(SCALARS + 3)
    FLOOR: tl.constexpr = -1.0e4
    ninf = float("-inf")
    offs = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(V, BLOCK)

    label = tl.load(LABELS + row)
    valid = tl.load(VALID + row) != 0

    # Pass 1: online log-sum-exp of s = cap(x)·τ, t = cap(y)·τ and (for CE) a = cap(x).
    m_s = ninf
    z_s = 0.0
    m_t = ninf
    z_t = 0.0
    m_a = ninf
    z_a = 0.0
    picked = tl.zeros([BLOCK], tl.float32)
    # The loops are software-pipelined (STAGES): the loads of the next blocks are in flight while
    # this block's reductions wait on each other.
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):
        idx = start + offs
        mask = idx < V
        a = _cap(tl.load(s_ptr + idx, mask=mask, other=ninf).to(tl.float32), cap, SOFTCAP)
        b = _cap(tl.load(t_ptr + idx, mask=mask, other=ninf).to(tl.float32), cap, SOFTCAP)
        a = tl.where(mask, a, ninf)
        b = tl.where(mask, b, ninf)
        # max(τ·a) = τ·max(a) exactly (τ > 0, rounding is monotonic): one reduction serves both.
        a_max = tl.max(a, axis=0)
        m_s, z_s = _online_lse(m_s, z_s, a * inv_t, a_max * inv_t)
        m_t, z_t = _online_lse(m_t, z_t, b * inv_t, tl.max(b, axis=0) * inv_t)
        if HAS_CE:
            m_a, z_a = _online_lse(m_a, z_a, a, a_max)
            picked += tl.where(idx == label, a, 0.0)
    m_s, lz_s = _lse_finish(m_s, z_s)
    m_t, lz_t = _lse_finish(m_t, z_t)
    hard = 0.0
    lz_a = 0.0
    if HAS_CE:
        m_a, lz_a = _lse_finish(m_a, z_a)
        hard = tl.where(valid & (label != ignore_index), (m_a - tl.sum(picked, axis=0)) + lz_a, 0.0)

    if DIV == 3:
        # (β, 1 − β, log β, log(1 − β)), each computed in float64 (see divergences._mixing).
        beta = tl.load(SCALARS + 4)
        one_m_beta = tl.load(SCALARS + 5)
        log_beta = tl.load(SCALARS + 6)
        log_1m_beta = tl.load(SCALARS + 7)
    else:
        beta = 0.0
        one_m_beta = 0.0
        log_beta = 0.0
        log_1m_beta = 0.0

    # Pass 2: the divergence's value (and, when the gradient needs no row value, the gradient).
    acc_a = tl.zeros([BLOCK], tl.float32)  # the divergence, or KL(P_t‖M) for JSD
    acc_b = tl.zeros([BLOCK], tl.float32)  # KL(P_s‖M) for JSD
    w = 0.0
    if WITH_GRAD:
        w = tl.load(ROW_W + row).to(tl.float32)
    dx_ptr = DX + row * stride_dx
    for i in tl.range(0, n_blocks, num_stages=STAGES):
        # Back to front: the blocks pass 1 read last are the likeliest to be still in L2.
        idx = (n_blocks - 1 - i) * BLOCK + offs
        mask = idx < V
        a, ls, lt = _scaled_logprobs(s_ptr, t_ptr, idx, mask, cap, inv_t, m_s, lz_s, m_t, lz_t, SOFTCAP)
        ps = tl.where(mask, tl.exp(ls), 0.0)
        pt = tl.exp(lt)
        ls_c = tl.maximum(ls, FLOOR)
        lt_c = tl.maximum(lt, FLOOR)
        if DIV == 0:
            acc_a += tl.where(pt > 0, pt * (lt_c - ls_c), 0.0)
        elif DIV == 1:
            acc_a += tl.where(pt > 0, -pt * ls_c, 0.0)
        elif DIV == 2:
            acc_a += tl.where(ps > 0, ps * (ls_c - lt_c), 0.0)
        else:
            lm_c = tl.maximum(_log_mix(lt, ls, log_beta, log_1m_beta), FLOOR)
            acc_a += tl.where(pt > 0, pt * (lt_c - lm_c), 0.0)
            acc_b += tl.where(ps > 0, ps * (ls_c - lm_c), 0.0)
        if WITH_GRAD:
            if DIV <= 1:
                _store_grad(dx_ptr, idx, mask, ps - pt, a, m_a, lz_a, label, w, soft_w, hard_w, inv_t, cap, HAS_CE, SOFTCAP)
    kl_a = tl.sum(acc_a, axis=0)
    kl_b = tl.sum(acc_b, axis=0)
    if DIV == 3:
        soft = beta * kl_a + one_m_beta * kl_b
    else:
        soft = kl_a
    soft = tl.where(valid, soft, 0.0)
    tl.store(SOFT + row, soft)
    tl.store(HARD + row, hard)
    tl.store(LOSS + row, soft_w * soft + hard_w * hard)

    # Pass 3 (reverse KL, JSD): the gradient, which needs the row's KL.
    if WITH_GRAD:
        if DIV >= 2:
            for start in tl.range(0, V, BLOCK, num_stages=STAGES):  # front to back, likewise
                idx = start + offs
                mask = idx < V
                a, ls, lt = _scaled_logprobs(s_ptr, t_ptr, idx, mask, cap, inv_t, m_s, lz_s, m_t, lz_t, SOFTCAP)
                ps = tl.exp(ls)
                ls_c = tl.maximum(ls, FLOOR)
                if DIV == 2:
                    g = ps * (ls_c - tl.maximum(lt, FLOOR) - kl_a)
                else:
                    lm_c = tl.maximum(_log_mix(lt, ls, log_beta, log_1m_beta), FLOOR)
                    g = one_m_beta * ps * (ls_c - lm_c - kl_b)
                _store_grad(dx_ptr, idx, mask, g, a, m_a, lz_a, label, w, soft_w, hard_w, inv_t, cap, HAS_CE, SOFTCAP)


def chunk_step(
    kernel,
    has_ce: bool,
    softcap: bool,
    ignore_index: int,
    student: Tensor,  # (C, V) raw student logits
    teacher: Tensor,  # (C, V) raw teacher logits
    labels: Tensor,  # (C,) int64
    valid: Tensor,  # (C,) bool
    row_weight: Tensor | None,  # (C,) float32, or None for the loss only
    scalars: Tensor,  # (4 + n_params,) float32: 1/T, soft_w, hard_w, cap, params...
    out: Tensor | None = None,  # (C, V) where to write dlogits; may be ``student`` itself
) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor]]:
    """(dlogits (C, V) in ``student``'s dtype or None, (loss, soft, hard) each (C,) float32).

    ``out=student`` is safe: each program reads an element of its row before it writes that
    element's gradient, and the pass that writes is the last to read.
    """
    rows, vocab = student.shape
    if student.stride(-1) != 1:
        student = student.contiguous()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    loss, soft, hard = (torch.empty(rows, dtype=torch.float32, device=student.device) for _ in range(3))
    with_grad = row_weight is not None
    dx = (torch.empty_like(student) if out is None else out) if with_grad else None
    if rows:
        _kd_chunk_kernel[(rows,)](
            student, teacher, dx if with_grad else student, labels, valid,
            row_weight if with_grad else scalars, loss, soft, hard, scalars,
            vocab, student.stride(0), teacher.stride(0), dx.stride(0) if with_grad else 0, ignore_index,
            DIV=_KERNEL_IDS[kernel], HAS_CE=has_ce, SOFTCAP=softcap, WITH_GRAD=with_grad,
            BLOCK=min(_BLOCK, triton.next_power_of_2(vocab)), STAGES=_STAGES[kernel], num_warps=_NUM_WARPS,
        )  # fmt: skip
    return dx, (loss, soft, hard)
