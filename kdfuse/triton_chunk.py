"""Hand-written Triton kernel for one chunk of the built-in divergences, with CE and softcap.

The generic path (``torch.func.grad`` of the pure divergence, compiled by Inductor) is right for
any divergence but makes several passes over the ``(C, V)`` logits with float32 intermediates.
For the built-ins whose logit gradient has a closed form in a few per-row statistics this kernel
does the least work a row needs, one program per row, looping over the vocabulary:

* pass 1 reads the student and teacher logits once for the log-sum-exps (temperature-scaled
  student and teacher, and the student at temperature 1 for the CE), summed relative to a fixed
  shift per row (the first block's maximum or the label's logit), with no block-wide maximum
  per block; a row whose maximum lies too far above that shift is read once more with running
  maxima (see ``_sweep1``);
* pass 2 reads them again, back to front (the blocks pass 1 read last may still be in L2), for
  the divergence value and, for ``forward_kl``/``soft_ce``, writes the logit gradient in the same
  loop;
* ``reverse_kl``/``jsd`` need the row's divergence inside their gradient, so a pass 3 writes it;
* the label's element is written once more, with the CE's one-hot (its logits read up front).

The loops are software-pipelined (``tl.range(num_stages=...)``): the next blocks' loads are in
flight while a block computes. The kernel issues instructions about as fast as it moves bytes
(docs/design.md, "Instruction diet of the chunk kernel"), so the loops carry as few per element as
they can: base-2 exponents with the scales folded into one FMA, per-lane log-sum-exp sums instead
of a block reduction per block, no bound checks but on the row's last block, no one-hot compare
(the label's element is rewritten after the loop).

So 2 reads of both logit tensors plus one write of the gradient (3 reads for reverse KL / JSD),
all in the logits' own dtype, against ~6 float32 passes for the generic path. The math is the
divergences module's, term by term (same ``LOGPROB_FLOOR`` clamps; the JSD mixture's log is taken
of β·p_t + (1−β)·p_s rather than as a log-sum-exp, see ``_log_mix``), so values agree with the
generic path to float32 rounding; tests check values and gradients against it.

Closed forms, with s, t the temperature-scaled logits, p = softmax, F the floor, w the row
weight, τ = 1/T, a the (capped) student logits at T = 1:

    forward_kl, soft_ce   dD/ds = p_s − p_t
    reverse_kl            dD/ds = p_s ⊙ (max(log p_s, F) − max(log p_t, F) − KL(P_s‖P_t))
    jsd(β), 0 < β < 1     dD/ds = (1−β) p_s ⊙ (max(log p_s, F) − max(log m, F) − KL(P_s‖M))
    dL/da = sw·τ·dD/ds + hw·(softmax(a) − onehot(label));  dL/dx = dL/da ⊙ (1 − (a/cap_s)²) with softcap

Each model's logits have a softcap of their own (``cap_s``, ``cap_t``), and with ENTROPY pass 2
also sums the student's entropy at T, −Σ p_s ln p_s (one more FMA per element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import libdevice

from . import scalars as S
from .divergences import LOGPROB_FLOOR

__all__ = ["KERNELS", "ce_power", "chunk_step"]

# The kernels by their registry names (kdfuse.divergences.Builtin.kernel): the DIV constexpr.
KERNELS = {"forward_kl": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3}
# Blocks of the vocabulary per program step, warps and pipeline stages (tools/kernel_bench.py
# times the alternatives; docs/design.md has the results). Reverse KL and JSD carry more per
# element, so fewer loads in flight.
_BLOCK = 1024
_NUM_WARPS = 4
_STAGES = {"forward_kl": 3, "soft_ce": 3, "reverse_kl": 2, "jsd": 2}
# The scalars' slots (kdfuse.scalars), as the kernel reads them.
_INV_T, _SOFT_W, _HARD_W, _S_CAP, _T_CAP, _PARAMS = (
    tl.constexpr(i) for i in (S.INV_T, S.SOFT_W, S.HARD_W, S.S_CAP, S.T_CAP, S.PARAMS)
)


def ce_power(temperature: float) -> int:
    """``chunk_step``'s ``ce_power`` for this temperature: T itself at T = 1 or 2, else 0."""
    return {1.0: 1, 2.0: 2}.get(temperature, 0)


# Base-2 arithmetic: exp2 is the special-function unit's own instruction (exp is exp2 after a
# multiply by log2 e), so the kernel's log-probs, log-sum-exps and KL sums are in bits, and the
# temperature's 1/T is folded with log2 e into one multiplier per row. Values are turned into
# nats once per row.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# divergences.LOGPROB_FLOOR in bits: max(log p, F) = ln 2 · max(log2 p, F · log2 e).
_FLOOR2 = tl.constexpr(LOGPROB_FLOOR * 1.4426950408889634)


# tl.log2 compiles to a software log2 of ~20 instructions per element (exponent split,
# polynomial, subnormal fix-up); the special-function unit's lg2.approx is one, with an absolute
# error of ~2^-22 (bits) and subnormal inputs flushed to 0. Triton's interpreter (the CPU tests)
# has no libdevice: there it is tl.log2.
_PTX = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _log2(x):
    if _PTX:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _exp2(x):
    """2^x by the special-function unit with subnormal results flushed to 0 (``ex2.approx.ftz``).
    ``tl.exp2`` is ``ex2.approx.f32``, which keeps subnormals at the price of a range test and two
    predicated multiplies around each MUFU.EX2 (SASS, sm_90). The values lost are below 2^-126:
    probabilities whose terms p·(log p − F) are below 1e-34 and whose gradients no bf16 logit
    gradient can hold next to a row's others. The interpreter has no inline PTX: tl.exp2 there."""
    if _PTX:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _shift(m, scale):
    """The exponent offset m·scale of a running max m (0 while m is −inf)."""
    return tl.where(m == float("-inf"), 0.0, m * scale)


@triton.jit
def _rescale(m_old, m_new, scale):
    """2^(shift(m_old) − shift(m_new)): moves a running sum of :func:`_terms` to a new max."""
    return tl.where(m_old == float("-inf"), 0.0, _exp2(_shift(m_old, scale) - _shift(m_new, scale)))


@triton.jit
def _terms(x, m, scale):
    """2^(x·scale − shift(m)): one FMA and one exp2 per element.

    A running base-2 log-sum-exp of x·scale is kept per lane as z = Σ terms(x, m) over the blocks
    so far, m their running max, and folded as z·rescale + terms: one more FMA per element (the
    rescale is a scalar). Per-lane sums, added up once per row, spare a block-wide reduction per
    block (the kernel is nearly issue-bound, so each instruction counts: docs/design.md)."""
    return _exp2(x * scale - _shift(m, scale))


@triton.jit
def _finish(z, m, scale):
    """(shift(m), log2 Σ z) of a running sum of :func:`_terms`. A log-prob (in bits) is then formed as
    (x·scale − shift) − log2 z, exact near the max, never as x·scale − lse, which carries the
    rounding of a logit-sized lse (eps·|x|: ~2e-6 at |x| = 30)."""
    return _shift(m, scale), tl.log2(tl.sum(z, axis=0))


@triton.jit
def _cap(x, cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        x = cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)  # cap * tanh(x / cap)
    return x


@triton.jit
def _load(ptr, idx, mask, other, cap, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """A block of (capped) logits in float32. Only the row's last block is MASKED: its lanes
    past the row's end hold ``other``; full blocks load without a per-element bound check."""
    if MASKED:
        x = _cap(tl.load(ptr + idx, mask=mask, other=other).to(tl.float32), cap, SOFTCAP)
        if SOFTCAP:  # cap(other) is not other
            x = tl.where(mask, x, other)
    else:
        x = _cap(tl.load(ptr + idx).to(tl.float32), cap, SOFTCAP)
    return x


@triton.jit
def _pass1(
    s_ptr,
    t_ptr,
    idx,
    mask,
    cap_s,
    cap_t,
    tau2,
    m_s,
    z_s,
    z_a,
    m_t,
    z_t,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    ONLINE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of pass 1: the running log-sum-exps of the student at T (z_s) and 1 (z_a), which
    share the student's shift m_s, and of the teacher at T (z_t, shift m_t).

    ONLINE keeps m_s, m_t the running maxima and rescales the sums when they grow (two block-wide
    max reductions, each with its barriers); otherwise m_s, m_t are fixed shifts and the terms are
    only added (see :func:`_sweep1`).

    At T = CE_POW the CE's terms are the soft ones' powers (see :func:`_ce_probs`): at T = 1 z_a
    is z_s and is not kept; at T = 2 its terms are the squares of z_s's, and so is its rescale,
    because shift(m, log2 e) = 2·shift(m, log2 e / 2) exactly (a power-of-two scale): a multiply
    where an FMA and an exp2 were."""
    a = _load(s_ptr, idx, mask, float("-inf"), cap_s, S_SOFTCAP, MASKED)
    b = _load(t_ptr, idx, mask, float("-inf"), cap_t, T_SOFTCAP, MASKED)
    if ONLINE:
        m_s_new = tl.maximum(m_s, tl.max(a, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(b, axis=0))
        r_s = _rescale(m_s, m_s_new, tau2)
        z_s = z_s * r_s
        z_t = z_t * _rescale(m_t, m_t_new, tau2)
        if CE_POW == 2:
            z_a = z_a * (r_s * r_s)
        elif CE_POW == 0:
            z_a = z_a * _rescale(m_s, m_s_new, _LOG2E)
    else:
        m_s_new = m_s
        m_t_new = m_t
    e_s = _terms(a, m_s_new, tau2)
    z_s += e_s
    if HAS_CE:
        if CE_POW == 2:
            z_a += e_s * e_s
        elif CE_POW == 0:
            z_a += _terms(a, m_s_new, _LOG2E)
    z_t += _terms(b, m_t_new, tau2)
    return m_s_new, z_s, z_a, m_t_new, z_t


@triton.jit
def _sweep1(
    s_ptr,
    t_ptr,
    V,
    cap_s,
    cap_t,
    tau2,
    m_s,
    m_t,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    ONLINE: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Pass 1 over a row: (m_s, z_s, z_a, m_t, z_t), per-lane sums of :func:`_terms` of the
    student at T and 1 and of the teacher at T, each relative to its shift m (see :func:`_pass1`).

    Both forms give the same log-sum-exps; they differ in the shift. The running maximum (ONLINE)
    costs a block-wide max and its barriers per block. A fixed shift at or below the row's
    maximum costs nothing per block: the sums then hold terms up to 2^((max − m)·scale), which the
    caller accepts while they stay below 2^FIXED_SHIFT_BITS (see :func:`_fixed_shift_fits`) and
    otherwise runs the ONLINE form."""
    offs = tl.arange(0, BLOCK)
    n_full = V // BLOCK
    tail = n_full * BLOCK + offs
    z_s = tl.zeros([BLOCK], tl.float32)
    z_a = tl.zeros([BLOCK], tl.float32)
    z_t = tl.zeros([BLOCK], tl.float32)
    # Software-pipelined (STAGES): the next blocks' loads are in flight while this one computes.
    for i in tl.range(0, n_full, num_stages=STAGES):
        m_s, z_s, z_a, m_t, z_t = _pass1(
            s_ptr,
            t_ptr,
            i * BLOCK + offs,
            None,
            cap_s,
            cap_t,
            tau2,
            m_s,
            z_s,
            z_a,
            m_t,
            z_t,
            HAS_CE,
            CE_POW,
            S_SOFTCAP,
            T_SOFTCAP,
            ONLINE,
            False,
        )
    if n_full * BLOCK < V:
        m_s, z_s, z_a, m_t, z_t = _pass1(
            s_ptr,
            t_ptr,
            tail,
            tail < V,
            cap_s,
            cap_t,
            tau2,
            m_s,
            z_s,
            z_a,
            m_t,
            z_t,
            HAS_CE,
            CE_POW,
            S_SOFTCAP,
            T_SOFTCAP,
            ONLINE,
            True,
        )
    return m_s, z_s, z_a, m_t, z_t


# A fixed shift's sums (the CE's at temperature 1 included) are accepted below 2^FIXED_SHIFT_BITS:
# a row's log2-sum then stays below 64 bits, so the log-probs formed from it,
# (x·scale − shift) − log2 z, carry at most ~4e-6 bits of its rounding (the running max keeps
# log2 z below log2 V, ~1e-6 bits).
_FIXED_SHIFT_BITS = tl.constexpr(64.0)


@triton.jit
def _fixed_shift_fits(m_s, z_s, z_a, m_t, z_t, HAS_CE: tl.constexpr, CE_POW: tl.constexpr):
    """Whether a fixed shift's sums are usable: finite shifts (a −inf shift means the first block
    and the label were all −inf; a nan or inf logit makes a nan sum, which fails the compares) and
    sums below 2^_FIXED_SHIFT_BITS (each is ≥ 1: the shift is one of the row's logits)."""
    limit = tl.exp2(_FIXED_SHIFT_BITS)
    ok = (m_s > float("-inf")) & (m_t > float("-inf")) & (m_s < float("inf")) & (m_t < float("inf"))
    ok = ok & (tl.sum(z_s, axis=0) < limit) & (tl.sum(z_t, axis=0) < limit)
    if HAS_CE:
        if CE_POW != 1:
            ok = ok & (tl.sum(z_a, axis=0) < limit)
    return ok


@triton.jit
def _logprobs(
    s_ptr,
    t_ptr,
    idx,
    mask,
    cap_s,
    cap_t,
    tau2,
    c_s,
    lz_s,
    c_t,
    lz_t,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block: (capped student logits a (0 past the row's end), student and teacher log-probs
    at T in bits)."""
    a = _load(s_ptr, idx, mask, 0.0, cap_s, S_SOFTCAP, MASKED)
    b = _load(t_ptr, idx, mask, float("-inf"), cap_t, T_SOFTCAP, MASKED)
    return a, (a * tau2 - c_s) - lz_s, (b * tau2 - c_t) - lz_t


@triton.jit
def _log_mix(pt, ps, beta, one_m_beta):
    """log2(β·p_t + (1−β)·p_s), in bits, from the probabilities the pass has already formed: one
    special-function log2 per element, where the two-term log-sum-exp of the log-probs took an
    exp2, a software log2 and six more instructions (JSD passes 2 and 3 issue half as many). Within
    ~2^-22 bits of the log-sum-exp's value wherever the mixture is a normal float; where it
    underflows (β·p_t and (1−β)·p_s both below 2^-126) its log is −inf, floored like any other,
    and the terms it enters are p·(log p − floor) with p < 2^-126 / min(β, 1−β): each below
    1.2e-14 (nats) for β in [1e-20, 1 − 1e-20], below 3e-34 at β = 0.5."""
    return _log2(beta * pt + one_m_beta * ps)


@triton.jit
def _grad_ds(ls, lt, ps, pt, kl, beta, one_m_beta, DIV: tl.constexpr):
    """dD/ds, up to the row factor :func:`_kd_chunk_kernel` puts in ``c_soft`` (ln 2 for reverse
    KL, (1 − β)·ln 2 for JSD: their log terms are in bits here, as is ``kl``)."""
    if DIV <= 1:
        g = ps - pt
    elif DIV == 2:
        g = ps * (tl.maximum(ls, _FLOOR2) - tl.maximum(lt, _FLOOR2) - kl)
    else:
        g = ps * (tl.maximum(ls, _FLOOR2) - tl.maximum(_log_mix(pt, ps, beta, one_m_beta), _FLOOR2) - kl)
    return g


@triton.jit
def _ce_probs(a, ps, c_a, lz_a, CE_POW: tl.constexpr):
    """softmax(a), the CE's probabilities, up to the row factor k_a (see :func:`_kd_chunk_kernel`).

    At T = CE_POW they are a power of p_s = softmax(a·τ), which the pass has formed:
    softmax(a) = p_s^k · z_s^k / z_a, so k_a = 2^(k·lz_s − lz_a): p_s itself at T = 1, a multiply
    at T = 2, where otherwise an FMA, an add and an exp2 make them (CE_POW = 0, k_a = 1). The
    square doubles p_s's relative error (2^-21) and flushes probabilities below ~2^-126·k_a
    (k_a ≤ V), whose share of a bf16 logit gradient is nil."""
    if CE_POW == 1:
        pa = ps
    elif CE_POW == 2:
        pa = ps * ps
    else:
        pa = _exp2((a * _LOG2E - c_a) - lz_a)
    return pa


@triton.jit
def _dlogit(
    g,
    a,
    ps,
    c_a,
    lz_a,
    c_soft,
    c_hard,
    c_pa,
    cap,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    LABEL: tl.constexpr,
):
    """w·dL/dx: c_soft·g + c_hard·(softmax(a) − onehot), onehot 1 at the LABEL's element only,
    chained through the softcap (the row weight w is in c_soft = w·soft_w·τ·(factor),
    c_hard = w·hard_w and c_pa = c_hard·k_a)."""
    da = c_soft * g
    if HAS_CE:
        da += c_pa * _ce_probs(a, ps, c_a, lz_a, CE_POW)
        if LABEL:
            da -= c_hard
    if SOFTCAP:
        r = a / cap
        da = da * (1.0 - r * r)
    return da


@triton.jit
def _store(dx_ptr, idx, mask, da, w, MASKED: tl.constexpr):
    # An ignored row (w = 0) may hold garbage, e.g. an all -inf teacher row: 0 · nan is nan.
    da = tl.where(w != 0, da, 0.0).to(dx_ptr.dtype.element_ty)
    if MASKED:
        tl.store(dx_ptr + idx, da, mask=mask)
    else:
        tl.store(dx_ptr + idx, da)


@triton.jit
def _pass2(
    s_ptr,
    t_ptr,
    dx_ptr,
    idx,
    mask,
    cap_s,
    cap_t,
    tau2,
    c_s,
    lz_s,
    c_t,
    lz_t,
    c_a,
    lz_a,
    acc_a,
    acc_b,
    acc_e,
    beta,
    one_m_beta,
    w,
    c_soft,
    c_hard,
    c_pa,
    DIV: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of pass 2: the divergence's terms, in bits, into the per-lane sums acc_a (the
    divergence, or KL(P_t‖M) for JSD), acc_b (KL(P_s‖M) for JSD) and, with ENTROPY, acc_e
    (Σ p_s log2 p_s); for forward KL / soft CE also the gradient. No ``p > 0`` test guards the
    ``p · (log-prob difference)`` terms: both log-probs are floored, so a zero p gives zero; the
    one case where p is nan (a teacher row all −inf) is zeroed for the whole row by the caller."""
    a, ls, lt = _logprobs(
        s_ptr, t_ptr, idx, mask, cap_s, cap_t, tau2, c_s, lz_s, c_t, lz_t, S_SOFTCAP, T_SOFTCAP, MASKED
    )
    ps = _exp2(ls)
    if MASKED:
        ps = tl.where(mask, ps, 0.0)
    pt = _exp2(lt)
    ls_c = tl.maximum(ls, _FLOOR2)
    lt_c = tl.maximum(lt, _FLOOR2)
    if ENTROPY:
        acc_e += ps * ls_c
    if DIV == 0:
        acc_a += pt * (lt_c - ls_c)
    elif DIV == 1:
        acc_a -= pt * ls_c
    elif DIV == 2:
        acc_a += ps * (ls_c - lt_c)
    else:
        lm_c = tl.maximum(_log_mix(pt, ps, beta, one_m_beta), _FLOOR2)
        acc_a += pt * (lt_c - lm_c)
        acc_b += ps * (ls_c - lm_c)
    if WITH_GRAD:
        if DIV <= 1:
            da = _dlogit(ps - pt, a, ps, c_a, lz_a, c_soft, c_hard, c_pa, cap_s, HAS_CE, CE_POW, S_SOFTCAP, False)
            _store(dx_ptr, idx, mask, da, w, MASKED)
    return acc_a, acc_b, acc_e


@triton.jit
def _pass3(
    s_ptr,
    t_ptr,
    dx_ptr,
    idx,
    mask,
    cap_s,
    cap_t,
    tau2,
    c_s,
    lz_s,
    c_t,
    lz_t,
    c_a,
    lz_a,
    kl,
    beta,
    one_m_beta,
    w,
    c_soft,
    c_hard,
    c_pa,
    DIV: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of pass 3 (reverse KL, JSD): the gradient, which needs the row's ``kl``."""
    a, ls, lt = _logprobs(
        s_ptr, t_ptr, idx, mask, cap_s, cap_t, tau2, c_s, lz_s, c_t, lz_t, S_SOFTCAP, T_SOFTCAP, MASKED
    )
    ps = _exp2(ls)
    g = _grad_ds(ls, lt, ps, _exp2(lt), kl, beta, one_m_beta, DIV)
    da = _dlogit(g, a, ps, c_a, lz_a, c_soft, c_hard, c_pa, cap_s, HAS_CE, CE_POW, S_SOFTCAP, False)
    _store(dx_ptr, idx, mask, da, w, MASKED)


@triton.jit
def _kd_chunk_kernel(
    S,
    T,
    DX,
    LABELS,
    VALID,
    ROW_W,
    LOSS,
    SOFT,
    HARD,
    ENT,
    SCALARS,
    V,
    stride_s,
    stride_t,
    stride_dx,
    ignore_index,
    DIV: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_POW: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    t_ptr = T + row * stride_t
    dx_ptr = DX + row * stride_dx
    inv_t = tl.load(SCALARS + _INV_T)
    soft_w = tl.load(SCALARS + _SOFT_W)
    hard_w = tl.load(SCALARS + _HARD_W)
    cap_s = tl.load(SCALARS + _S_CAP)
    cap_t = tl.load(SCALARS + _T_CAP)
    tau2 = inv_t * _LOG2E
    ninf = float("-inf")
    offs = tl.arange(0, BLOCK)
    # Full blocks run unmasked; the row's last, partial block (if any) masked.
    n_full = V // BLOCK
    tail = n_full * BLOCK + offs

    label = tl.load(LABELS + row)
    valid = tl.load(VALID + row) != 0
    in_vocab = (label >= 0) & (label < V)
    at = tl.minimum(tl.maximum(label, 0), V - 1)
    # The label's logits, read before a pass writes the gradient over the student's row.
    a_label = _cap(tl.load(s_ptr + at).to(tl.float32), cap_s, S_SOFTCAP)
    b_label = _cap(tl.load(t_ptr + at).to(tl.float32), cap_t, T_SOFTCAP)

    # Pass 1: the log-sum-exps of s = cap(x)·τ, t = cap(y)·τ and (for CE) a = cap(x), first
    # with fixed shifts: the larger of the first block's maximum and the label's logit (the label
    # is often near the top of a trained model's row). Rows whose maximum lies too far above
    # (rare; see _fixed_shift_fits) are swept again with running maxima.
    first = offs < V
    m_s = tl.maximum(tl.max(_load(s_ptr, offs, first, ninf, cap_s, S_SOFTCAP, True), axis=0), a_label)
    m_t = tl.maximum(tl.max(_load(t_ptr, offs, first, ninf, cap_t, T_SOFTCAP, True), axis=0), b_label)
    m_s, z_s, z_a, m_t, z_t = _sweep1(
        s_ptr, t_ptr, V, cap_s, cap_t, tau2, m_s, m_t, HAS_CE, CE_POW, S_SOFTCAP, T_SOFTCAP, False, BLOCK, STAGES
    )
    if not _fixed_shift_fits(m_s, z_s, z_a, m_t, z_t, HAS_CE, CE_POW):
        m_s, z_s, z_a, m_t, z_t = _sweep1(
            s_ptr, t_ptr, V, cap_s, cap_t, tau2, ninf, ninf, HAS_CE, CE_POW, S_SOFTCAP, T_SOFTCAP, True, BLOCK, STAGES
        )
    teacher_empty = m_t == ninf  # a teacher row all −inf: its p_t are nan, its KL terms 0
    c_s, lz_s = _finish(z_s, m_s, tau2)
    c_t, lz_t = _finish(z_t, m_t, tau2)
    c_a = 0.0
    lz_a = 0.0
    hard = 0.0
    if HAS_CE:
        if CE_POW == 1:
            c_a, lz_a = c_s, lz_s  # τ·log2 e is log2 e: the same terms
        else:
            c_a, lz_a = _finish(z_a, m_s, _LOG2E)
        # log Σ exp(a) = m + ln 2 · (log2 z + (c_a − m·log2 e)); the bracket's second term, the
        # rounding of c_a, is exact by FMA, so no logit-sized number is rounded.
        lse_a = m_s + _LN2 * (lz_a + tl.fma(m_s, -_LOG2E, c_a))
        picked = tl.where(in_vocab, a_label, 0.0)
        hard = tl.where(valid & (label != ignore_index), lse_a - picked, 0.0)

    one_m_beta = 0.0
    beta = 0.0
    if DIV == 3:
        # β and 1 − β, each computed in float64 (see divergences._mixing; the logs that follow
        # them there are not needed here).
        beta = tl.load(SCALARS + _PARAMS)  # jsd's (β, 1 − β, log β, log(1 − β)), see divergences._mixing
        one_m_beta = tl.load(SCALARS + _PARAMS + 1)

    # The row factors of the gradient (w the row weight; ln 2 turns bits into nats).
    w = 0.0
    if WITH_GRAD:
        w = tl.load(ROW_W + row).to(tl.float32)
    c_soft = w * soft_w * inv_t
    if DIV == 2:
        c_soft = c_soft * _LN2
    elif DIV == 3:
        c_soft = c_soft * (one_m_beta * _LN2)
    c_hard = w * hard_w
    # softmax(a) = k_a · p_s^CE_POW (see _ce_probs), k_a taken into the CE's row factor.
    c_pa = c_hard
    if CE_POW != 0:
        c_pa = c_hard * tl.exp2(CE_POW * lz_s - lz_a)

    # Pass 2: the divergence's value (and, when the gradient needs no row value, the gradient).
    # Back to front: the blocks pass 1 read last are the likeliest to be still in L2.
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK], tl.float32)
    acc_e = tl.zeros([BLOCK], tl.float32)
    if n_full * BLOCK < V:
        acc_a, acc_b, acc_e = _pass2(
            s_ptr,
            t_ptr,
            dx_ptr,
            tail,
            tail < V,
            cap_s,
            cap_t,
            tau2,
            c_s,
            lz_s,
            c_t,
            lz_t,
            c_a,
            lz_a,
            acc_a,
            acc_b,
            acc_e,
            beta,
            one_m_beta,
            w,
            c_soft,
            c_hard,
            c_pa,
            DIV,
            HAS_CE,
            CE_POW,
            S_SOFTCAP,
            T_SOFTCAP,
            ENTROPY,
            WITH_GRAD,
            True,
        )
    for i in tl.range(0, n_full, num_stages=STAGES):
        acc_a, acc_b, acc_e = _pass2(
            s_ptr,
            t_ptr,
            dx_ptr,
            (n_full - 1 - i) * BLOCK + offs,
            None,
            cap_s,
            cap_t,
            tau2,
            c_s,
            lz_s,
            c_t,
            lz_t,
            c_a,
            lz_a,
            acc_a,
            acc_b,
            acc_e,
            beta,
            one_m_beta,
            w,
            c_soft,
            c_hard,
            c_pa,
            DIV,
            HAS_CE,
            CE_POW,
            S_SOFTCAP,
            T_SOFTCAP,
            ENTROPY,
            WITH_GRAD,
            False,
        )
    kl_a = tl.sum(acc_a, axis=0)  # bits
    kl_b = tl.sum(acc_b, axis=0)
    if DIV != 2:
        kl_a = tl.where(teacher_empty, 0.0, kl_a)
    if DIV == 3:
        soft = _LN2 * (beta * kl_a + one_m_beta * kl_b)
    else:
        soft = _LN2 * kl_a
    soft = tl.where(valid, soft, 0.0)
    tl.store(SOFT + row, soft)
    tl.store(HARD + row, hard)
    tl.store(LOSS + row, soft_w * soft + hard_w * hard)
    entropy = 0.0
    if ENTROPY:  # −Σ p_s ln p_s of the student at T, from Σ p_s log2 p_s
        entropy = tl.where(valid, -_LN2 * tl.sum(acc_e, axis=0), 0.0)
    tl.store(ENT + row, entropy)

    if WITH_GRAD:
        # Pass 3 (reverse KL, JSD): the gradient, which needs the row's KL; front to back.
        kl = kl_a
        if DIV == 3:
            kl = kl_b
        if DIV >= 2:
            for i in tl.range(0, n_full, num_stages=STAGES):
                _pass3(
                    s_ptr,
                    t_ptr,
                    dx_ptr,
                    i * BLOCK + offs,
                    None,
                    cap_s,
                    cap_t,
                    tau2,
                    c_s,
                    lz_s,
                    c_t,
                    lz_t,
                    c_a,
                    lz_a,
                    kl,
                    beta,
                    one_m_beta,
                    w,
                    c_soft,
                    c_hard,
                    c_pa,
                    DIV,
                    HAS_CE,
                    CE_POW,
                    S_SOFTCAP,
                    T_SOFTCAP,
                    False,
                )
            if n_full * BLOCK < V:
                _pass3(
                    s_ptr,
                    t_ptr,
                    dx_ptr,
                    tail,
                    tail < V,
                    cap_s,
                    cap_t,
                    tau2,
                    c_s,
                    lz_s,
                    c_t,
                    lz_t,
                    c_a,
                    lz_a,
                    kl,
                    beta,
                    one_m_beta,
                    w,
                    c_soft,
                    c_hard,
                    c_pa,
                    DIV,
                    HAS_CE,
                    CE_POW,
                    S_SOFTCAP,
                    T_SOFTCAP,
                    True,
                )
        # The CE's one-hot, at the label only: the passes above wrote softmax(a) there; once
        # their stores are done, that one element is written again with the one-hot subtracted
        # (a compare and select per element fewer in the loop).
        if HAS_CE:
            if in_vocab:
                tl.debug_barrier()
                ls = (a_label * tau2 - c_s) - lz_s
                lt = (b_label * tau2 - c_t) - lz_t
                ps = _exp2(ls)
                g = _grad_ds(ls, lt, ps, _exp2(lt), kl, beta, one_m_beta, DIV)
                da = _dlogit(g, a_label, ps, c_a, lz_a, c_soft, c_hard, c_pa, cap_s, HAS_CE, CE_POW, S_SOFTCAP, True)
                _store(dx_ptr, at, None, da, w, False)


def chunk_step(
    kernel: str,  # a name in KERNELS
    has_ce: bool,
    softcaps: tuple[bool, bool],  # whether the student's and the teacher's logits are capped
    ignore_index: int,
    student: Tensor,  # (C, V) raw student logits
    teacher: Tensor,  # (C, V) raw teacher logits
    labels: Tensor,  # (C,) int64
    valid: Tensor,  # (C,) bool
    row_weight: Tensor | None,  # (C,) float32, or None for the loss only
    scalars: Tensor,  # kdfuse.scalars' layout, float32
    out: Tensor | None = None,  # (C, V) where to write dlogits; may be ``student`` itself
    ce_power: int = 0,
    entropy: bool = False,
) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(dlogits (C, V) in ``student``'s dtype or None, (loss, soft, hard, entropy) each (C,)
    float32; entropy 0 unless ``entropy``).

    ``out=student`` is safe: each program reads an element of its row before it writes that
    element's gradient, and the pass that writes is the last to read. ``ce_power``: the
    temperature's :func:`ce_power` (``scalars[0]`` must then be its inverse, 1/T) to form the CE's
    probabilities from the soft ones (see ``_ce_probs``); 0 forms them anew at any temperature.
    """
    rows, vocab = student.shape
    if student.stride(-1) != 1:
        student = student.contiguous()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    parts = tuple(torch.empty(rows, dtype=torch.float32, device=student.device) for _ in range(4))
    with_grad = row_weight is not None
    dx = (torch.empty_like(student) if out is None else out) if with_grad else None
    if rows:
        _kd_chunk_kernel[(rows,)](
            student,
            teacher,
            dx if with_grad else student,
            labels,
            valid,
            row_weight if with_grad else scalars,
            *parts,
            scalars,
            vocab,
            student.stride(0),
            teacher.stride(0),
            dx.stride(0) if with_grad else 0,
            ignore_index,
            DIV=KERNELS[kernel],
            HAS_CE=has_ce,
            CE_POW=ce_power if has_ce else 0,
            S_SOFTCAP=softcaps[0],
            T_SOFTCAP=softcaps[1],
            ENTROPY=entropy,
            WITH_GRAD=with_grad,
            BLOCK=min(_BLOCK, triton.next_power_of_2(vocab)),
            STAGES=_STAGES[kernel],
            num_warps=_NUM_WARPS,
        )
    return dx, parts
