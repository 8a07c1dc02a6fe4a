"""Sparse divergences against a top-k teacher, and fused extraction of a teacher's top-k.

API teachers expose, and offline pipelines cache, only the teacher's k most likely tokens per
position with their log-probabilities. The contract is the public type :data:`SparseDivergence`::

    def divergence(student: Tensor,   # (R, V) temperature-scaled student logits
                   ids: Tensor,       # (R, k) int64 teacher token ids
                   logprobs: Tensor,  # (R, k) float teacher log-probabilities of those ids
                   ) -> Tensor:       # (R,) per-row loss
        ...

``student`` arrives in the compute dtype (float32, or float64 for float64 inputs), already
soft-capped and divided by the temperature. The temperature applies to the student only: the
teacher's log-probabilities are what they are (they were produced at whatever temperature the
teacher ran with, see :func:`teacher_topk`), so the combinator divides the student logits by ``T``
and passes ``ids``/``logprobs`` unchanged. Like :data:`kdfuse.divergences.Divergence` the
function is pure, so ``torch.func`` differentiates it w.r.t. ``student`` (``ids`` and
``logprobs`` get no gradient) and ``torch.compile`` can fuse it; forward and backward are the
value and gradient of one function by construction.

Assumptions on the teacher side (not checked: checking would need a device sync):

* ids lie in ``[0, V)``, and the *real* entries of a row are distinct token ids;
* padding: a row with fewer than k known tokens fills the rest with any valid id (repeats, e.g.
  0, are fine, even of a real id) and log-prob ``-inf``. Padding contributes exactly 0 to the
  value and gradient and is not counted as top-k mass on either side;
* ``exp(logprobs)`` sums to at most 1 per row, up to rounding (a few ulps over, e.g. from
  float16 storage, is treated as exactly 1).

With p_k = exp(logprobs_k), P = Σ_k p_k, log p_s = log_softmax(student), S = Σ_k p_s[id_k] over
real entries, the mass the teacher leaves outside its top-k (1 − P) is handled by an explicit,
required ``tail`` policy:

* ``"renormalize"`` (axolotl): q_k = p_k / P, i.e. the teacher restricted to its top-k;
  forward KL = Σ_k q_k (log q_k − log p_s[id_k]), soft CE = −Σ_k q_k log p_s[id_k].
* ``"bucket"`` (TRL): 1 − P is one more "token", compared against the student's mass outside the
  top-k, 1 − S: forward KL adds (1 − P)(log(1 − P) − log(1 − S)), soft CE adds
  −(1 − P) log(1 − S) to the unnormalised top-k terms. log(1 − S) is a log-sum-exp of the
  student's log-probs outside the top-k, exact even when S → 1. When the top-k covers the whole
  vocabulary there is no tail token and any leftover 1 − P is rounding: the term is 0.
* ``"ignore"`` (metaseq's forward): p_k as given, Σ p_k < 1 allowed; forward KL
  = Σ_k p_k (log p_k − log p_s[id_k]) (not a divergence: it can be negative), soft CE
  = −Σ_k p_k log p_s[id_k]. metaseq's backward assumed Σ p_k = 1 while its forward did not
  renormalise; here the gradient is always that of the value computed.

Everywhere 0 · log 0 = 0 (no NaN in value or gradient when P = 1 or for padding), and student
log-probabilities are floored at :data:`kdfuse.divergences.LOGPROB_FLOOR` as in the dense
built-ins. With k = V, real ids and exact teacher log-probs, every policy equals the dense
:func:`kdfuse.divergences.forward_kl` / :func:`~kdfuse.divergences.soft_ce`.

The built-ins are the table :data:`BUILTINS` (see :class:`kdfuse.divergences.Builtin`), one entry
per (kind, tail); factories (``forward_kl("bucket")``) return its
:class:`~kdfuse.divergences.Parametrized` value with a stable name (``"topk_forward_kl_bucket"``)
and ``sparse=True``, so a combinator can refuse a dense divergence with a sparse teacher and vice
versa; :func:`get` turns a name back into the divergence. A user's own sparse divergence is any
function of this signature, passed with ``teacher_topk``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from . import scalars as S
from .divergences import LOGPROB_FLOOR, Builtin, Parametrized, build, lookup, table_of

__all__ = [
    "BUILTINS",
    "TAIL_POLICIES",
    "SparseDivergence",
    "TailPolicy",
    "forward_kl",
    "get",
    "ignored_rows_as_padding",
    "is_sparse",
    "names",
    "soft_ce",
]

SparseDivergence = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(student (R, V), ids (R, k) int64, logprobs (R, k)) -> (R,)``: see the module docstring."""

TailPolicy = Literal["renormalize", "bucket", "ignore"]
TAIL_POLICIES: tuple[str, ...] = ("renormalize", "bucket", "ignore")

# Stands in for log p_s of top-k tokens inside the complement's log-sum-exp. Finite (unlike -inf)
# so an all-masked row keeps a finite gradient; at 2x the floor its exp(...) is exactly 0 next to
# any complement log-prob above the floor, and below the floor the result is floored anyway.
_MASKED_LOGPROB = 2 * LOGPROB_FLOOR


def ignored_rows_as_padding(
    ids: Tensor,  # (R, k) teacher token ids
    logprobs: Tensor,  # (R, k) their log-probs
    valid: Tensor,  # (R,) bool: the rows that count
) -> tuple[Tensor, Tensor]:
    """(ids, logprobs) with every ignored row all padding (id 0, log-prob −inf).

    Ignored rows may hold anything, as a dense teacher's may: a NaN log-prob would otherwise reach
    the gradient (NaN times the row's 0 weight is NaN) and an out-of-range id the gather. The
    combinators (``fused_linear_distill`` and its reference) apply this before anything reads
    the teacher, value checks included."""
    keep = valid[:, None]
    return torch.where(keep, ids, 0), torch.where(keep, logprobs, float("-inf"))


# --------------------------------------------------------------------------------------------
# Building blocks: pure, row-wise.
# --------------------------------------------------------------------------------------------


def _renormalized(logprobs: Tensor) -> Tensor:
    """log(p_k / P): the teacher restricted to its top-k. An all-padding row stays all ``-inf``
    (its loss is 0) instead of ``-inf - (-inf) = NaN``."""
    lse = logprobs.logsumexp(-1, keepdim=True)
    return logprobs - torch.where(torch.isneginf(lse), 0, lse)


def _topk_terms(teacher_lp: Tensor, student_lp: Tensor, with_entropy: bool) -> Tensor:
    """Σ_k p_k (log p_k − log q_k) (``with_entropy``) or −Σ_k p_k log q_k, with 0·log 0 = 0.

    ``p`` comes from the unfloored ``teacher_lp`` (exactly 0 for padding); the logs are floored
    so neither value nor gradient sees ``inf - inf`` or ``0 · inf``.
    """
    p = teacher_lp.exp()
    log_q = student_lp.clamp_min(LOGPROB_FLOOR)
    if with_entropy:
        return (p * (teacher_lp.clamp_min(LOGPROB_FLOOR) - log_q)).sum(-1)
    return -(p * log_q).sum(-1)


def _in_topk(student_logprobs: Tensor, ids: Tensor, real: Tensor) -> Tensor:
    """(R, V) bool: the real top-k positions. A count, not a scatter of booleans: with a padding
    entry repeating a real id, which of two scattered values lands is unspecified."""
    counts = torch.zeros_like(student_logprobs).scatter_add(-1, ids, real.to(student_logprobs.dtype))
    return counts > 0


def _log_outside(student_logprobs: Tensor, in_topk: Tensor) -> Tensor:
    """log(1 − S) = log Σ_{v ∉ top-k} p_s[v], floored, from the complement's log-probs directly
    (``log1p(-S)`` would lose everything when S rounds to 1)."""
    outside = torch.where(in_topk, _MASKED_LOGPROB, student_logprobs)
    return outside.logsumexp(-1).clamp_min(LOGPROB_FLOOR)


def _bucket_term(log_outside: Tensor, covers_all: Tensor, teacher_lp: Tensor, with_entropy: bool) -> Tensor:
    """(1 − P)(log(1 − P) − log(1 − S)) (``with_entropy``) or −(1 − P) log(1 − S), per row."""
    # 1 − P = −expm1(log P): accurate for P near 1; a P a few ulps over 1 (rounding) counts as 1.
    tail = -torch.expm1(teacher_lp.logsumexp(-1).clamp_max(0))
    # No token outside the top-k: no tail token, a leftover 1 − P is only rounding.
    tail = torch.where(covers_all, 0, tail)
    if with_entropy:
        return tail * (tail.log().clamp_min(LOGPROB_FLOOR) - log_outside)
    return -tail * log_outside


def _reduced_loss(
    student_lp: Tensor,  # (R, k) student log-probs at the ids
    log_outside: Tensor,  # (R,) log(1 − S), floored; read by the bucket policy only
    covers_all: Tensor,  # (R,) bool: no token outside the real top-k
    logprobs: Tensor,  # (R, k) teacher log-probs
    tail: str,
    with_entropy: bool,
) -> Tensor:
    """A built-in's per-row loss from the student's top-k log-probs and its mass outside them:
    all a sparse divergence reads of the student, so a fused kernel can supply just these."""
    teacher_lp = logprobs.to(student_lp.dtype)
    if tail == "renormalize":
        teacher_lp = _renormalized(teacher_lp)
    loss = _topk_terms(teacher_lp, student_lp, with_entropy)
    if tail == "bucket":
        loss = loss + _bucket_term(log_outside, covers_all, teacher_lp, with_entropy)
    return loss


def _sparse_loss(student: Tensor, ids: Tensor, logprobs: Tensor, tail: str, with_entropy: bool) -> Tensor:
    student_lp = student.log_softmax(-1)
    in_topk = _in_topk(student_lp, ids, ~torch.isneginf(logprobs))
    log_outside = _log_outside(student_lp, in_topk) if tail == "bucket" else None
    return _reduced_loss(student_lp.gather(-1, ids), log_outside, in_topk.all(-1), logprobs, tail, with_entropy)


# --------------------------------------------------------------------------------------------
# A built-in's loss from the few numbers per row it reads of the student (kdfuse.triton_topk and
# kdfuse.vocab_parallel supply them): its logits at the ids and the label, and the log-sum-exps
# over the complement of the real top-k.
# --------------------------------------------------------------------------------------------


def _shifted(
    top: Tensor,  # (C, k) logits at the ids (scaled as the log-sum-exp is)
    real: Tensor,  # (C, k) bool
    m: Tensor,  # (C,) the complement's max (−inf when empty)
    log_z: Tensor,  # (C,) the complement's log Σ e^{x − m}
) -> tuple[Tensor, Tensor]:
    """(shift, log_z relative to it): the row's overall max, finite, without gradient."""
    shift = torch.maximum(m, torch.where(real, top, float("-inf")).amax(-1)).detach()
    shift = torch.where(torch.isneginf(shift), 0, shift)
    return shift, log_z + torch.where(torch.isneginf(m), 0, m - shift)


def reduced_parts(
    reduced: Callable[..., Tensor],
    has_ce: bool,
    gathered: Tensor,  # (C, k) float32 raw student logits at the ids
    label_logit: Tensor,  # (C,) float32
    lz_t: Tensor,  # (C,) log Σ_{v ∉ top-k} e^{τx_v − m_t}
    lz_1: Tensor,  # (C,) log Σ_{v ∉ top-k} e^{x_v − m_1} (CE only)
    stats: Tensor,  # (C, 4) from _complement_stats: m_t and m_1 are read (constant shifts)
    logprobs: Tensor,  # (C, k) teacher log-probs
    real: Tensor,  # (C, k) bool: logprobs > −inf
    valid: Tensor,  # (C,) bool: with CE, exactly the rows whose label is not ignore_index
    scalars: Tensor,  # kdfuse.scalars' layout, float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, soft, hard), each (C,), from the gathered numbers (see the module docstring).
    Everything is shifted by the row's max (of the complement and the real top-k), so log-probs are
    differences of log-prob-sized numbers; the shift is a constant (the loss does not depend on
    it), so no gradient flows through it."""
    ninf = float("-inf")
    scaled = gathered * scalars[S.INV_T]
    shift, lz_t = _shifted(scaled, real, stats[:, 0], lz_t)
    shifted = scaled - shift[:, None]
    lse = torch.logaddexp(lz_t, torch.where(real, shifted, ninf).logsumexp(-1))
    log_outside = (lz_t - lse).clamp_min(LOGPROB_FLOOR)
    soft = reduced(shifted - lse[:, None], log_outside, torch.isneginf(lz_t), logprobs)
    soft = torch.where(valid, soft, 0)
    if has_ce:
        shift_1, lz_1 = _shifted(gathered, real, stats[:, 2], lz_1)
        lse_1 = torch.logaddexp(lz_1, torch.where(real, gathered - shift_1[:, None], ninf).logsumexp(-1))
        hard = torch.where(valid, lse_1 - (label_logit - shift_1), 0)
    else:
        hard = torch.zeros_like(soft)
    return scalars[S.SOFT_W] * soft + scalars[S.HARD_W] * hard, soft, hard


def reduced_grads(
    reduced, has_ce, gathered, label_logit, lz_t, lz_1, stats, logprobs, real, valid, row_weight, scalars
):
    """(d Σ_r w_r loss_r / d (gathered, label_logit, lz_t, lz_1), (loss, soft, hard))."""

    def total(gathered, label_logit, lz_t, lz_1):
        parts = reduced_parts(reduced, has_ce, gathered, label_logit, lz_t, lz_1, stats, logprobs, real, valid, scalars)
        return (parts[0] * row_weight).sum(), parts

    return torch.func.grad(total, argnums=(0, 1, 2, 3), has_aux=True)(gathered, label_logit, lz_t, lz_1)


# --------------------------------------------------------------------------------------------
# The built-ins: one entry per (kind, tail).
# --------------------------------------------------------------------------------------------

_DOCS = {
    ("forward_kl", "renormalize"): "KL(Q ‖ P_s) over the top-k, q_k = p_k / P: Σ_k q_k (log q_k − log p_s[id_k]).",
    ("forward_kl", "bucket"): (
        "Σ_k p_k (log p_k − log p_s[id_k]) + (1 − P)(log(1 − P) − log(1 − S)): the KL between the "
        "(k+1)-way distributions over the top-k tokens and one tail bucket."
    ),
    ("forward_kl", "ignore"): "Σ_k p_k (log p_k − log p_s[id_k]) with p_k as given (Σ p_k < 1 allowed).",
    ("soft_ce", "renormalize"): "−Σ_k q_k log p_s[id_k], q_k = p_k / P.",
    ("soft_ce", "bucket"): "−Σ_k p_k log p_s[id_k] − (1 − P) log(1 − S).",
    ("soft_ce", "ignore"): "−Σ_k p_k log p_s[id_k] with p_k as given (metaseq's soft CE value).",
}


def _entry(kind: str, tail: str) -> Builtin:
    """The built-in (kind, tail): its loss from the whole student row, and the same loss from the
    few numbers kdfuse.triton_topk's fused CUDA path supplies (see :func:`_reduced_loss`)."""
    with_entropy = kind == "forward_kl"

    def divergence(student: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
        return _sparse_loss(student, ids, logprobs, tail, with_entropy)

    def reduced(student_lp: Tensor, log_outside: Tensor, covers_all: Tensor, logprobs: Tensor) -> Tensor:
        return _reduced_loss(student_lp, log_outside, covers_all, logprobs, tail, with_entropy)

    name = f"topk_{kind}_{tail}"
    divergence.__name__ = divergence.__qualname__ = name
    return Builtin(name, divergence, _DOCS[kind, tail], kernel="topk", sparse=True, reduced=reduced)


BUILTINS: tuple[Builtin, ...] = tuple(_entry(*key) for key in _DOCS)
_TABLE = table_of(BUILTINS)


def _check_tail(tail: str) -> str:
    if tail not in TAIL_POLICIES:
        raise ValueError(f"tail must be one of {', '.join(map(repr, TAIL_POLICIES))}, got {tail!r}")
    return tail


def forward_kl(tail: TailPolicy) -> Parametrized:
    """Forward KL(teacher ‖ student) against a top-k teacher; ``tail`` says what happens to the
    teacher's mass outside its top-k (see the module docstring):

    * ``"renormalize"``: Σ_k q_k (log q_k − log p_s[id_k]), q_k = p_k / P;
    * ``"bucket"``: Σ_k p_k (log p_k − log p_s[id_k]) + (1 − P)(log(1 − P) − log(1 − S));
    * ``"ignore"``: Σ_k p_k (log p_k − log p_s[id_k]).
    """
    return build(_TABLE, f"topk_forward_kl_{_check_tail(tail)}")


def soft_ce(tail: TailPolicy) -> Parametrized:
    """Soft cross-entropy −Σ p_t log p_s against a top-k teacher (forward KL plus the teacher's
    entropy: same gradient); ``tail`` as in :func:`forward_kl`:

    * ``"renormalize"``: −Σ_k q_k log p_s[id_k];
    * ``"bucket"``: −Σ_k p_k log p_s[id_k] − (1 − P) log(1 − S);
    * ``"ignore"``: −Σ_k p_k log p_s[id_k].
    """
    return build(_TABLE, f"topk_soft_ce_{_check_tail(tail)}")


def names() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_TABLE)


def get(name: str) -> Parametrized:
    """The built-in called ``name``, e.g. ``"topk_forward_kl_renormalize"``."""
    return lookup(_TABLE, name, "sparse divergence")


def is_sparse(divergence: object) -> bool:
    """Whether ``divergence`` is a :class:`~kdfuse.divergences.Parametrized` that takes a top-k
    teacher (a plain function's kind is decided by the teacher it is called with)."""
    return isinstance(divergence, Parametrized) and divergence.sparse
