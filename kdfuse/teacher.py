"""The teacher inside the engine: one tagged value for each of the three forms a call gives it.

* :class:`HiddenTeacher`: hidden states and lm_head weight; its logits are computed a block of
  rows at a time, without gradient;
* :class:`LogitsTeacher`: dense logits the caller holds (e.g. stored offline), read in place;
* :class:`TopkTeacher`: the teacher's top-k ids and log-probs, for the sparse divergences.

Each knows its ``form`` (what the tuning key and the memory estimate depend on), its ``dim`` (Ht
or k) and how to give a chunk of rows to the chunk functions (:meth:`rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from .topk import ignored_rows_as_padding

__all__ = [
    "TEACHER_FORMS",
    "TEACHER_ROWS",
    "HiddenTeacher",
    "LogitsTeacher",
    "Teacher",
    "TeacherForm",
    "TopkTeacher",
    "flat_teacher",
    "project",
    "tensors_of",
]

TeacherForm = Literal["hidden", "logits", "topk"]
TEACHER_FORMS: tuple[str, ...] = get_args(TeacherForm)

TEACHER_ROWS = 2048
"""Rows of a :class:`HiddenTeacher`'s logits computed at a time where the chunk kernel writes the
logit gradient over the student's logits (kdfuse.engine): half a 4096-row chunk, the chunk the
tuner picks at V = 128k, so a chunk holds 0.5 GiB of teacher logits there instead of 1 GiB."""


def project(
    hidden: Tensor,  # (C, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    fp32: bool = False,
) -> Tensor:
    """(C, V) logits ``hidden @ weight.T + bias``, in the inputs' dtype, or with ``fp32`` (16-bit
    inputs) in float32: the GEMM's float32 accumulators are kept, not rounded to 16 bits (a bf16
    logit of magnitude 16 is off by up to 2^-5). On CUDA one GEMM writes float32 directly; elsewhere
    the inputs are widened first (the same products, exact in float32)."""
    if not fp32 or hidden.dtype not in (torch.float16, torch.bfloat16):
        return F.linear(hidden, weight, bias)
    if hidden.is_cuda:
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:  # (no float32-output 16-bit GEMM on the CPU)
        logits = hidden.float() @ weight.float().t()
    return logits if bias is None else logits.add_(bias.float())


@dataclass(frozen=True)
class HiddenTeacher:
    hidden: Tensor  # (N, Ht)
    weight: Tensor  # (V, Ht), cut to the student's vocabulary
    bias: Tensor | None  # (V,)
    form: ClassVar[TeacherForm] = "hidden"

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def rows(self, rows: slice, fp32: bool = False) -> tuple[Tensor]:
        """((C, V) raw logits,) of ``rows`` (``fp32``: see :func:`project`)."""
        return (project(self.hidden[rows], self.weight, self.bias, fp32),)


@dataclass(frozen=True)
class LogitsTeacher:
    logits: Tensor  # (N, V), cut to the student's vocabulary
    form: ClassVar[TeacherForm] = "logits"
    dim: ClassVar[None] = None

    def rows(self, rows: slice) -> tuple[Tensor]:
        return (self.logits[rows],)


@dataclass(frozen=True)
class TopkTeacher:
    ids: Tensor  # (N, k) int64
    logprobs: Tensor  # (N, k)
    form: ClassVar[TeacherForm] = "topk"

    @property
    def dim(self) -> int:
        return self.ids.shape[1]

    def rows(self, rows: slice) -> tuple[Tensor, Tensor]:
        """((C, k) ids, (C, k) log-probs) of ``rows``."""
        return self.ids[rows], self.logprobs[rows]


Teacher = HiddenTeacher | LogitsTeacher | TopkTeacher


def flat_teacher(
    form: TeacherForm,
    rows: int,
    vocab: int,
    valid: Tensor,  # (N,) bool
    hidden: Tensor | None,  # (..., Ht)
    weight: Tensor | None,  # (Vt, Ht)
    bias: Tensor | None,  # (Vt,)
    logits: Tensor | None,  # (..., Vt)
    topk: tuple[Tensor, Tensor] | None,  # ((..., k), (..., k))
) -> Teacher:
    """A call's teacher (checked by kdfuse.validate.check_inputs) flattened to ``rows`` rows and
    cut to the student's ``vocab``; a top-k teacher's ignored rows become padding (see
    kdfuse.topk.ignored_rows_as_padding). Last dims are given explicitly: ``reshape(n, -1)`` is
    ambiguous (an error) when n == 0."""
    if form == "hidden":
        return HiddenTeacher(
            hidden.reshape(rows, hidden.shape[-1]), weight[:vocab], None if bias is None else bias[:vocab]
        )
    if form == "logits":
        return LogitsTeacher(logits.reshape(rows, logits.shape[-1])[:, :vocab])
    ids, logprobs = ignored_rows_as_padding(*(t.reshape(rows, t.shape[-1]) for t in topk), valid)
    return TopkTeacher(ids.long(), logprobs)


def tensors_of(value: object) -> list[Tensor | None]:
    """A dataclass's fields, in order (not ``dataclasses.astuple``, which deep-copies tensors)."""
    return [getattr(value, f.name) for f in fields(value)]
