"""TRL's distillation losses on kdfuse: a one-line swap for TRL 1.16's chunked kernel and GKD loss.

TRL 1.16's ``DistillationTrainer`` computes its loss with
``trl.trainer.distillation_trainer._chunked_divergence_loss``, looked up by name at every call;
GKD's trainer with ``GKDTrainer.generalized_jsd_loss``. This module provides both with their
exact signatures and semantics (read in the trl 1.16.0 wheel), on kdfuse::

    import kdfuse.trl
    kdfuse.trl.patch()          # both trainers now run kdfuse; the returned function undoes it

:func:`chunked_divergence_loss` differs from TRL's kernel in precision only: 16-bit inputs keep
16-bit logits with float32 math (as every kdfuse loss does; ``patch(fp32_logits=True)`` keeps
float32 logits as TRL does) and biases in the hidden states' dtype (TRL adds them in float32); a
float64 problem is computed in float64 (TRL's kernel computes float32); and an lm_head that is an
FSDP2 ``DTensor`` is gathered once per call with its gradient averaged back to the shards over
the data-parallel mesh (FSDP2's default reduction; TRL gathers it with a plain
``full_tensor()``). :func:`generalized_jsd_loss` gives the teacher's logits no gradient.

trl is an optional dependency (``pip install 'kdfuse[trl]'``): only :func:`patch` imports it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import divergences as D
from .divergences import Parametrized
from .fused import distill_logits, fused_linear_distill
from .registry import entry_of

__all__ = ["chunked_divergence_loss", "generalized_jsd_loss", "patch"]


def chunked_divergence_loss(
    student_hidden_states: Tensor,  # (B, K, Hs), aligned with the completion tokens
    teacher_hidden_states: Tensor,  # (B, K, Ht)
    student_lm_head_weight: Tensor,  # (V, Hs)
    teacher_lm_head_weight: Tensor,  # (V, Ht)
    completion_mask: Tensor,  # (B, K), nonzero where a token counts
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    fp32_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss``: (loss, entropy_sum, n_valid), 0-dim tensors.

    The generalized JSD(β) of each counted token (β = 0 forward KL(teacher‖student), β = 1
    reverse KL, exactly), of logits ``softcap(scale · (h Wᵀ + b)) / T`` per model; the loss is
    their sum over ``num_items_in_batch`` (no clamp), else over the number of counted tokens (at
    least 1). ``entropy_sum`` is the student's entropy at T summed over the counted tokens (no
    gradient), ``n_valid`` that count (int64). ``fp32_logits`` (not TRL's): keep float32 logits
    as TRL's kernel does (kdfuse.fused_linear_distill's option)."""
    valid = completion_mask.reshape(student_hidden_states.shape[:-1]) != 0
    n_valid = valid.sum()
    if num_items_in_batch is None:
        normalizer = n_valid.clamp(min=1).to(torch.float32)
    elif isinstance(num_items_in_batch, Tensor):
        normalizer = num_items_in_batch.to(student_hidden_states.device, torch.float32)
    else:
        normalizer = torch.tensor(float(num_items_in_batch), device=student_hidden_states.device)
    # TRL casts the heads to the hidden states' dtype (kdfuse takes one dtype per model, so the
    # biases too: TRL adds them in float32).
    dtype, teacher_dtype = student_hidden_states.dtype, teacher_hidden_states.dtype
    loss_sum, entropy_sum = fused_linear_distill(
        student_hidden_states,
        student_lm_head_weight.to(dtype),
        teacher_hidden_states,
        teacher_lm_head_weight.to(teacher_dtype),
        labels=torch.where(valid, 0, -100),  # (masks only: no cross-entropy)
        divergence=D.jsd(beta),
        temperature=temperature,
        reduction="sum",
        student_bias=None if student_lm_head_bias is None else student_lm_head_bias.to(dtype),
        teacher_bias=None if teacher_lm_head_bias is None else teacher_lm_head_bias.to(teacher_dtype),
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        return_entropy=True,
        validate=False,  # (the labels are 0 or ignored by construction)
        fp32_logits=fp32_logits,
    )
    return loss_sum / normalizer, entropy_sum.detach(), n_valid


def generalized_jsd_loss(
    student_logits: Tensor,  # (B, T, V), already aligned with labels (the caller shifts)
    teacher_logits: Tensor,  # (B, T, V)
    labels: Tensor | None = None,  # (B, T), -100 where a position does not count
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """TRL 1.16's GKD ``generalized_jsd_loss``, chunked over the rows (kdfuse.distill_logits):
    the generalized JSD(β) of softmax(logits / T) per position (β = 0 forward KL, β = 1 reverse
    KL, exactly), on the positions whose label is not -100 (labels only mask: no shift, no CE).
    ``num_items_in_batch`` given: the sum over it, whatever ``reduction``; else ``"batchmean"``
    the sum over the counted positions (at least 1; without labels over the first dim's size),
    ``"sum"`` the plain sum, ``"mean"`` the sum over the counted elements (positions × V), any
    other value (``"none"``) the element-wise terms of the counted positions, ``(n, V)`` (or of
    all, ``(B, T, V)``, without labels). The loss is float32 for 16-bit logits (TRL's is in the
    logits' dtype), and the teacher's logits get no gradient (GKD's teacher runs under
    ``no_grad``; TRL's function would differentiate them)."""
    divergence = D.jsd(beta)
    if reduction not in ("batchmean", "sum", "mean") and num_items_in_batch is None:
        return _jsd_terms(divergence, student_logits, teacher_logits, labels, temperature)
    mask = None if labels is None else labels != -100
    if num_items_in_batch is not None:
        normalizer = num_items_in_batch
    elif reduction == "batchmean":
        normalizer = mask.sum().clamp_min(1) if mask is not None else max(student_logits.shape[0], 1)
    elif reduction == "mean":
        normalizer = student_logits.numel() if mask is None else mask.sum() * student_logits.shape[-1]
    else:
        normalizer = None
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(student_logits.device, torch.float32)
    masks = None if mask is None else torch.where(mask, 0, -100)
    return distill_logits(
        student_logits,
        teacher_logits,
        labels=masks,
        divergence=divergence,
        temperature=temperature,
        reduction="sum",
        normalizer=normalizer,
        validate=False,
    )


def _jsd_terms(divergence: Parametrized, student_logits, teacher_logits, labels, temperature) -> Tensor:
    """The element-wise terms (``reduction="none"``): as large as the logits, so not chunked."""
    terms = entry_of(divergence.fn).terms
    args = [torch.tensor(v, dtype=torch.float32, device=student_logits.device) for v in divergence.args]
    log_s = (student_logits.float() / temperature).log_softmax(-1)
    log_t = (teacher_logits.detach().float() / temperature).log_softmax(-1)
    values = terms.fn(log_s, log_t, *args)
    return values if labels is None else values[labels != -100]


def patch(fp32_logits: bool = False) -> Callable[[], None]:
    """Swap TRL's distillation losses for kdfuse's: ``DistillationTrainer``'s chunked kernel
    (``trl.trainer.distillation_trainer._chunked_divergence_loss``) and ``GKDTrainer``'s
    ``generalized_jsd_loss``. ``fp32_logits=True``: the chunked loss keeps float32 logits, as
    TRL's kernel does (closer to float32, slower: docs/benchmarks.md). Returns the function that
    puts TRL's back."""
    import trl
    import trl.trainer.distillation_trainer as distillation
    from trl.experimental.gkd import gkd_trainer

    if not trl.__version__.startswith("1.16."):
        warnings.warn(
            f"kdfuse.trl follows TRL 1.16's losses; trl {trl.__version__} is installed: check that its "
            "_chunked_divergence_loss and generalized_jsd_loss still have 1.16's signatures and semantics",
            stacklevel=2,
        )

    before = distillation._chunked_divergence_loss, gkd_trainer.GKDTrainer.__dict__["generalized_jsd_loss"]
    distillation._chunked_divergence_loss = (
        functools.partial(chunked_divergence_loss, fp32_logits=True) if fp32_logits else chunked_divergence_loss
    )
    gkd_trainer.GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    def unpatch() -> None:
        distillation._chunked_divergence_loss = before[0]
        gkd_trainer.GKDTrainer.generalized_jsd_loss = before[1]

    return unpatch
