"""Argument checks: the one set of validators, and the checks of a distillation call's inputs.

Every error names the argument and, for tensors, the shapes involved. Everything here reads only
shapes, dtypes, devices and Python numbers, so it costs no device sync, except the value checks
(:func:`check_values`, :func:`start_value_check`): one sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .env import MemoryBudget, check_memory_budget

__all__ = [
    "IMPLS",
    "REDUCTIONS",
    "check_choice",
    "check_chunk_size",
    "check_finite",
    "check_float_tensor",
    "check_ignore_index",
    "check_inputs",
    "check_int",
    "check_logit_transforms",
    "check_normalizer",
    "check_positive",
    "check_unit",
    "check_values",
    "shape",
    "start_value_check",
]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("compile", "eager")


# --------------------------------------------------------------------------------------------
# Validators of one argument: each takes (name, value) and returns the value normalised.
# --------------------------------------------------------------------------------------------


def shape(t: Tensor) -> str:
    """``(2, 3)``: a tensor's shape for an error message."""
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _real(name: str, value: object, wanted: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy scalar (NumPy registers its
    scalars as ``numbers.Real``), but not a bool (``temperature=True`` is a mistake, not 1.0)."""
    if isinstance(value, Tensor):
        # Not float(value), nor its repr in the message: reading a CUDA tensor's value syncs the device.
        raise ValueError(
            f"{name} must be a Python number ({wanted}), not a tensor (got shape {shape(value)} on "
            f"{value.device}): converting it would sync the device, so pass {name}=float(...) instead"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def check_finite(name: str, value: float) -> float:
    """A finite real number, as a float."""
    number = _real(name, value, "a finite number")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_positive(name: str, value: float) -> float:
    """A finite real number > 0, as a float."""
    number = _real(name, value, "a finite number > 0")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_unit(name: str, value: float) -> float:
    """A real number in [0, 1], as a float (so a NumPy scalar names a divergence as 0.3 does)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return number


def check_int(name: str, value: int, low: int = 1, high: int | None = None, high_name: str = "") -> int:
    """A Python int (not a bool) in [low, high]; ``high_name`` names the bound in the message
    (``"k must be an int in [1, V=5]"``)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"{high_name}={high}" if high_name else str(high)
        bounds = f">= {low}" if high is None else f"in [{low}, {bound}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_int_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t


def check_ignore_index(ignore_index: int) -> int:
    """A Python int, not a bool: ``F.cross_entropy`` refuses anything else with a bare error."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}: pass a Python int, e.g. ignore_index=-100")
    return ignore_index


def _check_memory_budget(memory_budget: MemoryBudget | None) -> None:
    """Checked whatever ``chunk_size`` is: only ``"auto"`` reads the budget, so a bad one would
    otherwise pass silently with an int chunk size."""
    if memory_budget is not None:
        try:
            check_memory_budget(memory_budget)
        except ValueError as exc:
            raise ValueError(f"memory_budget: {exc}") from None


def check_chunk_size(chunk_size: int | str) -> int | str:
    """An int >= 1 or ``"auto"``."""
    if chunk_size != "auto":
        try:
            check_int("chunk_size", chunk_size)
        except ValueError:
            raise ValueError(f"chunk_size must be an int >= 1 or 'auto', got {chunk_size!r}") from None
    return chunk_size


# --------------------------------------------------------------------------------------------
# A distillation call's tensors.
# --------------------------------------------------------------------------------------------


def _rows(name: str, t: Tensor) -> int:
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got shape {shape(t)}")
    return math.prod(t.shape[:-1])


def _check_same_dtype(what: str, tensors: dict[str, Tensor | None]) -> None:
    """``tensors`` (name -> Tensor or None) all of one dtype: the matmul would otherwise fail
    with a bare "expected m1 and m2 to have the same dtype"."""
    given = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name}={str(dtype).removeprefix('torch.')}" for name, dtype in given.items())
        raise TypeError(f"{what} must share one dtype, got {listed}")


@dataclass(frozen=True)
class _Student:
    """The student's rows as the checks name them: its hidden states (with an lm_head) or its
    logits (``distill_logits``), and where its vocabulary comes from, for messages."""

    t: Tensor  # (..., Hs) or (..., V)
    name: str  # "student_hidden" or "student_logits"
    vocab: int
    source: str  # e.g. "student_weight (5, 4)"

    @property
    def rows(self) -> int:
        return _rows(self.name, self.t)


def _check_layout(name: str, t: Tensor, student: _Student, trailing: int = 1) -> None:
    """Row-aligned tensors must have the student's leading dims, or be flattened to N rows.

    Equal row counts alone would accept e.g. labels of shape (T, B) for hidden states (B, T, H):
    the rows would silently pair up wrongly. A flattened side (at most one leading dim) is fine.
    """
    leading = tuple(student.t.shape[:-1])
    own = tuple(t.shape[: t.dim() - trailing]) if trailing else tuple(t.shape)
    if own != leading and len(own) > 1 and len(leading) > 1:
        raise ValueError(
            f"{name}'s leading dims {own} do not match {student.name}'s {leading} "
            f"(same number of rows, different layout: give the same leading dims, or flatten them): "
            f"{name} {shape(t)}, {student.name} {shape(student.t)}"
        )


def _check_row_aligned(name: str, t: Tensor, student: _Student) -> None:
    """``t`` is (..., X) with the student's rows, in its layout."""
    if _rows(name, t) != student.rows:
        raise ValueError(
            f"{name} has {_rows(name, t)} rows, {student.name} {student.rows}: shapes {shape(t)} vs {shape(student.t)}"
        )
    _check_layout(name, t, student)


def _check_student(student_hidden: Tensor, student_weight: Tensor | None) -> _Student:
    if student_weight is None:  # the student's logits themselves
        check_float_tensor("student_logits", student_hidden)
        if student_hidden.dim() < 1:
            raise ValueError(f"student_logits must be (..., V), got shape {shape(student_hidden)}")
        v = student_hidden.shape[-1]
        return _Student(student_hidden, "student_logits", v, f"student_logits {shape(student_hidden)}")
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("student_weight", student_weight)
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must be (V, Hs), got shape {shape(student_weight)}")
    if student_weight.shape[1] == 0:
        raise ValueError(f"student_weight has Hs=0 (no hidden features): student_weight {shape(student_weight)}")
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden's last dim must equal student_weight's Hs={student_weight.shape[1]}: "
            f"student_hidden {shape(student_hidden)}, student_weight {shape(student_weight)}"
        )
    v = student_weight.shape[0]
    return _Student(student_hidden, "student_hidden", v, f"student_weight {shape(student_weight)}")


def _check_one_teacher(teacher_hidden, teacher_weight, teacher_logits, teacher_topk) -> str:
    """The teacher's form: ``"hidden"``, ``"logits"`` or ``"topk"``; exactly one must be given."""
    given = {
        "hidden": teacher_hidden is not None or teacher_weight is not None,
        "logits": teacher_logits is not None,
        "topk": teacher_topk is not None,
    }
    if sum(given.values()) != 1:

        def state(t: object) -> str | None:
            return "set" if t is not None else None

        raise ValueError(
            "give exactly one teacher: teacher_hidden + teacher_weight, teacher_logits, or teacher_topk "
            f"(got teacher_hidden={state(teacher_hidden)}, teacher_weight={state(teacher_weight)}, "
            f"teacher_logits={state(teacher_logits)}, teacher_topk={state(teacher_topk)})"
        )
    return next(form for form, present in given.items() if present)


def _check_hidden_teacher(teacher_hidden, teacher_weight, student: _Student) -> None:
    vocab = student.vocab
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    check_float_tensor("teacher_hidden", teacher_hidden)
    check_float_tensor("teacher_weight", teacher_weight)
    if teacher_weight.dim() != 2:
        raise ValueError(f"teacher_weight must be (Vt, Ht), got shape {shape(teacher_weight)}")
    width = teacher_weight.shape[1]
    if width == 0:
        raise ValueError(f"teacher_weight has Ht=0 (no hidden features): teacher_weight {shape(teacher_weight)}")
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != width:
        raise ValueError(
            f"teacher_hidden's last dim must equal teacher_weight's Ht={width}: "
            f"teacher_hidden {shape(teacher_hidden)}, teacher_weight {shape(teacher_weight)}"
        )
    _check_row_aligned("teacher_hidden", teacher_hidden, student)
    if teacher_weight.shape[0] < vocab:
        raise ValueError(
            f"teacher vocabulary {teacher_weight.shape[0]} is smaller than the student's {vocab}: "
            f"teacher_weight {shape(teacher_weight)}, {student.source}"
        )


def _check_logits_teacher(teacher_logits, student: _Student) -> None:
    check_float_tensor("teacher_logits", teacher_logits)
    _check_row_aligned("teacher_logits", teacher_logits, student)
    if teacher_logits.shape[-1] < student.vocab:
        raise ValueError(
            f"teacher_logits' vocabulary {teacher_logits.shape[-1]} is smaller than the student's {student.vocab}: "
            f"teacher_logits {shape(teacher_logits)}, {student.source}"
        )


def _check_topk_teacher(teacher_topk, student: _Student, vocab: int | None) -> None:
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
        raise TypeError("teacher_topk must be a pair (ids, logprobs)")
    ids, logprobs = teacher_topk
    _check_int_tensor("teacher_topk ids", ids)
    check_float_tensor("teacher_topk logprobs", logprobs)
    rows = student.rows
    if ids.shape != logprobs.shape or ids.dim() < 1 or _rows("teacher_topk ids", ids) != rows:
        raise ValueError(
            f"teacher_topk ids and logprobs must both be (..., k) with {rows} rows: "
            f"ids {shape(ids)}, logprobs {shape(logprobs)}, {student.name} {shape(student.t)}"
        )
    if vocab is not None and ids.shape[-1] > vocab:
        raise ValueError(f"teacher_topk has k={ids.shape[-1]} > the student's vocabulary {vocab}")
    _check_layout("teacher_topk ids", ids, student)


def _check_biases(student_bias, teacher_bias, teacher_weight, form: str, vocab: int) -> None:
    if student_bias is not None:
        check_float_tensor("student_bias", student_bias)
        if tuple(student_bias.shape) != (vocab,):
            raise ValueError(f"student_bias must have shape ({vocab},), got {shape(student_bias)}")
    if teacher_bias is not None:
        check_float_tensor("teacher_bias", teacher_bias)
        if form != "hidden":
            raise ValueError("teacher_bias goes with teacher_weight, not with teacher_logits or teacher_topk")
        if tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
            raise ValueError(f"teacher_bias must have shape ({teacher_weight.shape[0]},), got {shape(teacher_bias)}")


def _check_labels(labels, student: _Student, hard_weight: float) -> None:
    if labels is None:
        if hard_weight != 0:
            raise ValueError(f"hard_weight={hard_weight} needs labels for the cross-entropy")
        return
    _check_int_tensor("labels", labels)
    if labels.numel() != student.rows:
        raise ValueError(
            f"labels has {labels.numel()} elements, {student.name} {student.rows} rows: "
            f"shapes {shape(labels)} vs {shape(student.t)}"
        )
    _check_layout("labels", labels, student, trailing=0)


def _check_one_device(tensors: dict[str, Tensor | None]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))


def _check_options(
    temperature, soft_weight, hard_weight, softcap, reduction, impl, chunk_size, ignore_index, memory_budget
) -> None:
    check_positive("temperature", temperature)
    check_finite("soft_weight", soft_weight)
    check_finite("hard_weight", hard_weight)
    if softcap is not None:
        check_positive("softcap", softcap)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("impl", impl, IMPLS)
    check_chunk_size(chunk_size)
    check_ignore_index(ignore_index)
    _check_memory_budget(memory_budget)


def check_inputs(
    student_hidden: Tensor,
    student_weight: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    reduction: str,
    chunk_size: int | str,
    softcap: float | None,
    impl: str,
    ignore_index: int = -100,
    memory_budget: MemoryBudget | None = None,
    sharded: bool = False,
) -> str:
    """Raise ``ValueError``/``TypeError`` for anything ``fused_linear_distill`` cannot compute;
    return the teacher's form (``"hidden"``, ``"logits"`` or ``"topk"``).

    Reads shapes, dtypes, devices and Python arguments only (no device sync), so it runs on every
    call; the checks of tensor values are :func:`start_value_check`'s. ``sharded``: the weights
    are this rank's rows of a vocabulary split over a process group (its size is checked later).
    ``student_weight=None``: ``student_hidden`` holds the student's logits (``distill_logits``)."""
    student = _check_student(student_hidden, student_weight)
    vocab = student.vocab
    form = _check_one_teacher(teacher_hidden, teacher_weight, teacher_logits, teacher_topk)
    if form == "hidden":
        _check_hidden_teacher(teacher_hidden, teacher_weight, student)
    elif form == "logits":
        _check_logits_teacher(teacher_logits, student)
    else:
        _check_topk_teacher(teacher_topk, student, None if sharded else vocab)
    if student_weight is None and student_bias is not None:
        raise ValueError("student_bias goes with student_weight, not with student_logits")
    _check_biases(student_bias, teacher_bias, teacher_weight, form, vocab)
    _check_same_dtype(
        "the student's hidden states, weight and bias",
        {"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias},
    )
    if form == "hidden":
        _check_same_dtype(
            "the teacher's hidden states, weight and bias",
            {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias},
        )
    _check_labels(labels, student, hard_weight)
    ids, logprobs = teacher_topk if form == "topk" else (None, None)
    _check_one_device(
        {
            "student_hidden": student_hidden,
            "student_weight": student_weight,
            "student_bias": student_bias,
            "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight,
            "teacher_bias": teacher_bias,
            "teacher_logits": teacher_logits,
            "teacher_topk_ids": ids,
            "teacher_topk_logprobs": logprobs,
            "labels": labels,
        }
    )
    _check_options(
        temperature, soft_weight, hard_weight, softcap, reduction, impl, chunk_size, ignore_index, memory_budget
    )
    return form


# --------------------------------------------------------------------------------------------
# Values: one device sync.
# --------------------------------------------------------------------------------------------


def start_value_check(
    vocab: int, ignore_index: int, *, labels: Tensor | None, topk_ids: Tensor | None
) -> Callable[[], None]:
    """Queue the checks of :func:`check_values` on the device and return the function that waits
    for their result and raises ``ValueError``.

    On CUDA the counts travel to pinned host memory behind an event, so the wait covers the work
    queued before this call and the checks, not what the caller queues in between: a caller that
    queues work which cannot fault on bad values (the first chunk's logits GEMMs) keeps the device
    busy while the host waits.
    """
    check_ignore_index(ignore_index)  # also called on its own, through check_values
    bad = []
    if labels is not None and labels.numel():
        flat = labels.reshape(-1)
        bad.append(((flat != ignore_index) & ((flat < 0) | (flat >= vocab))).sum())
    if topk_ids is not None and topk_ids.numel():
        bad.append(((topk_ids < 0) | (topk_ids >= vocab)).sum())
    if not bad:
        return lambda: None
    counts = torch.stack(bad)
    event = None
    if counts.is_cuda:
        counts = counts.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()

    def finish() -> None:
        if event is not None:
            event.synchronize()  # the one sync
        found = counts.tolist()
        if labels is not None and labels.numel() and found[0]:
            raise ValueError(
                f"labels has {found[0]} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index}"
            )
        if topk_ids is not None and topk_ids.numel() and found[-1]:
            raise ValueError(f"teacher_topk ids has {found[-1]} value(s) outside [0, {vocab})")

    return finish


def check_values(vocab: int, ignore_index: int, *, labels: Tensor | None, topk_ids: Tensor | None) -> None:
    """Raise ``ValueError`` for labels outside ``[0, vocab)`` (other than ``ignore_index``) or
    top-k ids outside ``[0, vocab)``. One device-to-host sync for all checks together."""
    start_value_check(vocab, ignore_index, labels=labels, topk_ids=topk_ids)()


def check_logit_transforms(
    softcap: float | None,
    student_softcap: float | None,
    teacher_softcap: float | None,
    student_logit_scale: float,
    teacher_logit_scale: float,
) -> tuple[float | None, float | None, float, float]:
    """(student cap, teacher cap, student scale, teacher scale) as Python floats: each model's
    own softcap, else ``softcap``; the scales finite numbers."""
    for name, value in (
        ("softcap", softcap),
        ("student_softcap", student_softcap),
        ("teacher_softcap", teacher_softcap),
    ):
        if value is not None:
            check_positive(name, value)
    s_cap = student_softcap if student_softcap is not None else softcap
    t_cap = teacher_softcap if teacher_softcap is not None else softcap
    scales = (
        check_finite("student_logit_scale", student_logit_scale),
        check_finite("teacher_logit_scale", teacher_logit_scale),
    )
    return (None if s_cap is None else float(s_cap), None if t_cap is None else float(t_cap), *scales)


def check_normalizer(normalizer: float | Tensor | None, reduction: str) -> None:
    """A normalizer is a finite number > 0 or a one-element tensor, and only with "mean"/"sum".

    A tensor's value is not read (that would be a host sync); its shape is checked."""
    if normalizer is None:
        return
    if reduction == "none":
        raise ValueError("normalizer has no effect with reduction='none': pass it with 'mean' or 'sum'")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {shape(normalizer)}")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a tensor, got {type(normalizer).__name__}")
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
