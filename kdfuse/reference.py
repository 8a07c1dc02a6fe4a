"""The plain reference: full logits, plain autograd. It states the semantics kdfuse computes.

It reads the divergences' math (:mod:`kdfuse.registry`), the argument contract
(:mod:`kdfuse.validate`) and the public types (:mod:`kdfuse.contract`), and nothing of the
engine: the specification does not depend on the implementation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import DistillOutput, Impl, Reduction
from .registry import DivergenceLike, resolve
from .topk import ignored_rows_as_padding
from .validate import check_inputs, check_logit_transforms, check_normalizer, check_values

__all__ = ["fused_linear_distill_ref"]


def _cap(x: Tensor, softcap: float | None) -> Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _dense_teacher(
    teacher_hidden, teacher_weight, teacher_bias, teacher_logits, n: int, vocab: int, precision
) -> Tensor:
    """The teacher's (n, V) raw logits in ``precision``, without gradient."""
    with torch.no_grad():
        if teacher_logits is not None:
            # Explicit last dims: reshape(n, -1) is ambiguous (an error) when n == 0.
            return teacher_logits.reshape(n, teacher_logits.shape[-1])[:, :vocab].to(precision)
        bias = None if teacher_bias is None else teacher_bias[:vocab].to(precision)
        hidden = teacher_hidden.reshape(n, teacher_hidden.shape[-1]).to(precision)
        return F.linear(hidden, teacher_weight[:vocab].to(precision), bias)


def _row_parts(div, student: Tensor, soft: Tensor, labels, valid: Tensor, temperature, hard_weight, ignore_index: int):
    """(soft, hard, entropy) per row, 0 on ignored rows: the hard CE at temperature 1 (none when
    ``hard_weight`` is 0), the student's entropy at the temperature."""
    if soft.shape != valid.shape:
        raise ValueError(
            f"divergence {div.__name__} returned shape {tuple(soft.shape)}, expected per-row losses ({valid.shape[0]},)"
        )
    if hard_weight == 0:  # as documented (and as fused computes): no cross-entropy at all
        hard = torch.zeros_like(soft)
    else:
        hard = F.cross_entropy(student, labels.reshape(-1).long(), ignore_index=ignore_index, reduction="none")
    logp = (student.detach() / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
    return tuple(torch.where(valid, x, 0) for x in (soft, hard, entropy))


def _reduce(parts: tuple[Tensor, ...], valid: Tensor, reduction: str, normalizer, leading) -> tuple:
    """Per-row ``parts`` shaped like ``leading`` (``"none"``), or summed and divided by
    ``normalizer``, else by the number of valid rows (at least 1) for ``"mean"``."""
    loss = parts[0]
    if reduction == "none":
        return tuple(x.reshape(leading) for x in parts)
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device).reshape(())
    elif reduction == "mean":
        denom = valid.sum().clamp_min(1).to(loss.dtype)
    else:
        denom = torch.ones((), dtype=loss.dtype, device=loss.device)
    return tuple(x.sum() / denom for x in parts)


def fused_linear_distill_ref(
    student_hidden: Tensor,  # (..., Hs)
    student_weight: Tensor,  # (V, Hs)
    teacher_hidden: Tensor | None = None,  # (..., Ht)
    teacher_weight: Tensor | None = None,  # (Vt, Ht)
    *,
    teacher_logits: Tensor | None = None,  # (..., Vt)
    teacher_topk: tuple[Tensor, Tensor] | None = None,  # ((..., k) ids, (..., k) logprobs)
    labels: Tensor | None = None,  # (...)
    divergence: DivergenceLike = "forward_kl",
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | Tensor | None = None,
    chunk_size: int | Literal["auto"] = "auto",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    softcap: float | None = None,
    return_parts: bool = False,
    impl: Impl = "eager",
    memory_budget: int | float | None = None,
    validate: bool = True,
    process_group: object = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_entropy: bool = False,
    fp32_logits: bool = False,
    precision: torch.dtype = torch.float64,
) -> Tensor | DistillOutput | tuple[Tensor | DistillOutput, Tensor]:
    """What :func:`kdfuse.fused_linear_distill` computes, with the full logits materialised.

    Same arguments (``chunk_size``, ``impl``, ``memory_budget`` and ``fp32_logits`` are accepted
    and ignored; it
    is single-process: no ``process_group``), plus ``precision``: every input is cast to it
    first (float64 by default) and all math runs in it. With V the student's vocabulary, for
    every row r of the flattened leading dims::

        s_r = cap_s(a_s · (h_r @ W_s.T + b_s))                  # (V,) student logits
        t_r = cap_t(a_t · (h'_r @ W_t[:V].T + b_t[:V]))  or  cap_t(a_t · teacher_logits_r[:V])
        a_s, a_t = student_logit_scale, teacher_logit_scale
        cap_m(x) = c_m · tanh(x / c_m), c_m = the model's own softcap, else softcap (none: x)
        soft_r = divergence(s_r / T, t_r / T)    or, with teacher_topk = (ids, logprobs),
        soft_r = divergence(s_r / T, ids_r, logprobs_r)   (a sparse divergence, kdfuse.topk)
        hard_r = cross_entropy(s_r, labels_r)  (temperature 1; 0 when hard_weight == 0)
        loss_r = soft_weight * soft_r + hard_weight * hard_r, and 0 where labels_r == ignore_index

    ``"mean"`` is Σ_r loss_r / max(#valid rows, 1), ``"sum"`` is Σ_r loss_r, either divided by
    ``normalizer`` instead when one is given; ``"none"`` returns loss_r shaped like the leading
    dims. ``return_parts`` also returns soft and hard, reduced the same way and detached;
    ``return_entropy`` the student's entropy H(softmax(s_r / T)) on valid rows, likewise, as
    ``(result, entropy)``.
    The teacher never receives gradients, and its rows where labels_r == ignore_index may hold
    anything (NaN, -inf, out-of-range top-k ids): they reach neither the value nor the gradient.
    """
    form = check_inputs(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        teacher_logits,
        labels,
        teacher_topk=teacher_topk,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        reduction=reduction,
        chunk_size=chunk_size,
        softcap=softcap,
        impl=impl,
        ignore_index=ignore_index,
        memory_budget=memory_budget,
    )
    check_normalizer(normalizer, reduction)
    if process_group is not None:
        raise ValueError("the reference is single-process: give it the whole weights, not a process_group")
    s_cap, t_cap, s_scale, t_scale = check_logit_transforms(
        softcap, student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale
    )
    div = resolve(divergence, sparse=form == "topk")
    vocab, width = student_weight.shape
    n = student_hidden[..., 0].numel()
    valid = torch.ones(n, dtype=torch.bool, device=student_hidden.device)
    if labels is not None:
        valid = labels.reshape(n).long() != ignore_index
    if form == "topk":
        teacher_topk = ignored_rows_as_padding(*(t.reshape(n, t.shape[-1]) for t in teacher_topk), valid)
    if validate:
        check_values(vocab, ignore_index, labels=labels, topk_ids=None if teacher_topk is None else teacher_topk[0])

    bias = None if student_bias is None else student_bias.to(precision)
    student = F.linear(student_hidden.reshape(n, width).to(precision), student_weight.to(precision), bias)
    student = _cap(s_scale * student, s_cap)
    if form == "topk":  # temperature and softcap on the student only
        ids, logprobs = teacher_topk
        soft = div(student / temperature, ids.long(), logprobs.to(precision))
    else:
        teacher = _dense_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, n, vocab, precision)
        # Ignored rows may hold anything: a neutral row there, so no NaN reaches the gradient.
        teacher = _cap(torch.where(valid[:, None], t_scale * teacher, 0), t_cap)
        soft = div(student / temperature, teacher / temperature)
    parts = _row_parts(div, student, soft, labels, valid, temperature, hard_weight, ignore_index)
    per_row = (soft_weight * parts[0] + hard_weight * parts[1], *parts)
    loss, soft, hard, entropy = _reduce(per_row, valid, reduction, normalizer, student_hidden.shape[:-1])
    out = DistillOutput(loss, soft.detach(), hard.detach()) if return_parts else loss
    return (out, entropy.detach()) if return_entropy else out
