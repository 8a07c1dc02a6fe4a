"""Reliability: bad inputs get clear errors, edge cases stay finite, nothing recompiles or corrupts.

What test_fused.py / test_compile.py / test_autotune.py / test_tuning.py already check is not
repeated here; this file adds, per section:

1. Bad input -> a ``ValueError``/``TypeError`` that names the argument *and the shapes* (the
   existing table in test_fused.py only matches a keyword), plus the checks added to
   kdfuse/validate.py (dtype mismatches, row layout, Hs = 0, bools for numbers, ignore_index),
   labels out of range with ``validate=True``/``False``, wrong-shaped user divergences, mixed
   devices (the "meta" device stands in for a second device on CPU-only machines).
2. Valid but unusual inputs: strided / expanded views, leading dims of rank 1..4, N = 0 in low
   precision, all rows ignored in float16, tied and sliced weights, partial ``requires_grad``.
3. Numerical edge cases against the float64 reference: 16-bit logits near their range limits,
   temperatures 0.05 and 20, masked (-inf) teacher vocabulary, one-hot-like teachers, identical
   student and teacher, divergence parameters at and next to 0 and 1.
5. One compiled graph (CPU compiles cost ~10 s): 20 row counts, new divergence parameter,
   temperature, weights and edge-case values, without a recompile.
6. Autotuning faults at the kdfuse level (``chunk_size="auto"`` on a faked CUDA device): failing
   candidates are skipped, a corrupt cache is rebuilt with one warning, an unwritable cache dir
   falls back to memory, 8 processes tuning one key leave one valid file.

(Section 4, the fuzz suite, is tests/test_fuzz.py; section 7, N = 131072 on a GPU,
tests/test_gpu_long.py.) Known bugs are pinned by ``xfail(strict=True)`` tests, each naming the
file, the cause and a fix: once the bug is fixed the test passes, which strict mode reports as a
failure, so the marker goes with the fix.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from bench_stubs import SweepCalls
from test_fused import (  # tests/ is on sys.path under pytest's default import mode
    LOW_PRECISION_BOUNDS,
    Problem,
    assert_close_scaled,
    assert_low_precision_close,
    compare_to_reference,
    fixed_problem,
    grads_of,
    rel_err,
)
from torch._dynamo.utils import counters

import autotune.cache
from autotune import TuningCacheWarning
from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref, sweep, tuning, validate

F64 = torch.float64
INF = float("inf")
NAN = float("nan")
HALF = (torch.float16, torch.bfloat16)


def _name(x) -> str:
    """Test ids: a divergence's or dtype's name."""
    return getattr(x, "__name__", str(x)).removeprefix("torch.")


def _inputs(leading=(2, 3), hs=4, ht=6, vocab=5, dtype=torch.float32, seed=0, teacher="hidden", labels=True):
    gen = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(*leading, hs, generator=gen, dtype=dtype),
        student_weight=torch.randn(vocab, hs, generator=gen, dtype=dtype),
    )
    if teacher == "hidden":
        t.update(
            teacher_hidden=torch.randn(*leading, ht, generator=gen, dtype=dtype),
            teacher_weight=torch.randn(vocab, ht, generator=gen, dtype=dtype),
        )
    else:
        t["teacher_logits"] = torch.randn(*leading, vocab, generator=gen, dtype=dtype)
    if labels:
        t["labels"] = torch.randint(0, vocab, leading, generator=gen)
    return t


# =================================================================================================
# 1. Bad input -> clear error naming the argument and the shapes
# =================================================================================================

LOGITS = dict(teacher_hidden=None, teacher_weight=None)  # with teacher_logits= : the dense form

BAD_INPUTS = {
    # name: (change to _inputs(), error, regex the message must match)
    "hidden/weight width": (
        dict(student_weight=torch.randn(5, 3)),
        ValueError,
        r"Hs=3: student_hidden \(2, 3, 4\), student_weight \(5, 3\)",
    ),
    "teacher hidden/weight width": (
        dict(teacher_weight=torch.randn(5, 7)),
        ValueError,
        r"Ht=7: teacher_hidden \(2, 3, 6\), teacher_weight \(5, 7\)",
    ),
    "teacher rows": (
        dict(teacher_hidden=torch.randn(7, 6)),
        ValueError,
        r"teacher_hidden has 7 rows, student_hidden 6: shapes \(7, 6\) vs \(2, 3, 4\)",
    ),
    "teacher logits rows": (
        dict(LOGITS, teacher_logits=torch.randn(2, 4, 5)),
        ValueError,
        r"teacher_logits has 8 rows, student_hidden 6: shapes \(2, 4, 5\) vs \(2, 3, 4\)",
    ),
    "labels rows": (
        dict(labels=torch.zeros(7, dtype=torch.long)),
        ValueError,
        r"labels has 7 elements, student_hidden 6 rows: shapes \(7\) vs \(2, 3, 4\)",
    ),
    # Same row count, transposed layout: rows would pair up wrongly (added to validate.py).
    "labels layout": (
        dict(labels=torch.zeros(3, 2, dtype=torch.long)),
        ValueError,
        r"labels's leading dims \(3, 2\) do not match student_hidden's \(2, 3\)",
    ),
    "teacher layout": (
        dict(teacher_hidden=torch.randn(3, 2, 6)),
        ValueError,
        r"teacher_hidden's leading dims \(3, 2\) do not match student_hidden's \(2, 3\)",
    ),
    "teacher logits layout": (
        dict(LOGITS, teacher_logits=torch.randn(3, 2, 5)),
        ValueError,
        r"teacher_logits's leading dims \(3, 2\) do not match",
    ),
    "teacher logits vocab": (
        dict(LOGITS, teacher_logits=torch.randn(2, 3, 4)),
        ValueError,
        (
            r"vocabulary 4 is smaller than the student's 5: teacher_logits \(2, 3, 4\), "
            r"student_weight \(5, 4\)"
        ),
    ),
    "teacher weight vocab": (
        dict(teacher_weight=torch.randn(4, 6)),
        ValueError,
        r"teacher vocabulary 4 is smaller than the student's 5: teacher_weight \(4, 6\)",
    ),
    "both teacher forms": (
        dict(teacher_logits=torch.randn(2, 3, 5)),
        ValueError,
        r"exactly one teacher.*teacher_hidden=set, teacher_weight=set, teacher_logits=set",
    ),
    "no teacher": (dict(LOGITS), ValueError, r"exactly one teacher.*teacher_hidden=None"),
    "student bias shape": (
        dict(student_bias=torch.randn(1, 5)),
        ValueError,
        r"student_bias must have shape \(5,\), got \(1, 5\)",
    ),
    "teacher bias shape": (
        dict(teacher_bias=torch.randn(4)),
        ValueError,
        r"teacher_bias must have shape \(5,\), got \(4\)",
    ),
    "labels not a tensor": (dict(labels=[0, 1, 2, 3, 4, 0]), TypeError, r"labels must be an integer tensor, got list"),
    "labels float": (dict(labels=torch.zeros(2, 3, dtype=torch.float16)), TypeError, r"labels.*float16"),
    "labels complex": (dict(labels=torch.zeros(2, 3, dtype=torch.complex64)), TypeError, r"labels.*complex64"),
    "hidden complex": (
        dict(student_hidden=torch.randn(2, 3, 4, dtype=torch.complex64)),
        TypeError,
        r"student_hidden must be a floating-point tensor, got torch.complex64",
    ),
    # dtype mismatches: previously a bare "expected m1 and m2 to have the same dtype" from the matmul.
    "hidden/weight dtype": (
        dict(student_weight=torch.randn(5, 4, dtype=F64)),
        TypeError,
        r"student_hidden=float32, student_weight=float64",
    ),
    "student bias dtype": (
        dict(student_bias=torch.randn(5, dtype=torch.bfloat16)),
        TypeError,
        r"student_bias=bfloat16",
    ),
    "teacher dtype": (
        dict(teacher_weight=torch.randn(5, 6, dtype=torch.float16)),
        TypeError,
        r"teacher_hidden=float32, teacher_weight=float16",
    ),
    "Hs = 0": (
        dict(student_hidden=torch.randn(2, 3, 0), student_weight=torch.randn(5, 0)),
        ValueError,
        r"student_weight has Hs=0",
    ),
    "Ht = 0": (
        dict(teacher_hidden=torch.randn(2, 3, 0), teacher_weight=torch.randn(5, 0)),
        ValueError,
        r"teacher_weight has Ht=0",
    ),
    "temperature -inf": (dict(temperature=-INF), ValueError, r"temperature must be a finite number > 0, got -inf"),
    "temperature bool": (dict(temperature=True), ValueError, r"temperature must be a finite number > 0, got True"),
    "temperature tensor": (
        dict(temperature=torch.tensor(2.0)),
        ValueError,
        r"temperature must be a Python number \(a finite number > 0\), not a tensor \(got shape \(\) "
        r"on cpu\): converting it would sync the device, so pass temperature=float\(\.\.\.\) instead",
    ),
    "softcap nan": (dict(softcap=NAN), ValueError, r"softcap must be a finite number > 0, got nan"),
    "softcap bool": (dict(softcap=True), ValueError, r"softcap must be a finite number > 0, got True"),
    "hard_weight inf": (dict(hard_weight=INF), ValueError, r"hard_weight must be a finite number, got inf"),
    "soft_weight bool": (dict(soft_weight=False), ValueError, r"soft_weight must be a finite number, got False"),
    "chunk_size negative": (dict(chunk_size=-4), ValueError, r"chunk_size must be an int >= 1 or 'auto', got -4"),
    "chunk_size None": (dict(chunk_size=None), ValueError, r"chunk_size .* got None"),
    "chunk_size str": (dict(chunk_size="8"), ValueError, r"chunk_size .* got '8'"),
    "reduction case": (
        dict(reduction="MEAN"),
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'MEAN'",
    ),
    "divergence None": (dict(divergence=None), TypeError, r"divergence must be a name or a callable, got NoneType"),
    "divergence param name": (dict(divergence="jsd_beta1.5"), ValueError, r"beta must be in \[0, 1\], got 1.5"),
    "divergence typo": (
        dict(divergence="forward_kl_"),
        ValueError,
        r"unknown divergence 'forward_kl_' \(did you mean 'forward_kl'.*\); built-ins: ",
    ),
    "sparse divergence, dense teacher": (
        dict(divergence="topk_forward_kl_bucket"),
        ValueError,
        r"topk_forward_kl_bucket takes a top-k teacher",
    ),
    "ignore_index float": (dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int, got -100.0"),
}


@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case, fn):
    change, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        fn(**{**_inputs(), **change}, impl="eager")


def test_flattened_row_aligned_tensors_are_still_accepted():
    """The layout check only refuses two *different multi-dim* layouts: a flattened side is fine."""
    t = _inputs(leading=(2, 3), dtype=F64)
    base = fused_linear_distill(**t, hard_weight=0.5, impl="eager", reduction="none")
    flat = dict(t, labels=t["labels"].reshape(6), teacher_hidden=t["teacher_hidden"].reshape(6, 6))
    out = fused_linear_distill(**flat, hard_weight=0.5, impl="eager", reduction="none")
    assert_close_scaled(out, base, 1e-12)
    flat_student = dict(t, student_hidden=t["student_hidden"].reshape(6, 4))  # labels (2, 3) with (6, Hs) hidden
    out = fused_linear_distill(**flat_student, hard_weight=0.5, impl="eager", reduction="none")
    assert_close_scaled(out.reshape(2, 3), base, 1e-12)


@pytest.mark.parametrize(
    "labels,ignore_index,count",
    [
        ([0, 1, 5, 2, 3, 4], -100, 1),  # == V
        ([0, -1, 1, 2, 3, 4], -100, 1),  # negative but not ignore_index
        ([0, -100, 1, 2, 3, 4], -1, 1),  # -100 is not *this* ignore_index
        ([0, 99, 7, -7, 3, -1], -1, 3),
    ],
)
def test_labels_out_of_range_with_validate(labels, ignore_index, count):
    t = _inputs()
    t["labels"] = torch.tensor(labels).reshape(2, 3)
    match = rf"labels has {count} value\(s\) outside \[0, 5\) that are not ignore_index={ignore_index}"
    # Checked even when no cross-entropy reads them, and (hard_weight=1) before the first chunk's
    # cross-entropy would index with them (an IndexError here): in each of _run's three modes.
    for hard_weight in (0.0, 1.0):
        for grad, reduction in ((True, "mean"), (True, "none"), (False, "mean")):
            with pytest.raises(ValueError, match=match), torch.set_grad_enabled(grad):
                fused_linear_distill(
                    **t, ignore_index=ignore_index, hard_weight=hard_weight, impl="eager", reduction=reduction
                )


def test_labels_out_of_range_without_validate_are_not_checked():
    """validate=False skips the host sync: out-of-range labels are then ordinary (valid) rows, and
    without the cross-entropy (which would index with them) the result is the reference's."""
    t = _inputs(dtype=F64)
    t["labels"] = torch.tensor([[0, 7, -3], [2, -100, 4]])
    prob = Problem((2, 3), t, dict(validate=False, reduction="mean"))
    out, _ = compare_to_reference(prob)
    assert torch.isfinite(out)
    # 5 valid rows (only -100 is ignored): the same as giving those labels in range.
    in_range = dict(t, labels=torch.tensor([[0, 1, 1], [2, -100, 4]]))
    same, _ = Problem((2, 3), in_range, {}).call(fused_linear_distill, impl="eager")
    assert_close_scaled(out.detach(), same.detach(), 1e-12)


def test_topk_ids_out_of_range():
    t = _inputs(teacher="logits", labels=False)
    ids = torch.tensor([[[0, 1], [2, 5], [1, 0]], [[4, 3], [0, 0], [-1, 2]]])
    logprobs = torch.full((2, 3, 2), math.log(0.4))
    del t["teacher_logits"]
    kw = dict(teacher_topk=(ids, logprobs), divergence="topk_forward_kl_renormalize", impl="eager")
    with pytest.raises(ValueError, match=r"teacher_topk ids has 2 value\(s\) outside \[0, 5\)"):
        fused_linear_distill(**t, **kw)


def _rows_loss(shape_fn):
    def divergence(student, teacher):
        return shape_fn(D.forward_kl(student, teacher), student)

    divergence.__name__ = "bad_shape"
    return divergence


WRONG_SHAPES = {
    "(R, V)": (_rows_loss(lambda loss, s: s - s.mean(-1, keepdim=True)), r"\(6, 5\)"),
    "scalar": (_rows_loss(lambda loss, s: loss.sum()), r"\(\)"),
    "(R, 1)": (_rows_loss(lambda loss, s: loss[:, None]), r"\(6, 1\)"),
    "(1, R)": (_rows_loss(lambda loss, s: loss[None, :]), r"\(1, 6\)"),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_user_divergence_with_the_wrong_output_shape(case, reduction):
    divergence, shape = WRONG_SHAPES[case]
    t = _inputs()
    t["student_hidden"].requires_grad_()
    with pytest.raises(
        ValueError, match=rf"divergence bad_shape returned shape {shape}, expected per-row losses \(6,\)"
    ):
        fused_linear_distill(**t, divergence=divergence, chunk_size=16, reduction=reduction, impl="eager")


@pytest.mark.parametrize("case", ["scalar", "(R, V)"])
def test_reference_rejects_a_wrong_shaped_divergence(case):
    divergence, _ = WRONG_SHAPES[case]
    with pytest.raises(ValueError, match="bad_shape"):
        fused_linear_distill_ref(**_inputs(), divergence=divergence)


@pytest.mark.parametrize(
    "factory,value,param",
    [
        (D.jsd, 1.5, "beta"),
        (D.jsd, -1e-9, "beta"),
        (D.skew_kl, NAN, "alpha"),
        (D.skew_reverse_kl, INF, "alpha"),
        (D.symmetric_kl, -INF, "weight"),
    ],
)
def test_divergence_parameters_outside_the_unit_interval(factory, value, param):
    with pytest.raises(ValueError, match=rf"{param} must be in \[0, 1\], got {value!r}"):
        factory(value)


def test_divergence_parameter_bool_is_refused():
    with pytest.raises((TypeError, ValueError), match="beta"):
        D.jsd(True)


@pytest.mark.parametrize("which", ["student_hidden", "student_weight", "teacher_hidden", "labels", "student_bias"])
def test_mixed_devices(which):
    """A tensor on another device (the shape-only "meta" device stands in for a GPU here) is a
    ValueError listing every tensor's device, raised before any kernel touches the data."""
    t = _inputs()
    t["student_bias"] = torch.randn(5)
    t[which] = t[which].to("meta")
    with pytest.raises(ValueError, match=rf"all tensors must be on one device, got .*{which}=meta"):
        fused_linear_distill(**t, hard_weight=0.5, impl="eager")


# --- known gaps: normalizer is never validated ---------------------------------------------------


@pytest.mark.parametrize(
    "normalizer,reduction",
    [
        (0, "mean"),
        (0.0, "sum"),
        (-3.0, "mean"),
        (NAN, "mean"),
        (INF, "sum"),
        (torch.tensor([1.0, 2.0]), "mean"),
        (4.0, "none"),
    ],
    ids=["0", "0.0", "negative", "nan", "inf", "vector", "with-none"],
)
def test_bad_normalizer_raises(normalizer, reduction):
    with pytest.raises(ValueError, match="normalizer"):
        fused_linear_distill(**_inputs(), normalizer=normalizer, reduction=reduction, impl="eager")


def _check_inputs(**change) -> None:
    """validate.check_inputs on _inputs() with default arguments, but for ``change``."""
    t = _inputs()
    validate.check_inputs(
        t["student_hidden"],
        t["student_weight"],
        t["teacher_hidden"],
        t["teacher_weight"],
        None,
        t["labels"],
        **{
            **dict(
                student_bias=None,
                teacher_bias=None,
                temperature=1.0,
                soft_weight=1.0,
                hard_weight=0.0,
                reduction="mean",
                chunk_size=4,
                softcap=None,
                impl="eager",
            ),
            **change,
        },
    )


# NumPy scalars (e.g. from a config read with NumPy) are numbers like Python's, not "temperature must
# be a finite number > 0, got np.float32(2.0)". The values are exact in float32, so the loss is the same.
PYTHON_NUMBERS = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.25, softcap=30.0, normalizer=4.0)
NUMPY_NUMBERS = dict(
    temperature=np.float32(2.0),
    soft_weight=np.float16(0.5),
    hard_weight=np.float32(0.25),
    softcap=np.int64(30),
    normalizer=np.float32(4.0),
)


def test_check_inputs_takes_numpy_scalars():
    _check_inputs(**{k: v for k, v in NUMPY_NUMBERS.items() if k != "normalizer"}, memory_budget=np.float32(0.5))
    validate.check_normalizer(NUMPY_NUMBERS["normalizer"], "mean")


@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
def test_numpy_scalars_are_numbers(fn):
    t = _inputs(dtype=F64)
    out = fn(**t, **NUMPY_NUMBERS, chunk_size=4, impl="eager")
    assert_close_scaled(out, fn(**t, **PYTHON_NUMBERS, chunk_size=4, impl="eager"), 1e-12)


def test_numpy_scalars_with_chunk_size_auto(tuning_env):
    # NumPy's call first: an equal Python call's memoised choice would skip the tuning key.
    t = _inputs(dtype=F64)
    out = fused_linear_distill(**t, **NUMPY_NUMBERS, impl="eager")
    assert_close_scaled(out, fused_linear_distill(**t, **PYTHON_NUMBERS, impl="eager"), 1e-12)


# Every argument check that reads no tensor value runs whatever ``validate`` says: ignore_index
# checked only with validate=True gave a bare torch error (-100.0) or an AttributeError (None),
# and memory_budget, read only by chunk_size="auto", was ignored with an int chunk size.
CHEAP_ARGUMENTS = {
    "ignore_index float": (
        dict(ignore_index=-100.0),
        TypeError,
        r"ignore_index must be an int, got -100.0: pass a Python int",
    ),
    "ignore_index None": (dict(ignore_index=None), TypeError, r"ignore_index must be an int, got None"),
    "ignore_index bool": (dict(ignore_index=True), TypeError, r"ignore_index must be an int, got True"),
    "memory_budget str": (
        dict(memory_budget="lots"),
        ValueError,
        r"memory_budget: memory budget must be bytes > 1 .* or a fraction in \(0, 1\] .*, got 'lots'",
    ),
    "memory_budget 0": (dict(memory_budget=0), ValueError, r"memory_budget: .* got 0$"),
    "memory_budget bool": (dict(memory_budget=True), ValueError, r"memory_budget: .* got True$"),
    "memory_budget partial bytes": (dict(memory_budget=1.5), ValueError, r"memory_budget: .* must be whole, got 1.5"),
}


@pytest.mark.parametrize("case", list(CHEAP_ARGUMENTS))
def test_check_inputs_checks_cheap_arguments(case):
    change, error, match = CHEAP_ARGUMENTS[case]
    with pytest.raises(error, match=match):
        _check_inputs(**change)


@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
@pytest.mark.parametrize("case", list(CHEAP_ARGUMENTS))
def test_cheap_arguments_are_checked_without_validate(case, fn):
    change, error, match = CHEAP_ARGUMENTS[case]
    with pytest.raises(error, match=match):
        fn(**_inputs(), **change, hard_weight=0.5, chunk_size=4, validate=False, impl="eager")


# =================================================================================================
# 2. Valid but unusual inputs
# =================================================================================================


@pytest.mark.parametrize("leading", [(7,), (2, 3), (2, 1, 3), (1, 2, 3, 2)], ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_dims_of_rank_1_to_4(leading, reduction):
    t = _inputs(leading=leading, dtype=F64, vocab=9, seed=len(leading))
    t["labels"] = t["labels"].masked_fill(torch.rand(leading, generator=torch.Generator().manual_seed(1)) < 0.3, -100)
    t["student_bias"] = torch.randn(9, dtype=F64)
    prob = Problem(
        leading, t, dict(divergence=D.jsd(0.3), hard_weight=0.4, temperature=1.5, chunk_size=4, reduction=reduction)
    )
    out, g = compare_to_reference(prob)
    assert out.shape == (leading if reduction == "none" else ())
    assert g["student_hidden"].shape == (*leading, 4)


def test_strided_and_expanded_views():
    """Hidden states that are a strided slice in two leading dims (reshape must copy), an expanded
    (stride 0) teacher and labels: values and gradients (through the view, into the tensor it
    views) equal the reference's."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(3, 8, 10, generator=gen, dtype=F64)
    hidden = big[:, ::2, 1:7:2]  # (3, 4, 3), no dim contiguous
    teacher = torch.randn(1, 4, 5, generator=gen, dtype=F64).expand(3, 4, 5)  # one teacher row per position
    labels = torch.randint(0, 11, (4,), generator=gen).expand(3, 4)
    weight = torch.randn(11, 3, generator=gen, dtype=F64)
    t = dict(
        student_hidden=hidden,
        student_weight=weight,
        teacher_hidden=teacher,
        teacher_weight=torch.randn(12, 5, generator=gen, dtype=F64),
        labels=labels,
    )
    kwargs = dict(divergence="reverse_kl", hard_weight=0.5, chunk_size=5)
    assert not hidden.is_contiguous() and teacher.stride(0) == 0 and labels.stride(0) == 0
    strided = Problem((3, 4), t, kwargs)
    strided.grad_names = ("student_weight",)  # a leaf copy would be contiguous; the view itself is used
    compare_to_reference(strided)

    def through_view(fn, **extra):
        leaf = big.clone().requires_grad_()
        out = fn(leaf[:, ::2, 1:7:2], weight, teacher, t["teacher_weight"], labels=labels, **kwargs, **extra)
        return out.detach(), torch.autograd.grad(out, leaf)[0]

    out, g = through_view(fused_linear_distill, impl="eager")
    ref, expected = through_view(fused_linear_distill_ref)
    assert_close_scaled(out, ref, 1e-12)
    assert_close_scaled(g, expected, 1e-12, "grad through the view")
    assert (g[:, 1::2] == 0).all() and (g[..., 0] == 0).all()  # untouched positions get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=_name)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_in_low_precision(dtype, reduction):
    """N = 0 (rank-4 leading dims) in every input dtype: a zero loss of the right shape and dtype,
    zero gradients of the leaves' shapes and dtypes."""
    leading = (2, 0, 3, 1)
    t = _inputs(leading=leading, dtype=dtype, vocab=7)
    t["student_bias"] = torch.randn(7).to(dtype)
    prob = Problem(leading, t, dict(reduction=reduction, hard_weight=0.5, divergence=D.jsd(0.2)))
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    assert out.dtype == torch.float32 and out.shape == (leading if reduction == "none" else ())
    assert torch.equal(out, torch.zeros_like(out))
    go = torch.ones(leading) if reduction == "none" else None
    for name, g in grads_of(out, leaves, go).items():
        assert g.shape == leaves[name].shape and g.dtype == dtype, name
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored_float16(reduction):
    """float16 takes its own gradient scaling path (unit row weights, scaled at the end): with
    every row ignored the loss is 0 and the gradients exactly 0 (no 0 * inf = nan)."""
    prob = fixed_problem(
        n=10, dtype=torch.float16, hard_weight=0.7, divergence="reverse_kl", ignore_index=-1, reduction=reduction
    )
    prob.tensors["labels"] = torch.full((10,), -1, dtype=torch.int32)
    out, leaves = prob.call(fused_linear_distill, impl="eager", return_parts=True)
    for part in out:
        assert torch.equal(part, torch.zeros_like(part))
    go = torch.ones(10) if reduction == "none" else None
    for name, g in grads_of(out.loss, leaves, go).items():
        assert torch.equal(g, torch.zeros_like(g)), name


def _tied_problem(dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(13, 6, generator=gen, dtype=F64).to(dtype)  # (V, H): embedding == lm_head
    tokens = torch.randint(0, 13, (3, 4), generator=gen)
    mix = torch.randn(6, 6, generator=gen, dtype=F64).to(dtype) / 3
    teacher = torch.randn(3, 4, 13, generator=gen, dtype=F64).to(dtype)
    labels = torch.roll(tokens, -1, dims=1).masked_fill(torch.rand(3, 4, generator=gen) < 0.25, -100)
    return table, tokens, mix, teacher, labels


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tied_embeddings(reduction):
    """The same tensor is the embedding and the lm_head: its gradient sums both uses."""
    table, tokens, mix, teacher, labels = _tied_problem()
    kwargs = dict(
        teacher_logits=teacher,
        labels=labels,
        hard_weight=0.5,
        divergence="forward_kl",
        reduction=reduction,
        chunk_size=5,
    )
    go = torch.randn(3, 4, generator=torch.Generator().manual_seed(9), dtype=F64) if reduction == "none" else None

    def run(fn, **extra):
        w = table.clone().requires_grad_()
        hidden = torch.tanh(w[tokens] @ mix)  # "the model"
        out = fn(hidden, w, **kwargs, **extra)
        (g,) = torch.autograd.grad(out, w, go)
        return out.detach(), g

    out, g = run(fused_linear_distill, impl="eager")
    ref, g_ref = run(fused_linear_distill_ref)
    assert_close_scaled(out, ref, 1e-10, "loss")
    assert_close_scaled(g, g_ref, 1e-10, "tied weight")
    # Both paths contribute: the lm_head-only gradient differs.
    w = table.clone().requires_grad_()
    (head_only,) = torch.autograd.grad(fused_linear_distill_ref(torch.tanh(table[tokens] @ mix), w, **kwargs), w, go)
    assert rel_err(head_only, g_ref) > 1e-3


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=_name)
def test_weight_is_a_slice_of_a_bigger_tensor(dtype):
    """lm_head = rows 2..V+2 and the first Hs columns of a bigger parameter (non-contiguous, with a
    storage offset); the gradient lands in exactly that block of the big tensor."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(20, 9, generator=gen, dtype=F64).to(dtype)
    hidden = torch.randn(10, 5, generator=gen, dtype=F64).to(dtype)
    teacher = dict(
        teacher_hidden=torch.randn(10, 7, generator=gen, dtype=F64).to(dtype),
        teacher_weight=torch.randn(16, 7, generator=gen, dtype=F64).to(dtype),
    )
    labels = torch.randint(0, 15, (10,), generator=gen)
    kwargs = dict(**teacher, labels=labels, hard_weight=0.3, divergence=D.skew_kl(0.2), chunk_size=4)

    leaf = big.clone().requires_grad_()
    view = leaf[2:17, :5]
    assert not view.is_contiguous() and view.storage_offset() == 18
    out = fused_linear_distill(hidden, view, **kwargs, impl="eager")
    (g,) = torch.autograd.grad(out, leaf)
    # The reference on exact float64 copies of the (rounded) inputs: its gradient is exact.
    exact = {k: v.to(F64) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    ref_w = big[2:17, :5].to(F64).requires_grad_()
    ref = fused_linear_distill_ref(hidden.to(F64), ref_w, **exact)
    (g_ref,) = torch.autograd.grad(ref, ref_w)
    assert g.dtype == dtype
    outside = g.clone()
    outside[2:17, :5] = 0
    assert torch.equal(outside, torch.zeros_like(outside))
    if dtype == F64:
        assert_close_scaled(out, ref, 1e-10, "loss")
        assert_close_scaled(g[2:17, :5], g_ref, 1e-10, "weight block")
    else:  # bf16 inputs: the bounds of test_fused.py
        assert_low_precision_close(out, {"w": g[2:17, :5]}, ref, {"w": g_ref}, dtype)


@pytest.mark.parametrize("names", [("student_hidden", "student_bias"), ("student_bias",), ()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
def test_partial_requires_grad_low_precision(names, dtype):
    """Only some leaves need a gradient, in 16-bit (its own cast-back path): the others get none,
    and with no student leaf at all the result has no graph (a teacher leaf does not count)."""
    prob = fixed_problem(n=9, hard_weight=0.5, dtype=dtype, chunk_size=4, divergence="forward_kl")
    prob.tensors["student_weight"] = prob.tensors["student_weight"] * 3
    prob.grad_names = names + (() if names else ("teacher_hidden",))
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref, dtype=F64)
    if not names:
        assert out.grad_fn is None and not out.requires_grad
        assert rel_err(out, ref) < LOW_PRECISION_BOUNDS[dtype][0]
        return
    g, g_ref = grads_of(out, leaves, None), grads_of(ref, ref_leaves, None)
    assert set(g) == set(names)
    assert_low_precision_close(out, g, ref, g_ref, dtype)


# =================================================================================================
# 3. Numerical edge cases against the float64 reference
# =================================================================================================

# 16-bit logits near the range limits. Hidden states, weights, bias and teacher logits lie on a
# grid the dtype holds exactly, and every logit  offset + step * k  (|k| <= 12) is exact too (the
# matmul adds at most 4 products, exactly, in float32 before the one rounding to the dtype):
#   float16: offset 30000 = 1875 * 16, step 16: |logit| <= 30192 < 65504 (float16's max);
#   bfloat16: offset 2^100 (~1.3e30), step 2^93: 128 +- 12 fits bf16's 8 significant bits, and
#            logits / 0.05 stay far below float32's max 3.4e38 (the compute dtype).
# The soft term is weighted T^2 (Hinton's convention, capped at 1) so the gradients stay within
# float16's range at T = 0.05 (checked below: the exact ones, times N for float16's unscaled
# intermediate, are < 1/8 of the max). mse_logits squares logit differences: at bf16's offset
# those overflow float32 (inherent to the compute dtype), so it only runs at float16's.
EDGE = {torch.float16: (30000.0, 16.0), torch.bfloat16: (2.0**100, 2.0**93)}
EDGE_DIVERGENCES = ["forward_kl", "reverse_kl", "soft_ce", "tvd", D.jsd(0.5), D.skew_reverse_kl(0.3)]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _edge_problem(dtype, seed=0, n=12, hs=4, vocab=11):
    offset, step = EDGE[dtype]
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (n, hs), generator=gen).to(F64)
    weight = torch.randint(-1, 2, (vocab, hs), generator=gen).to(F64) * step
    teacher = offset + step * torch.randint(-12, 13, (n, vocab), generator=gen).to(F64)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    t = dict(
        student_hidden=hidden,
        student_weight=weight,
        student_bias=torch.full((vocab,), offset, dtype=F64),
        teacher_logits=teacher,
        labels=labels,
    )
    for x in t.values():  # the construction is exact in the dtype
        assert not x.is_floating_point() or torch.equal(x.to(dtype).to(F64), x)
    return Problem((n,), t)


def _logit_grad(prob) -> torch.Tensor:
    """d(result)/d(student logits), exact (float64 reference with the logits as the hidden states
    and an identity lm_head)."""
    t = prob.tensors
    logits = t["student_hidden"] @ t["student_weight"].T + (0 if t.get("student_bias") is None else t["student_bias"])
    logits = logits.detach().clone().requires_grad_()
    rest = {k: v for k, v in t.items() if k not in ("student_hidden", "student_weight", "student_bias")}
    out = fused_linear_distill_ref(logits, torch.eye(logits.shape[-1], dtype=F64), **rest, **prob.kwargs)
    return torch.autograd.grad(out, logits)[0]


def assert_close_given_float32_compute(prob, dtype):
    """Fused (inputs in ``dtype``, exact logits) vs the float64 reference, allowing what float32
    compute itself cannot resolve and the rounding of the logit gradient to ``dtype``:

    * loss: |fused - ref64| <= 4 |ref32 - ref64| + 1e-6 |ref64|, where ref32 is the reference run
      at ``precision=float32`` (same function, float32 math: the compute dtype's own error);
    * gradients, elementwise: |g - e| <= u (2 S + |e|) + 4 |g32 - e|, with S the magnitude of the
      sum that forms the gradient from the rounded logit gradient D: |D| @ |W| for the hidden
      states, |D|^T @ |H| for the weight, sum_r |D_r| for the bias (rounding D to the dtype and
      the matmul's output, u/2 each, and the final rounding). Cancellation in those sums (e.g.
      reverse KL on near one-hot rows at T = 0.05) is thus judged against the terms' size. Tiny
      entries of D carry an absolute error too: float32's underflow (2^-126, e.g. exp(-200) is
      0) and, for float16, its subnormal spacing (2^-24, half of it lost in rounding), which
      enter S as delta * (1 @ |W|) etc., and float16 outputs are rounded to 2^-25 absolute.
    """
    u = UNIT[dtype]
    delta = 2.0**-126 + (2.0**-25 if dtype == torch.float16 else 0.0)
    out_floor = 2.0**-25 if dtype == torch.float16 else 0.0
    out, leaves = prob.call(fused_linear_distill, dtype=dtype, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref)
    ref32, ref32_leaves = prob.call(fused_linear_distill_ref, precision=torch.float32)
    g, g_ref, g32 = grads_of(out, leaves), grads_of(ref, ref_leaves), grads_of(ref32, ref32_leaves)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    loss_err, loss_allowed = abs(out.item() - ref.item()), 4 * abs(ref32.item() - ref.item()) + 1e-6 * abs(ref.item())
    assert loss_err <= loss_allowed, ("loss", out.item(), ref.item(), ref32.item())
    d = _logit_grad(prob).abs()
    d = d + delta / u  # so that u * 2 * terms below includes 2 * delta per term
    terms = {
        "student_hidden": d @ prob.tensors["student_weight"].abs(),
        "student_bias": d.sum(0),
        "student_weight": d.T @ prob.tensors["student_hidden"].abs(),
    }
    for name in g:
        e = g_ref[name]
        assert g[name].dtype == dtype and torch.isfinite(g[name]).all(), name
        err = (g[name].to(F64) - e).abs()
        allowed = u * (2 * terms[name] + e.abs()) + 4 * (g32[name] - e).abs() + out_floor
        worst = (err - allowed).argmax()
        assert (err <= allowed).all(), (name, err.flatten()[worst].item(), allowed.flatten()[worst].item())


@pytest.mark.parametrize("temperature", [1.0, 0.05, 20.0])
@pytest.mark.parametrize(
    "dtype,divergence",
    [(dtype, d) for dtype in HALF for d in EDGE_DIVERGENCES] + [(torch.float16, "mse_logits")],  # see above
    ids=lambda x: _name(x),
)
def test_huge_logits_in_16_bit(dtype, temperature, divergence):
    prob = _edge_problem(dtype, seed=int(temperature * 100))
    prob.kwargs = dict(
        divergence=divergence,
        temperature=temperature,
        soft_weight=min(1.0, temperature**2),
        hard_weight=0.5,
        chunk_size=5,
    )
    t = prob.tensors
    logits = t["student_hidden"] @ t["student_weight"].T + t["student_bias"]
    assert torch.equal(logits.to(dtype).to(F64), logits)  # exact in the dtype: no rounding of logits
    ref, leaves = prob.call(fused_linear_distill_ref)
    exact_max = max(g.abs().max().item() for g in grads_of(ref, leaves).values())
    assert exact_max * len(t["labels"]) < torch.finfo(dtype).max / 8  # representable, with margin
    assert_close_given_float32_compute(prob, dtype)


def test_float16_unscaled_intermediate_does_not_overflow_on_cpu():
    # V = 2, one hidden feature, lm_head rows +-2^15: the student is sure of token 0 (logits +-32),
    # label and teacher say token 1, so d(row loss)/d(logits) ~ (2, -2) and d/dh ~ 4 * 2^15 = 2^17
    # per row (> 65504); the mean over 8 rows is 2^14 (fits).
    n = 8
    hidden = torch.full((n, 1), 2.0**-10, dtype=torch.float16)
    weight = torch.tensor([[2.0**15], [-(2.0**15)]], dtype=torch.float16)
    teacher = torch.tensor([[-8.0, 8.0]] * n, dtype=torch.float16)
    labels = torch.ones(n, dtype=torch.long)
    prob = Problem(
        (n,),
        dict(student_hidden=hidden, student_weight=weight, teacher_logits=teacher, labels=labels),
        dict(hard_weight=1.0, chunk_size=4),
    )
    ref, ref_leaves = prob.call(fused_linear_distill_ref, dtype=F64)
    exact = grads_of(ref, ref_leaves)["student_hidden"]
    assert exact.abs().max() < 65504 / 2 and exact.abs().max() * n > 65504  # fits; n times it does not
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    g = grads_of(out, leaves)["student_hidden"]
    assert torch.isfinite(g).all()
    assert rel_err(g, exact) < 6 * UNIT[torch.float16] + rel_err(exact.to(torch.float16), exact)


def _random_problem(n=16, vocab=37, hs=8, seed=0, scale=4.0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(n, hs, generator=gen, dtype=F64),
        student_weight=torch.randn(vocab, hs, generator=gen, dtype=F64) * scale / math.sqrt(hs),
        student_bias=torch.randn(vocab, generator=gen, dtype=F64),
        teacher_logits=torch.randn(n, vocab, generator=gen, dtype=F64) * scale,
        labels=torch.randint(0, vocab, (n,), generator=gen).masked_fill(torch.rand(n, generator=gen) < 0.2, -100),
    )
    return Problem((n,), t, dict(chunk_size=6, **kwargs))


def _check_dtype(prob, dtype, reduction="mean", loss_scale=0.0):
    """float64: fused == reference to 1e-9 (same function, summation order only); float32 and
    16-bit: the bounds of test_fused.py (the reference sees exact float64 copies of the inputs;
    ``loss_scale`` as in assert_low_precision_close)."""
    prob.kwargs["reduction"] = reduction
    go = (
        torch.randn(prob.leading, generator=torch.Generator().manual_seed(2), dtype=F64)
        if reduction == "none"
        else None
    )
    if dtype == F64:
        return compare_to_reference(prob, grad_output=go)
    out, leaves = prob.call(fused_linear_distill, dtype=dtype, impl="eager")
    # The reference on exact float64 copies of the rounded inputs (so its gradients are exact).
    rounded = {k: v if v is None or not v.is_floating_point() else v.to(dtype).to(F64) for k, v in prob.tensors.items()}
    ref, ref_leaves = Problem(prob.leading, rounded, prob.kwargs).call(fused_linear_distill_ref)
    g = grads_of(out, leaves, None if go is None else go.float())
    g_ref = grads_of(ref, ref_leaves, go)
    for name, x in g.items():
        assert torch.isfinite(x).all(), name
    assert_low_precision_close(out, g, ref, g_ref, dtype, loss_scale=loss_scale)
    return out, g


ALL_DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "soft_ce",
    "tvd",
    "mse_logits",
    D.jsd(0.3),
    D.skew_kl(0.1),
    D.skew_reverse_kl(0.1),
    D.symmetric_kl(0.3),
]


@pytest.mark.parametrize("temperature", [0.05, 20.0])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=_name)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=_name)
def test_extreme_temperatures(temperature, divergence, dtype):
    prob = _random_problem(seed=3, divergence=divergence, temperature=temperature, hard_weight=0.3)
    _check_dtype(prob, dtype, reduction="mean" if temperature < 1 else "none")


@pytest.mark.parametrize("masked", [0.3, "all but one"])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=_name)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=_name)
def test_masked_teacher_vocabulary(masked, divergence, dtype):
    """Teacher logits of -inf (outside its support) on 30% of the vocabulary, or on all but one
    entry per row (a one-hot teacher): finite values and gradients equal to the reference's."""
    prob = _random_problem(seed=5, divergence=divergence, temperature=0.7, hard_weight=0.2)
    t = prob.tensors["teacher_logits"]
    gen = torch.Generator().manual_seed(6)
    if masked == "all but one":
        keep = torch.randint(0, t.shape[1], (t.shape[0], 1), generator=gen)
        mask = torch.ones_like(t, dtype=torch.bool).scatter(1, keep, False)
    else:
        mask = torch.rand(t.shape, generator=gen) < masked
        mask[:, 0] = False  # never a whole row (see test_ignored_row_with_fully_masked_teacher)
    prob.tensors["teacher_logits"] = t.masked_fill(mask, -INF)
    out, _ = _check_dtype(prob, dtype)
    assert torch.isfinite(out)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=_name)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_one_hot_like_teacher(divergence, temperature):
    """One teacher logit 50 above the rest (p ~ 1 - V e^-50; at T = 0.05 a gap of 1000): float32."""
    prob = _random_problem(seed=7, divergence=divergence, temperature=temperature, hard_weight=0.5, scale=1.0)
    t = prob.tensors["teacher_logits"]
    top = torch.randint(0, t.shape[1], (t.shape[0],), generator=torch.Generator().manual_seed(8))
    prob.tensors["teacher_logits"] = t.scatter_add(1, top[:, None], torch.full((t.shape[0], 1), 50.0, dtype=F64))
    _check_dtype(prob, torch.float32)


IDENTICAL_TOL = {F64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6}  # soft loss / its gradient


@pytest.mark.parametrize("divergence", [d for d in ALL_DIVERGENCES if d != "soft_ce"], ids=_name)
@pytest.mark.parametrize("dtype", list(IDENTICAL_TOL), ids=_name)
def test_identical_student_and_teacher(divergence, dtype):
    """Teacher = student (same hidden states, weight and bias): every divergence is 0 and its
    gradient ~0, so the total gradient is the cross-entropy's alone. The logits are bitwise equal
    (same matmul), so only the divergences' own float32 rounding (e.g. JSD's log-mixture) is left."""
    prob = fixed_problem(n=14, vocab=23, hs=6, dtype=dtype, seed=2)
    w = prob.tensors["student_weight"] * 4
    prob.tensors.update(
        student_weight=w,
        teacher_hidden=prob.tensors["student_hidden"],
        teacher_weight=w,
        teacher_bias=prob.tensors["student_bias"],
    )
    kwargs = dict(divergence=divergence, temperature=1.3, hard_weight=0.6, chunk_size=5)
    out, leaves = prob.call(fused_linear_distill, impl="eager", return_parts=True, **kwargs)
    assert abs(out.soft_loss.item()) < IDENTICAL_TOL[dtype]
    ce_only, ce_leaves = prob.call(fused_linear_distill, impl="eager", **dict(kwargs, soft_weight=0.0))
    g, g_ce = grads_of(out.loss, leaves), grads_of(ce_only, ce_leaves)
    for name in g:
        scale = g_ce[name].abs().max().item()
        diff = (g[name].double() - g_ce[name].double()).abs().max().item()
        # bf16: the two runs round the same float32 logit gradient (differing by ~1e-7) to bf16.
        allowed = IDENTICAL_TOL[dtype] + (UNIT[dtype] * scale if dtype in HALF else 0.0)
        assert diff <= allowed, (name, diff, allowed)


@pytest.mark.parametrize("value", [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
@pytest.mark.parametrize("factory", [D.jsd, D.skew_kl, D.skew_reverse_kl, D.symmetric_kl], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=_name)
def test_divergence_parameter_at_and_near_the_ends(factory, value, dtype):
    prob = _random_problem(seed=11, divergence=factory(value), temperature=1.5, hard_weight=0.25)
    out, _ = _check_dtype(prob, dtype)
    assert torch.isfinite(out)


@pytest.mark.parametrize("divergence", [D.jsd(1 - 1e-9), D.skew_kl(1 - 1e-9), D.skew_reverse_kl(1e-50)], ids=_name)
def test_parameter_rounding_to_0_or_1_in_float32(divergence):
    """β = 1 − 1e-9 and α = 1e-50 round to 1 and 0 in float32, where log(1 − β) or log α would be
    −inf (a NaN gradient next to masked teacher entries; skew_reverse_kl(1e-50) was 5860 instead of
    67). The kernels get (w, 1 − w, log w, log(1 − w)) computed in float64 (divergences._mixing).
    Near w = 1 the loss is ~1e-8, a difference of O(1) terms (log-probs against probabilities that
    sum to 1), so its float32 error is judged against that scale, 1."""
    prob = _random_problem(seed=17, divergence=divergence, temperature=1.0)
    t = prob.tensors["teacher_logits"]
    prob.tensors["teacher_logits"] = t.masked_fill(torch.arange(t.shape[1]) % 3 == 0, -INF)  # masked vocabulary
    _check_dtype(prob, torch.float32, loss_scale=1.0)


def test_float16_logit_gradient_beyond_its_range_does_not_overflow():
    """One row's d(loss)/d(logits) is ~1.9e5 (reverse KL against a masked teacher at T = 0.01),
    beyond float16's 65504, though the final 1/N-scaled gradient (~2.9e3) fits: each chunk's
    logit gradient is scaled into float16's range by a power of two (fused._half_with_scale)."""
    n, vocab = 64, 4
    t = dict(
        student_hidden=torch.zeros(n, 1, dtype=F64),
        student_weight=torch.zeros(vocab, 1, dtype=F64),
        student_bias=torch.zeros(vocab, dtype=F64),
        teacher_logits=torch.zeros(n, vocab, dtype=F64),
    )
    t["teacher_logits"][0, 1:] = -INF  # one row: the teacher allows only token 0
    prob = Problem((n,), t, dict(divergence="reverse_kl", temperature=0.01, chunk_size=16))
    out, leaves = prob.call(fused_linear_distill, dtype=torch.float16, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref)
    g, g_ref = grads_of(out, leaves), grads_of(ref, ref_leaves)
    assert g_ref["student_bias"].abs().max() < 65504 / 8  # the exact gradient fits float16
    assert torch.isfinite(g["student_bias"]).all()
    assert_low_precision_close(out, g, ref, g_ref, torch.float16)


# --- an ignored row whose teacher row is all -inf (padding) must not poison the gradients ---------


@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", D.jsd(0.3)], ids=_name)
def test_ignored_row_with_fully_masked_teacher(fn, divergence):
    prob = _random_problem(n=6, seed=13, divergence=divergence, hard_weight=0.5)
    prob.tensors["labels"] = torch.tensor([1, -100, 2, 3, -100, 4])
    prob.tensors["teacher_logits"][1] = -INF  # e.g. padding positions stored as -inf
    out, leaves = prob.call(fn, **({"impl": "eager"} if fn is fused_linear_distill else {}))
    g = grads_of(out, leaves)
    # Expected: as if that row's teacher were anything finite (the row is ignored).
    finite_teacher = prob.tensors["teacher_logits"].clone()
    finite_teacher[1] = 0.0
    finite = Problem(prob.leading, dict(prob.tensors, teacher_logits=finite_teacher), prob.kwargs)
    want, want_leaves = finite.call(fused_linear_distill_ref)
    want_grads = grads_of(want, want_leaves)
    for name, x in g.items():
        assert torch.isfinite(x).all(), name
        assert_close_scaled(x, want_grads[name], 1e-9, name)


def test_triton_kernel_ignored_row_with_fully_masked_teacher():
    """The hand-written kernel (under Triton's interpreter without a GPU): an ignored row's nan
    logit gradient must not survive its row weight of 0."""
    pytest.importorskip("triton")
    import importlib

    tc = importlib.import_module("kdfuse.triton_chunk")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, generator=gen).to(device)
    teacher = torch.randn(3, 7, generator=gen).to(device)
    teacher[1] = -INF
    labels = torch.tensor([1, -100, 2], device=device)
    valid = labels != -100
    weights = valid.float()
    scalars = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0], device=device)
    dlogits, (loss, *_) = tc.chunk_step(
        "forward_kl", True, (False, False), -100, student, teacher, labels, valid, weights, scalars
    )
    assert torch.isfinite(loss).all()
    assert torch.isfinite(dlogits).all()


# =================================================================================================
# 5. Compilation: one graph for 20 row counts and every per-call number
# =================================================================================================

# skew_reverse_kl is not on the Triton path on CUDA either (kdfuse.triton_chunk handles forward/
# reverse KL, soft CE and JSD), so this is the torch.compile graph on every device. One spec
# (divergence kernel, CE on, float32, with gradient): ONE compiled graph for the whole section.
CV, CHS, CHT, CCHUNK = 17, 8, 12, 8
ROWS_20 = (2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 15, 17, 23, 24, 25, 31, 33, 40, 47, 64)


def _compile_inputs(leading, seed=0, teacher_logits=False):
    gen = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(*leading, CHS, generator=gen, dtype=F64),
        student_weight=torch.randn(CV, CHS, generator=gen, dtype=F64) * (2 / math.sqrt(CHS)),
        labels=torch.randint(0, CV, leading, generator=gen),
    )
    if teacher_logits:
        t["teacher_logits"] = torch.randn(*leading, CV, generator=gen, dtype=F64) * 2
    else:
        t.update(
            teacher_hidden=torch.randn(*leading, CHT, generator=gen, dtype=F64),
            teacher_weight=torch.randn(CV, CHT, generator=gen, dtype=F64) * (2 / math.sqrt(CHT)),
        )
    return Problem(leading, t)


def _compiled_vs_reference(prob, **kwargs):
    out, leaves = prob.call(fused_linear_distill, dtype=torch.float32, impl="compile", **kwargs)
    ref, ref_leaves = prob.call(fused_linear_distill_ref, dtype=torch.float32, **kwargs)
    g, g_ref = grads_of(out, leaves), grads_of(ref, ref_leaves)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # float32 compute against float64 on the same float32 inputs: a few float32 roundings.
    assert rel_err(out.detach(), ref.detach()) < 1e-5
    for name in g:
        assert torch.isfinite(g[name]).all(), name
        assert rel_err(g[name], g_ref[name]) < 2e-5, name


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_one_graph_for_20_row_counts_and_per_call_numbers():
    torch._dynamo.reset()
    counters.clear()
    base = dict(divergence=D.skew_reverse_kl(0.1), hard_weight=0.3, chunk_size=CCHUNK)
    _compiled_vs_reference(_compile_inputs((16,)), **base)  # warm-up: the one compile
    assert _graphs() == 1
    for n in ROWS_20:  # full chunks, tails of 2..7 rows and 1-row tails (merged): no recompile
        _compiled_vs_reference(_compile_inputs((n,), seed=n), **base)
    assert _graphs() == 1, f"{_graphs()} graphs for 20 row counts"
    # The divergence's parameter, temperature, both weights, normalizer, reduction and leading
    # dims change per call; the lm_head weights are new tensors every call anyway.
    for i, (alpha, temperature, soft, hard) in enumerate([(0.3, 2.0, 0.5, 1.5), (0.7, 0.25, 2.0, 0.1)]):
        kwargs = dict(
            base,
            divergence=D.skew_reverse_kl(alpha),
            temperature=temperature,
            soft_weight=soft,
            hard_weight=hard,
            normalizer=37.0,
            reduction="sum",
        )
        _compiled_vs_reference(_compile_inputs((3, 5 + i), seed=i), **kwargs)
    assert _graphs() == 1, "a per-call number caused a recompile"


def test_compiled_edge_values_without_a_recompile():
    """The compiled chunk on edge values (masked teacher vocabulary, one-hot-like rows, extreme
    temperatures): finite and equal to the reference, in the graph compiled above."""
    base = dict(divergence=D.skew_reverse_kl(0.1), hard_weight=0.3, chunk_size=CCHUNK)
    _compiled_vs_reference(_compile_inputs((16,)), **base)  # (the graph, when run alone)
    before = _graphs()
    prob = _compile_inputs((21,), seed=5, teacher_logits=True)
    t = prob.tensors["teacher_logits"]
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, 0] = False
    t = t.masked_fill(mask, -INF)
    t[::3, 1] += 50.0  # one-hot-like rows (column 1 is unmasked in them or -inf + 50 = -inf)
    t[::3, 1] = torch.where(torch.isinf(t[::3, 1]), 50.0, t[::3, 1])
    prob.tensors["teacher_logits"] = t
    for temperature in (0.05, 20.0):
        _compiled_vs_reference(prob, **dict(base, temperature=temperature))
    assert _graphs() == before


def test_a_single_row_does_not_recompile():
    base = dict(divergence=D.skew_reverse_kl(0.1), hard_weight=0.3, chunk_size=CCHUNK)
    _compiled_vs_reference(_compile_inputs((16,)), **base)
    before = _graphs()
    _compiled_vs_reference(_compile_inputs((1,)), **base)
    assert _graphs() == before


# =================================================================================================
# 6. Autotuning faults, at the level of chunk_size="auto"
# =================================================================================================

CUDA = torch.device("cuda", 0)
CANDIDATES = (256, 512, 1024, 2048, 4096, 8192)
CALL = dict(
    rows=5000,
    vocab=128256,
    student_hidden=2048,
    teacher="hidden",
    teacher_dim=4096,
    dtype=torch.bfloat16,
    divergence="forward_kl",
    with_ce=True,
    with_grad=True,
)


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path, tuning_env):
    """resolve_chunk_size's real CUDA path on a CPU-only machine (device queries stubbed, no
    benchmark problem built), with conftest's private cache dir and empty memo; yields the dir."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        sweep, "build_problem", lambda key, device: type("P", (), {"key": key, "rows": key.rows_bucket})()
    )
    monkeypatch.setattr(sweep, "distill_step", lambda problem, chunk, distill: lambda: None)
    return tmp_path / "cache"


def _bench(monkeypatch, outcomes: dict) -> list[int]:
    """bench_chunk_size replaced: ``outcomes[chunk]`` is ms, or an exception to raise. Returns
    the candidates of each sweep, once each (SweepCalls.chunks)."""
    sweeps = SweepCalls()

    def bench(problem, chunk_size, distill, *, warmup, repeat):
        sweeps.record(problem, chunk_size)
        result = outcomes.get(chunk_size, 10.0)
        if isinstance(result, BaseException):
            raise result
        return result, 0

    monkeypatch.setattr(sweep, "bench_chunk_size", bench)
    return sweeps.chunks


def _stored(cache_dir) -> dict:
    files = [p for p in cache_dir.iterdir() if p.suffix == ".json"]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _tune(key, preferred):
    problem = sweep.build_problem(key, CUDA)
    return sweep.tune_in_process(key, preferred, device=CUDA, problem=problem, distill=None)


def _resolve(**overrides):
    return tuning.resolve_chunk_size("auto", device=CUDA, tune=_tune, **{**CALL, **overrides})


def test_failing_candidates_are_skipped_and_recorded(monkeypatch, fake_cuda):
    """OOM on the big chunks, a compile failure and an error on others: the fastest survivor
    wins, is saved, and the failures are recorded with their reasons."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
    outcomes = {
        8192: oom,
        4096: oom,
        2048: RuntimeError("triton compilation failed: out of resources"),
        1024: 3.0,
        512: 2.0,
        256: ValueError("bad block"),
    }
    calls = _bench(monkeypatch, outcomes)
    assert _resolve() == 512
    assert sorted(calls) == list(CANDIDATES)
    (entry,) = [e["value"] for e in _stored(fake_cuda)["entries"].values()]
    errors = {m["chunk_size"]: m["error"] for m in entry["measurements"]}
    assert errors[8192].startswith("OOM: CUDA out of memory") and errors[4096].startswith("OOM")
    assert errors[2048] == "RuntimeError: triton compilation failed: out of resources"
    assert errors[256] == "ValueError: bad block" and errors[512] is None and errors[1024] is None
    assert entry["chunk_size"] == 512 and entry["complete"] is True


@pytest.mark.parametrize("content", [b'{"device": "Fake GPU (sm_90)", "entries": {"k": ', b"\x00" * 64, b"null"])
def test_corrupt_cache_file_is_rebuilt_with_one_warning(monkeypatch, fake_cuda, content):
    calls = _bench(monkeypatch, {1024: 1.0})
    fake_cuda.mkdir(parents=True)
    path = fake_cuda / "Fake_GPU_sm_90.json"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _resolve() == 1024
        tuning.clear_memo()
        assert _resolve(rows=6000) == 1024  # same key, from the rebuilt file
    assert len([w for w in caught if issubclass(w.category, TuningCacheWarning)]) == 1
    assert "rebuilding" in str(next(w for w in caught if issubclass(w.category, TuningCacheWarning)).message)
    assert len(calls) == len(CANDIDATES)  # measured once
    doc = json.loads(path.read_text())
    assert doc["device"] == "Fake GPU (sm_90)" and len(doc["entries"]) == 1


def test_unwritable_cache_dir_falls_back_to_memory(monkeypatch, fake_cuda):
    """A read-only cache dir: chmod where permissions apply; as root (which ignores them) the
    write fails the same way, through a mkstemp that raises EACCES."""
    calls = _bench(monkeypatch, {2048: 1.0, 4096: 0.5})
    fake_cuda.mkdir(parents=True)
    as_root = not hasattr(os, "geteuid") or os.geteuid() == 0
    if as_root:

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(fake_cuda))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        monkeypatch.setattr(autotune.cache.tempfile, "mkstemp", refuse)
    else:
        fake_cuda.chmod(0o500)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _resolve() == 4096
            assert _resolve(rows=20000) == 4096  # a second key: still tuned, kept in memory
        unwritable = [w for w in caught if issubclass(w.category, TuningCacheWarning)]
        assert len(unwritable) == 1  # once per process and path
        assert "keeping results in memory" in str(unwritable[0].message)
        assert not [p for p in fake_cuda.iterdir() if p.suffix == ".json"]  # nothing written
        assert len(calls) == 2 * len(CANDIDATES)
    finally:
        fake_cuda.chmod(0o700)


def _tune_in_child(barrier, queue) -> None:
    tuning.clear_memo()
    barrier.wait()  # all tune, read-merge-write at the same time
    try:
        queue.put(_resolve())
    except BaseException as exc:
        queue.put(repr(exc))


def test_8_processes_tuning_one_key_leave_one_valid_file(monkeypatch, fake_cuda):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (the stubs are monkeypatched into this process)")
    _bench(monkeypatch, {1024: 1.0})
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_tune_in_child, args=(barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert results == [1024] * 8
    doc = _stored(fake_cuda)  # exactly one .json, and valid JSON
    assert len(doc["entries"]) == 1
    (entry,) = doc["entries"].values()
    assert entry["value"]["chunk_size"] == 1024
    leftovers = [p.name for p in fake_cuda.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    tuning.clear_memo()
    assert _resolve() == 1024  # and this process reads it
