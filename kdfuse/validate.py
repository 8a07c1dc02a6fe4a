"""Argument checks for the public entry points: clear errors that name the argument and shapes.

Everything here reads only shapes, dtypes, devices and Python numbers, so it costs no device
sync, except the value checks (:func:`check_values`, :func:`start_value_check`): one sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from .env import MemoryBudget, check_memory_budget

__all__ = ["check_inputs", "check_normalizer", "check_values", "start_value_check"]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("compile", "eager")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _rows(t: Tensor, name: str) -> int:
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got shape {_shape(t)}")
    return math.prod(t.shape[:-1])


def _check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _real(value: object, name: str, wanted: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy scalar (NumPy registers its
    scalars as ``numbers.Real``), but not a bool (``temperature=True`` is a mistake, not 1.0).
    Otherwise raise ``ValueError`` saying ``name`` must be ``wanted``."""
    if isinstance(value, Tensor):
        # Not float(value), nor its repr in the message: reading a CUDA tensor's value syncs the device.
        raise ValueError(
            f"{name} must be a Python number ({wanted}), not a tensor (got shape {_shape(value)} on "
            f"{value.device}): converting it would sync the device, so pass {name}=float(...) instead"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def _check_finite(value: float, name: str) -> None:
    if not math.isfinite(_real(value, name, "a finite number")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_positive(value: float, name: str) -> None:
    number = _real(value, name, "a finite number > 0")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_ignore_index(ignore_index: int) -> None:
    """A Python int, not a bool: ``F.cross_entropy`` refuses anything else with a bare error."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}: pass a Python int, e.g. ignore_index=-100")


def _check_memory_budget(memory_budget: MemoryBudget | None) -> None:
    """Checked here, whatever ``chunk_size`` is: only ``"auto"`` reads the budget, so a bad one
    would otherwise pass silently with an int chunk size."""
    if memory_budget is None:
        return
    try:
        check_memory_budget(memory_budget)
    except ValueError as exc:
        raise ValueError(f"memory_budget: {exc}") from None


def _check_same_dtype(tensors: dict, what: str) -> None:
    """``tensors`` (name -> Tensor or None) all of one dtype: the matmul would otherwise fail
    with a bare "expected m1 and m2 to have the same dtype"."""
    given = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name}={str(dtype).removeprefix('torch.')}" for name, dtype in given.items())
        raise TypeError(f"{what} must share one dtype, got {listed}")


def _check_layout(t: Tensor, name: str, leading: tuple, student_hidden: Tensor, trailing: int = 1) -> None:
    """Row-aligned tensors must have student_hidden's leading dims, or be flattened to N rows.

    Equal row counts alone would accept e.g. labels of shape (T, B) for hidden states (B, T, H):
    the rows would silently pair up wrongly. A flattened side (at most one leading dim) is fine.
    """
    own = tuple(t.shape[: t.dim() - trailing]) if trailing else tuple(t.shape)
    if own != leading and len(own) > 1 and len(leading) > 1:
        raise ValueError(
            f"{name}'s leading dims {tuple(own)} do not match student_hidden's {tuple(leading)} "
            f"(same number of rows, different layout: give the same leading dims, or flatten them): "
            f"{name} {_shape(t)}, student_hidden {_shape(student_hidden)}"
        )


def check_inputs(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    divergence: object = None,
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
) -> None:
    """Raise ``ValueError``/``TypeError`` for anything fused_linear_distill cannot compute.

    Reads shapes, dtypes, devices and Python arguments only (no device sync), so it runs on every
    call; the checks of tensor values are :func:`start_value_check`'s."""
    _check_float(student_hidden, "student_hidden")
    _check_float(student_weight, "student_weight")
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must be (V, Hs), got shape {_shape(student_weight)}")
    vocab, width = student_weight.shape
    if width == 0:
        raise ValueError(f"student_weight has Hs=0 (no hidden features): student_weight {_shape(student_weight)}")
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != width:
        raise ValueError(
            f"student_hidden's last dim must equal student_weight's Hs={width}: "
            f"student_hidden {_shape(student_hidden)}, student_weight {_shape(student_weight)}"
        )
    rows = _rows(student_hidden, "student_hidden")
    leading = tuple(student_hidden.shape[:-1])
    tensors = {"student_hidden": student_hidden, "student_weight": student_weight}

    dense = teacher_logits is not None
    linear = teacher_hidden is not None or teacher_weight is not None
    sparse = teacher_topk is not None
    if dense + linear + sparse != 1:
        raise ValueError(
            "give exactly one teacher: teacher_hidden + teacher_weight, teacher_logits, or teacher_topk "
            f"(got teacher_hidden={'set' if teacher_hidden is not None else None}, "
            f"teacher_weight={'set' if teacher_weight is not None else None}, "
            f"teacher_logits={'set' if dense else None}, teacher_topk={'set' if sparse else None})"
        )
    if divergence is not None and callable(divergence):
        is_sparse = bool(getattr(divergence, "__kdfuse_sparse__", False))
        name = getattr(divergence, "__name__", repr(divergence))
        if sparse and not is_sparse:
            raise ValueError(f"teacher_topk needs a sparse divergence from kdfuse.topk (e.g. 'topk_forward_kl_renormalize'), got {name}")
        if not sparse and is_sparse:
            raise ValueError(f"divergence {name} takes a top-k teacher: pass teacher_topk=(ids, logprobs)")
    teacher_vocab = None
    if sparse:
        if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
            raise TypeError("teacher_topk must be a pair (ids, logprobs)")
        ids, logprobs = teacher_topk
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"teacher_topk ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        _check_float(logprobs, "teacher_topk logprobs")
        if ids.shape != logprobs.shape or ids.dim() < 1 or _rows(ids, "teacher_topk ids") != rows:
            raise ValueError(
                f"teacher_topk ids and logprobs must both be (..., k) with {rows} rows: "
                f"ids {_shape(ids)}, logprobs {_shape(logprobs)}, student_hidden {_shape(student_hidden)}"
            )
        if ids.shape[-1] > vocab:
            raise ValueError(f"teacher_topk has k={ids.shape[-1]} > the student's vocabulary {vocab}")
        _check_layout(ids, "teacher_topk ids", leading, student_hidden)
        tensors.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
    elif linear:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        _check_float(teacher_hidden, "teacher_hidden")
        _check_float(teacher_weight, "teacher_weight")
        if teacher_weight.dim() == 2 and teacher_weight.shape[1] == 0:
            raise ValueError(f"teacher_weight has Ht=0 (no hidden features): teacher_weight {_shape(teacher_weight)}")
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                "teacher_hidden's last dim must equal teacher_weight's Ht: "
                f"teacher_hidden {_shape(teacher_hidden)}, teacher_weight {_shape(teacher_weight)}"
            )
        if _rows(teacher_hidden, "teacher_hidden") != rows:
            raise ValueError(
                f"teacher_hidden has {_rows(teacher_hidden, 'teacher_hidden')} rows, student_hidden "
                f"{rows}: shapes {_shape(teacher_hidden)} vs {_shape(student_hidden)}"
            )
        if teacher_weight.shape[0] < vocab:
            raise ValueError(
                f"teacher vocabulary {teacher_weight.shape[0]} is smaller than the student's {vocab}: "
                f"teacher_weight {_shape(teacher_weight)}, student_weight {_shape(student_weight)}"
            )
        _check_layout(teacher_hidden, "teacher_hidden", leading, student_hidden)
        tensors.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
        teacher_vocab = teacher_weight.shape[0]
    elif dense:
        _check_float(teacher_logits, "teacher_logits")
        if _rows(teacher_logits, "teacher_logits") != rows:
            raise ValueError(
                f"teacher_logits has {_rows(teacher_logits, 'teacher_logits')} rows, student_hidden "
                f"{rows}: shapes {_shape(teacher_logits)} vs {_shape(student_hidden)}"
            )
        if teacher_logits.shape[-1] < vocab:
            raise ValueError(
                f"teacher_logits' vocabulary {teacher_logits.shape[-1]} is smaller than the student's "
                f"{vocab}: teacher_logits {_shape(teacher_logits)}, student_weight {_shape(student_weight)}"
            )
        _check_layout(teacher_logits, "teacher_logits", leading, student_hidden)
        tensors["teacher_logits"] = teacher_logits
        teacher_vocab = teacher_logits.shape[-1]

    for bias, name, size in ((student_bias, "student_bias", vocab), (teacher_bias, "teacher_bias", None)):
        if bias is None:
            continue
        _check_float(bias, name)
        expected = size if size is not None else (teacher_vocab if linear else None)
        if expected is None:
            raise ValueError("teacher_bias goes with teacher_weight, not with teacher_logits")
        if tuple(bias.shape) != (expected,):
            raise ValueError(f"{name} must have shape ({expected},), got {_shape(bias)}")
        tensors[name] = bias

    _check_same_dtype(
        {"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias},
        "the student's hidden states, weight and bias",
    )
    if linear:
        _check_same_dtype(
            {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias},
            "the teacher's hidden states, weight and bias",
        )

    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.numel() != rows:
            raise ValueError(
                f"labels has {labels.numel()} elements, student_hidden {rows} rows: "
                f"shapes {_shape(labels)} vs {_shape(student_hidden)}"
            )
        _check_layout(labels, "labels", leading, student_hidden, trailing=0)
        tensors["labels"] = labels
    elif hard_weight != 0:
        raise ValueError(f"hard_weight={hard_weight} needs labels for the cross-entropy")

    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))

    _check_positive(temperature, "temperature")
    _check_finite(soft_weight, "soft_weight")
    _check_finite(hard_weight, "hard_weight")
    if softcap is not None:
        _check_positive(softcap, "softcap")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if chunk_size != "auto" and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
    _check_ignore_index(ignore_index)
    _check_memory_budget(memory_budget)


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
    _check_ignore_index(ignore_index)  # also called on its own, through check_values
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


def check_normalizer(normalizer: float | Tensor | None, reduction: str) -> None:
    """A normalizer is a finite number > 0 or a one-element tensor, and only with "mean"/"sum".

    A tensor's value is not read (that would be a host sync); its shape is checked."""
    if normalizer is None:
        return
    if reduction == "none":
        raise ValueError("normalizer has no effect with reduction='none': pass it with 'mean' or 'sum'")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {_shape(normalizer)}")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a tensor, got {type(normalizer).__name__}")
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
