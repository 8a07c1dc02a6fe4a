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

Factories (``forward_kl("bucket")``) return plain functions with stable ``__name__``
(``"topk_forward_kl_bucket"``), the same object for the same arguments, marked with
``__kdfuse_sparse__ = True`` so a combinator can refuse a dense divergence with a sparse teacher
and vice versa; :func:`get` turns a name back into the function.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import LOGPROB_FLOOR
from .tuning import heuristic_chunk_size

__all__ = [
    "SparseDivergence",
    "TailPolicy",
    "TAIL_POLICIES",
    "forward_kl",
    "soft_ce",
    "get",
    "names",
    "is_sparse",
    "teacher_topk",
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
# The built-ins: one function object per (kind, tail), so compiled-code caches keyed on the
# function hit across calls.
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


def _make(kind: str, tail: str) -> SparseDivergence:
    with_entropy = kind == "forward_kl"

    def divergence(student: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
        return _sparse_loss(student, ids, logprobs, tail, with_entropy)

    def reduced(student_lp: Tensor, log_outside: Tensor, covers_all: Tensor, logprobs: Tensor) -> Tensor:
        return _reduced_loss(student_lp, log_outside, covers_all, logprobs, tail, with_entropy)

    divergence.__name__ = divergence.__qualname__ = f"topk_{kind}_{tail}"
    divergence.__doc__ = _DOCS[kind, tail]
    divergence.__kdfuse_sparse__ = True  # type: ignore[attr-defined]
    # The same loss from (student top-k log-probs, log(1 − S), covers_all, teacher log-probs):
    # what kdfuse.triton_topk's fused CUDA path evaluates (see _reduced_loss).
    divergence.__kdfuse_reduced__ = reduced  # type: ignore[attr-defined]
    return divergence


_BUILTINS: dict[tuple[str, str], SparseDivergence] = {key: _make(*key) for key in _DOCS}
_BY_NAME: dict[str, SparseDivergence] = {fn.__name__: fn for fn in _BUILTINS.values()}


def _check_tail(tail: str) -> str:
    if tail not in TAIL_POLICIES:
        raise ValueError(f"tail must be one of {', '.join(map(repr, TAIL_POLICIES))}, got {tail!r}")
    return tail


def forward_kl(tail: TailPolicy) -> SparseDivergence:
    """Forward KL(teacher ‖ student) against a top-k teacher; ``tail`` says what happens to the
    teacher's mass outside its top-k (see the module docstring):

    * ``"renormalize"``: Σ_k q_k (log q_k − log p_s[id_k]), q_k = p_k / P;
    * ``"bucket"``: Σ_k p_k (log p_k − log p_s[id_k]) + (1 − P)(log(1 − P) − log(1 − S));
    * ``"ignore"``: Σ_k p_k (log p_k − log p_s[id_k]).
    """
    return _BUILTINS["forward_kl", _check_tail(tail)]


def soft_ce(tail: TailPolicy) -> SparseDivergence:
    """Soft cross-entropy −Σ p_t log p_s against a top-k teacher (forward KL plus the teacher's
    entropy: same gradient); ``tail`` as in :func:`forward_kl`:

    * ``"renormalize"``: −Σ_k q_k log p_s[id_k];
    * ``"bucket"``: −Σ_k p_k log p_s[id_k] − (1 − P) log(1 − S);
    * ``"ignore"``: −Σ_k p_k log p_s[id_k].
    """
    return _BUILTINS["soft_ce", _check_tail(tail)]


def names() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_BY_NAME)


def get(name: str) -> SparseDivergence:
    """The built-in called ``name``, e.g. ``"topk_forward_kl_renormalize"``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown sparse divergence {name!r}; built-ins: {', '.join(names())}") from None


def is_sparse(divergence: object) -> bool:
    """Whether ``divergence`` takes a top-k teacher (``__kdfuse_sparse__``), not dense logits."""
    return bool(getattr(divergence, "__kdfuse_sparse__", False))


# --------------------------------------------------------------------------------------------
# Top-k extraction from a teacher's hidden states, chunk by chunk.
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_topk_args(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    temperature: float,
    chunk_size: int | str,
    bias: Tensor | None,
    softcap: float | None,
    vocab: int | None,
) -> int:
    """Raise ``ValueError``/``TypeError`` naming the argument; return the vocabulary used."""
    for name, t in (("teacher_hidden", hidden), ("teacher_weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"teacher_weight must be (Vt, Ht), got shape {_shape(weight)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"teacher_hidden ({hidden.dtype}) and teacher_weight ({weight.dtype}) must share a dtype")
    full_vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(
            f"teacher_hidden's last dim must equal teacher_weight's Ht={width}: "
            f"teacher_hidden {_shape(hidden)}, teacher_weight {_shape(weight)}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (full_vocab,)):
        raise ValueError(
            f"teacher_bias must be (Vt,) = ({full_vocab},) like teacher_weight {_shape(weight)}, "
            f"got {_shape(bias) if isinstance(bias, Tensor) else type(bias).__name__}"
        )
    if vocab is None:
        vocab = full_vocab
    elif isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= full_vocab:
        raise ValueError(
            f"vocab must be an int in [1, Vt={full_vocab}] (teacher_weight {_shape(weight)}), got {vocab!r}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    _check_positive("temperature", temperature)
    if softcap is not None:
        _check_positive("softcap", softcap)
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or 'auto', got {chunk_size!r}")
    return vocab


def _chunk_topk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """(ids (C, k), logprobs (C, k)) of one chunk, in the compute dtype; the order of operations
    matches the combinator's (matmul in the input dtype, cap, then divide by T)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias).to(compute)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    top, ids = logits.topk(k, dim=-1)
    # log p = logit − logsumexp over the whole vocabulary: exact, not renormalised to the top-k.
    return ids, top - logits.logsumexp(-1, keepdim=True)


@torch.no_grad()
def teacher_topk(
    teacher_hidden: Tensor,  # (..., Ht)
    teacher_weight: Tensor,  # (Vt, Ht)
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int | Literal["auto"] = "auto",
    teacher_bias: Tensor | None = None,  # (Vt,)
    softcap: float | None = None,
    vocab: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The teacher's top-k token ids and exact log-probabilities, never materialising all logits.

    Rows (the flattened leading dims) are processed ``chunk_size`` at a time: logits =
    ``hidden @ W.T (+ bias)`` (in the input dtype, then float32; float64 for float64 inputs),
    optionally soft-capped (``softcap·tanh(logits/softcap)``), divided by ``temperature``, then
    log-probs = logits − logsumexp over the whole vocabulary and ``torch.topk``. Ids come sorted
    by decreasing log-prob.

    Args:
        teacher_hidden, teacher_weight: the teacher's final hidden states and lm_head weight.
        k: tokens kept per row, in ``[1, V]``.
        temperature: the teacher's sampling temperature; it shapes the cached distribution (the
            sparse divergences never rescale it).
        chunk_size: rows per chunk, or ``"auto"``
            (:func:`kdfuse.tuning.heuristic_chunk_size`).
        teacher_bias: lm_head bias, ``(Vt,)``.
        softcap: Gemma-2 style final-logit soft-capping, applied before the temperature.
        vocab: keep only the first ``vocab`` columns (drop padded embedding rows).

    Returns:
        ``(ids (..., k) int64, logprobs (..., k) float32)``.
    """
    vocab = _check_topk_args(teacher_hidden, teacher_weight, k, temperature, chunk_size, teacher_bias, softcap, vocab)
    leading = teacher_hidden.shape[:-1]
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    weight = teacher_weight[:vocab]
    bias = None if teacher_bias is None else teacher_bias[:vocab]
    rows, device = hidden.shape[0], hidden.device
    ids = torch.empty(rows, k, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, k, dtype=torch.float32, device=device)
    size = heuristic_chunk_size(rows, vocab, device.type) if chunk_size == "auto" else chunk_size
    for start in range(0, rows, size):
        chunk = slice(start, start + size)
        ids[chunk], logprobs[chunk] = _chunk_topk(hidden[chunk], weight, bias, k, temperature, softcap)
    return ids.reshape(*leading, k), logprobs.reshape(*leading, k)
