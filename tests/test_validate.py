"""Argument checks (kdfuse.validate): THE table of bad inputs and the errors they raise.

:data:`BAD_INPUTS` is every mistake the tests know, each with the ``ValueError``/``TypeError`` it
must raise and a regex its message must match (naming the argument and, for tensors, the shapes).
One mistake is a change to a valid call's keyword arguments: a dict (its tensors sized for the
fixed call :func:`base` of its teacher form), or a function of the call it breaks (then it breaks
any valid call of its forms, and its message may be a function of the call too).

The table is run
* on the fixed calls, through ``fused_linear_distill`` and its reference, with ``validate`` on and
  off (only the value checks, labels and top-k ids in range, depend on it);
* the checks of check_inputs directly, and the value checks and the divergence's output shape in
  every mode of the engine (with and without gradient, per-row or reduced, with and without CE);
* on drawn valid calls (helpers.valid_calls: every dtype, rank, N = 0, teacher form, option):
  one mistake of the table per call must raise that mistake's error, not another check's.

Also here: what the checks must accept (flattened leading dims, NumPy scalars, out-of-range labels
with ``validate=False``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import F64, INF, NAN, Problem, assert_close_scaled, compare_to_reference, inputs, valid_calls
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref, validate

FUNCTIONS = [fused_linear_distill, fused_linear_distill_ref]
FN_IDS = ["fused", "ref"]
FORMS = ("hidden", "logits", "topk")
DENSE = ("hidden", "logits")
TOPK_DIVERGENCE = "topk_forward_kl_renormalize"


def base(form: str = "hidden") -> dict:
    """The fixed valid call of a teacher form: float32, leading dims (2, 3), Hs = 4, V = 5, a
    hidden teacher (Ht = 6), teacher logits or top-2 ids, labels in range (none ignored)."""
    if form == "topk":
        args = inputs(teacher="logits")
        del args["teacher_logits"]
        ids = torch.tensor([[[0, 1], [2, 3], [1, 0]], [[4, 3], [0, 2], [3, 2]]])
        args.update(teacher_topk=(ids, torch.full((2, 3, 2), math.log(0.4))), divergence=TOPK_DIVERGENCE)
    else:
        args = inputs(teacher=form)
    return {**args, "impl": "eager"}


# --- what a valid call is made of ------------------------------------------------------------------


def form_of(a: dict) -> str:
    if a.get("teacher_hidden") is not None or a.get("teacher_weight") is not None:
        return "hidden"
    return "topk" if a.get("teacher_topk") is not None else "logits"


def rows(a: dict) -> int:
    return math.prod(a["student_hidden"].shape[:-1])


def leading(a: dict) -> tuple[int, ...]:
    return tuple(a["student_hidden"].shape[:-1])


def vocab(a: dict) -> int:
    return a["student_weight"].shape[0]


def width(a: dict) -> int:
    return a["student_weight"].shape[1]


def dtype_of(a: dict) -> torch.dtype:
    return a["student_hidden"].dtype


def dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype != torch.float32 else F64


def ignore_index(a: dict) -> int:
    return a.get("ignore_index", -100)


def has_labels(a: dict) -> bool:
    return a.get("labels") is not None


def some_rows(a: dict) -> bool:
    return rows(a) > 0


def shape_re(shape) -> str:
    """A shape as kdfuse's messages print it, ``(2, 3)``, escaped for a regex."""
    return re.escape("(" + ", ".join(str(d) for d in shape) + ")")


def tuple_re(t: tuple) -> str:
    return re.escape(str(tuple(t)))


def transposable(a: dict) -> bool:
    """Leading dims of rank >= 2 that reversed are another layout of the same rows."""
    lead = leading(a)
    return len(lead) >= 2 and lead[::-1] != lead


def teacher_rows_tensor(a: dict) -> Tensor:
    return a["teacher_hidden"] if form_of(a) == "hidden" else a["teacher_logits"]


def grow_one_row(x: Tensor, n: int) -> Tensor:
    """``x`` flattened to (n, last) with one more row (a copy of the first, or zeros)."""
    flat = x.reshape(n, x.shape[-1])  # explicit: reshape(0, -1) is ambiguous
    return torch.cat([flat, flat[:1] if n else flat.new_zeros(1, flat.shape[1])])


def bad_shape(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A user divergence returning ``kind`` instead of per-row losses (R,)."""

    def divergence(student, teacher):
        loss = D.forward_kl(student, teacher)
        return {
            "(R, V)": student - student.mean(-1, keepdim=True) + 0 * loss[:, None],
            "scalar": loss.sum(),
            "(R, 1)": loss[:, None],
            "(1, R)": loss[None, :],
        }[kind]

    divergence.__name__ = "bad_shape"
    return divergence


def bad_shape_text(kind: str, n: int, v: int) -> str:
    return {"(R, V)": f"({n}, {v})", "scalar": "()", "(R, 1)": f"({n}, 1)", "(1, R)": f"(1, {n})"}[kind]


def out_of_range_ids(a: dict, bad: int) -> dict:
    """The first row's first top-k id set to ``bad``, that row made to count (a label in range:
    an ignored row's ids are padding, neither read nor checked)."""
    ids, logprobs = a["teacher_topk"]
    ids = ids.clone()
    ids.view(rows(a), -1)[0, 0] = bad
    change = dict(teacher_topk=(ids, logprobs), validate=True)
    if has_labels(a):
        y = a["labels"].clone()
        y.view(-1)[0] = next(v for v in range(vocab(a)) if v != ignore_index(a))
        change["labels"] = y
    return change


def label_out_of_range(a: dict, bad: Callable[[dict], int]) -> dict:
    y = a["labels"].clone()
    y.view(-1)[0] = bad(a)
    return dict(labels=y, validate=True)


# --- the table -------------------------------------------------------------------------------------


def always(a: dict) -> bool:
    return True


def _holds_tensor(value: object) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, (tuple, list)) and any(map(_holds_tensor, value)))


@dataclass(frozen=True)
class Bad:
    """One mistake: ``change`` to a valid call's keyword arguments (a dict, or a function of the
    call), the error and the regex (or a function of the call giving it) its message must match.
    ``forms``: the teacher forms it applies to (the first is the fixed base's); ``when``: what a
    drawn call must also satisfy; ``by``: the check that raises it (``"check_inputs"``,
    ``"resolve"`` the divergence, ``"normalizer"``, ``"values"`` (labels and ids in range: with
    validate=True only, which the change sets), ``"output"`` (the divergence's output shape))."""

    change: dict | Callable[[dict], dict]
    error: type[Exception]
    match: str | Callable[[dict], str]
    forms: tuple[str, ...] = FORMS
    when: Callable[[dict], bool] = always
    by: str = "check_inputs"

    @property
    def anywhere(self) -> bool:
        """Whether it breaks any valid call of its forms (else only the base, which its tensors
        are sized for)."""
        return callable(self.change) or not any(_holds_tensor(v) for v in self.change.values())

    def applies_to(self, a: dict) -> bool:
        return self.anywhere and form_of(a) in self.forms and self.when(a)

    def apply(self, a: dict) -> tuple[dict, str]:
        change = self.change(a) if callable(self.change) else self.change
        match = self.match(a) if callable(self.match) else self.match
        return {**a, **change}, match


NO_TEACHER = dict(teacher_hidden=None, teacher_weight=None, teacher_logits=None, teacher_topk=None, teacher_bias=None)
LABELS_RANGE = r"labels has {count} value\(s\) outside \[0, 5\) that are not ignore_index={ii}"


def number_rows(name: str, values: list, error, match: str, **bad) -> dict[str, Bad]:
    """A row per bad value of a Python-number option; ``match`` is formatted with the value's repr."""
    return {f"{name} {v!r}": Bad({name: v}, error, match.format(v=re.escape(repr(v))), **bad) for v in values}


def student_rows() -> dict[str, Bad]:
    return {
        "hidden/weight width": Bad(
            dict(student_weight=torch.randn(5, 3)),
            ValueError,
            r"Hs=3: student_hidden \(2, 3, 4\), student_weight \(5, 3\)",
        ),
        "weight width": Bad(
            lambda a: dict(student_weight=torch.zeros(vocab(a), width(a) + 1, dtype=dtype_of(a))),
            ValueError,
            lambda a: (
                rf"student_hidden's last dim must equal student_weight's Hs={width(a) + 1}: "
                rf"student_hidden {shape_re(a['student_hidden'].shape)}, student_weight \({vocab(a)}, {width(a) + 1}\)"
            ),
        ),
        "weight rank 3": Bad(
            dict(student_weight=torch.randn(5, 4, 1)),
            ValueError,
            r"student_weight must be \(V, Hs\), got shape \(5, 4, 1\)",
        ),
        "weight rank": Bad(
            lambda a: dict(student_weight=a["student_weight"][None]),
            ValueError,
            lambda a: rf"student_weight must be \(V, Hs\), got shape \(1, {vocab(a)}, {width(a)}\)",
        ),
        "hidden 0-d": Bad(
            lambda a: dict(student_hidden=torch.tensor(1.0, dtype=dtype_of(a))),
            ValueError,
            lambda a: rf"student_hidden's last dim must equal student_weight's Hs={width(a)}: student_hidden \(\)",
        ),
        "Hs = 0": Bad(
            lambda a: dict(
                student_hidden=torch.zeros(*leading(a), 0, dtype=dtype_of(a)),
                student_weight=torch.zeros(vocab(a), 0, dtype=dtype_of(a)),
            ),
            ValueError,
            lambda a: rf"student_weight has Hs=0 \(no hidden features\): student_weight \({vocab(a)}, 0\)",
        ),
        "hidden int64": Bad(
            dict(student_hidden=torch.ones(2, 3, 4, dtype=torch.long)),
            TypeError,
            r"student_hidden must be a floating-point tensor, got torch.int64",
        ),
        "hidden int32": Bad(
            lambda a: dict(student_hidden=torch.zeros(*leading(a), width(a), dtype=torch.int32)),
            TypeError,
            r"student_hidden must be a floating-point tensor, got torch.int32",
        ),
        "hidden complex": Bad(
            dict(student_hidden=torch.randn(2, 3, 4, dtype=torch.complex64)),
            TypeError,
            r"student_hidden must be a floating-point tensor, got torch.complex64",
        ),
        # dtype mismatches: before these checks a bare "expected m1 and m2 to have the same dtype".
        "weight dtype": Bad(
            lambda a: dict(student_weight=a["student_weight"].to(other_dtype(dtype_of(a)))),
            TypeError,
            lambda a: (
                rf"the student's hidden states, weight and bias must share one dtype, got "
                rf"student_hidden={dname(dtype_of(a))}, student_weight={dname(other_dtype(dtype_of(a)))}"
            ),
        ),
        "student bias bfloat16": Bad(
            dict(student_bias=torch.randn(5, dtype=torch.bfloat16)), TypeError, r"student_bias=bfloat16"
        ),
        "bias dtype": Bad(
            lambda a: dict(student_bias=torch.zeros(vocab(a), dtype=other_dtype(dtype_of(a)))),
            TypeError,
            lambda a: (
                rf"share one dtype, got student_hidden={dname(dtype_of(a))}, "
                rf"student_weight={dname(dtype_of(a))}, student_bias={dname(other_dtype(dtype_of(a)))}"
            ),
        ),
        "student bias (4,)": Bad(
            dict(student_bias=torch.randn(4)), ValueError, r"student_bias must have shape \(5,\), got \(4\)"
        ),
        "student bias (1, 5)": Bad(
            dict(student_bias=torch.randn(1, 5)), ValueError, r"student_bias must have shape \(5,\), got \(1, 5\)"
        ),
        "bias shape": Bad(
            lambda a: dict(student_bias=torch.zeros(vocab(a) + 1, dtype=dtype_of(a))),
            ValueError,
            lambda a: rf"student_bias must have shape \({vocab(a)},\), got \({vocab(a) + 1}\)",
        ),
    }


def teacher_rows() -> dict[str, Bad]:
    n_rows = lambda a: rows(a)
    return {
        "no teacher": Bad(
            NO_TEACHER,
            ValueError,
            r"give exactly one teacher: teacher_hidden \+ teacher_weight, teacher_logits, or teacher_topk "
            r"\(got teacher_hidden=None, teacher_weight=None, teacher_logits=None, teacher_topk=None\)",
        ),
        "two teachers": Bad(
            lambda a: dict(teacher_logits=torch.zeros(*leading(a), vocab(a), dtype=dtype_of(a))),
            ValueError,
            r"exactly one teacher.*teacher_hidden=set, teacher_weight=set, teacher_logits=set",
            forms=("hidden",),
        ),
        "half a teacher": Bad(
            dict(teacher_weight=None, teacher_bias=None),
            ValueError,
            r"teacher_hidden and teacher_weight must be given together",
            forms=("hidden",),
        ),
        "teacher weight not a tensor": Bad(
            dict(teacher_weight=[[1.0]]), TypeError, r"teacher_weight must be a Tensor, got list", forms=("hidden",)
        ),
        "teacher hidden/weight width": Bad(
            dict(teacher_weight=torch.randn(5, 7)),
            ValueError,
            r"Ht=7: teacher_hidden \(2, 3, 6\), teacher_weight \(5, 7\)",
            forms=("hidden",),
        ),
        "teacher width": Bad(
            lambda a: dict(
                teacher_weight=torch.zeros(a["teacher_weight"].shape[0], a["teacher_hidden"].shape[-1] + 1).to(
                    dtype_of(a)
                )
            ),
            ValueError,
            lambda a: rf"teacher_hidden's last dim must equal teacher_weight's Ht={a['teacher_hidden'].shape[-1] + 1}",
            forms=("hidden",),
        ),
        "Ht = 0": Bad(
            dict(teacher_hidden=torch.randn(2, 3, 0), teacher_weight=torch.randn(5, 0)),
            ValueError,
            r"teacher_weight has Ht=0",
            forms=("hidden",),
        ),
        "teacher weight vocab": Bad(
            lambda a: dict(teacher_weight=a["teacher_weight"][: vocab(a) - 1]),
            ValueError,
            lambda a: (
                rf"teacher vocabulary {vocab(a) - 1} is smaller than the student's {vocab(a)}: "
                rf"teacher_weight \({vocab(a) - 1}, {a['teacher_weight'].shape[1]}\)"
            ),
            forms=("hidden",),
        ),
        "teacher hidden rows": Bad(
            lambda a: dict(teacher_hidden=grow_one_row(a["teacher_hidden"], rows(a))),
            ValueError,
            lambda a: (
                rf"teacher_hidden has {n_rows(a) + 1} rows, student_hidden {n_rows(a)}: shapes "
                rf"\({n_rows(a) + 1}, {a['teacher_hidden'].shape[-1]}\) vs {shape_re(a['student_hidden'].shape)}"
            ),
            forms=("hidden",),
        ),
        "teacher hidden (2, 4, 6)": Bad(
            dict(teacher_hidden=torch.randn(2, 4, 6)),
            ValueError,
            r"teacher_hidden has 8 rows, student_hidden 6: shapes \(2, 4, 6\) vs \(2, 3, 4\)",
            forms=("hidden",),
        ),
        "teacher layout": Bad(
            lambda a: dict(teacher_hidden=a["teacher_hidden"].reshape(*leading(a)[::-1], -1)),
            ValueError,
            lambda a: (
                rf"teacher_hidden's leading dims {tuple_re(leading(a)[::-1])} do not match "
                rf"student_hidden's {tuple_re(leading(a))}"
            ),
            forms=("hidden",),
            when=transposable,
        ),
        "teacher float16": Bad(
            dict(teacher_weight=torch.randn(5, 6, dtype=torch.float16)),
            TypeError,
            r"teacher_hidden=float32, teacher_weight=float16",
            forms=("hidden",),
        ),
        "teacher dtype": Bad(
            lambda a: dict(teacher_weight=a["teacher_weight"].to(other_dtype(dtype_of(a)))),
            TypeError,
            lambda a: (
                rf"the teacher's hidden states, weight and bias must share one dtype, got "
                rf"teacher_hidden={dname(dtype_of(a))}, teacher_weight={dname(other_dtype(dtype_of(a)))}"
            ),
            forms=("hidden",),
        ),
        "teacher bias (6,)": Bad(
            dict(teacher_bias=torch.randn(6)),
            ValueError,
            r"teacher_bias must have shape \(5,\), got \(6\)",
            forms=("hidden",),
        ),
        "teacher bias (4,)": Bad(
            dict(teacher_bias=torch.randn(4)),
            ValueError,
            r"teacher_bias must have shape \(5,\), got \(4\)",
            forms=("hidden",),
        ),
        "teacher bias shape": Bad(
            lambda a: dict(teacher_bias=torch.zeros(a["teacher_weight"].shape[0] + 2, dtype=dtype_of(a))),
            ValueError,
            lambda a: (
                rf"teacher_bias must have shape \({a['teacher_weight'].shape[0]},\), "
                rf"got \({a['teacher_weight'].shape[0] + 2}\)"
            ),
            forms=("hidden",),
        ),
        # Teacher logits.
        "teacher logits vocab": Bad(
            lambda a: dict(teacher_logits=a["teacher_logits"][..., : vocab(a) - 1]),
            ValueError,
            lambda a: (
                rf"teacher_logits' vocabulary {vocab(a) - 1} is smaller than the student's {vocab(a)}: "
                rf"teacher_logits {shape_re((*leading(a), vocab(a) - 1))}, student_weight \({vocab(a)}, {width(a)}\)"
            ),
            forms=("logits",),
        ),
        "teacher logits rows": Bad(
            lambda a: dict(teacher_logits=grow_one_row(a["teacher_logits"], rows(a))),
            ValueError,
            lambda a: rf"teacher_logits has {n_rows(a) + 1} rows, student_hidden {n_rows(a)}",
            forms=("logits",),
        ),
        "teacher logits (2, 4, 5)": Bad(
            dict(teacher_logits=torch.randn(2, 4, 5)),
            ValueError,
            r"teacher_logits has 8 rows, student_hidden 6: shapes \(2, 4, 5\) vs \(2, 3, 4\)",
            forms=("logits",),
        ),
        "teacher logits (5, 7)": Bad(
            dict(teacher_logits=torch.randn(5, 7)),
            ValueError,
            r"teacher_logits has 5 rows, student_hidden 6: shapes \(5, 7\) vs \(2, 3, 4\)",
            forms=("logits",),
        ),
        "teacher logits layout": Bad(
            lambda a: dict(teacher_logits=a["teacher_logits"].reshape(*leading(a)[::-1], -1)),
            ValueError,
            lambda a: (
                rf"teacher_logits's leading dims {tuple_re(leading(a)[::-1])} do not match "
                rf"student_hidden's {tuple_re(leading(a))}"
            ),
            forms=("logits",),
            when=transposable,
        ),
        "teacher logits int": Bad(
            lambda a: dict(teacher_logits=torch.zeros(*leading(a), vocab(a), dtype=torch.int64)),
            TypeError,
            r"teacher_logits must be a floating-point tensor, got torch.int64",
            forms=("logits",),
        ),
        "teacher bias with logits": Bad(
            lambda a: dict(teacher_bias=torch.zeros(vocab(a), dtype=dtype_of(a))),
            ValueError,
            r"teacher_bias goes with teacher_weight, not with teacher_logits or teacher_topk",
            forms=("logits",),
        ),
        # Top-k teacher.
        "top-k rows": Bad(
            lambda a: dict(teacher_topk=tuple(grow_one_row(x, rows(a)) for x in a["teacher_topk"])),
            ValueError,
            lambda a: rf"teacher_topk ids and logprobs must both be \(\.\.\., k\) with {n_rows(a)} rows",
            forms=("topk",),
        ),
        "ids float": Bad(
            lambda a: dict(teacher_topk=(a["teacher_topk"][0].to(F64), a["teacher_topk"][1])),
            TypeError,
            r"teacher_topk ids must be an integer tensor, got torch.float64",
            forms=("topk",),
        ),
        "k > V": Bad(
            lambda a: dict(
                teacher_topk=(
                    torch.zeros(*leading(a), vocab(a) + 1, dtype=torch.long),
                    torch.zeros(*leading(a), vocab(a) + 1),
                )
            ),
            ValueError,
            lambda a: rf"teacher_topk has k={vocab(a) + 1} > the student's vocabulary {vocab(a)}",
            forms=("topk",),
        ),
        "ids/logprobs shapes": Bad(
            lambda a: dict(
                teacher_topk=(a["teacher_topk"][0], torch.zeros(*leading(a), a["teacher_topk"][0].shape[-1] + 1))
            ),
            ValueError,
            lambda a: (
                rf"teacher_topk ids and logprobs must both be \(\.\.\., k\) with {n_rows(a)} rows: "
                rf"ids {shape_re(a['teacher_topk'][0].shape)}, "
                rf"logprobs {shape_re((*leading(a), a['teacher_topk'][0].shape[-1] + 1))}"
            ),
            forms=("topk",),
        ),
    }


def label_rows() -> dict[str, Bad]:
    n_rows = lambda a: rows(a)
    return {
        "labels (7,)": Bad(
            dict(labels=torch.zeros(7, dtype=torch.long)),
            ValueError,
            r"labels has 7 elements, student_hidden 6 rows: shapes \(7\) vs \(2, 3, 4\)",
        ),
        "labels (5,)": Bad(
            dict(labels=torch.zeros(5, dtype=torch.long)),
            ValueError,
            r"labels has 5 elements, student_hidden 6 rows: shapes \(5\) vs \(2, 3, 4\)",
        ),
        "labels count": Bad(
            lambda a: dict(labels=torch.zeros(n_rows(a) + 1, dtype=torch.long)),
            ValueError,
            lambda a: rf"labels has {n_rows(a) + 1} elements, student_hidden {n_rows(a)} rows",
        ),
        # Same row count, transposed layout: rows would pair up wrongly.
        "labels layout": Bad(
            lambda a: dict(labels=a["labels"].reshape(leading(a)[::-1])),
            ValueError,
            lambda a: (
                rf"labels's leading dims {tuple_re(leading(a)[::-1])} do not match student_hidden's "
                rf"{tuple_re(leading(a))}"
            ),
            when=lambda a: has_labels(a) and transposable(a),
        ),
        "labels not a tensor": Bad(
            dict(labels=[0, 1, 2, 3, 4, 0]), TypeError, r"labels must be an integer tensor, got list"
        ),
        "labels float32": Bad(
            dict(labels=torch.zeros(2, 3)), TypeError, r"labels must be an integer tensor, got torch.float32"
        ),
        "labels float16": Bad(dict(labels=torch.zeros(2, 3, dtype=torch.float16)), TypeError, r"labels.*float16"),
        "labels float64": Bad(
            lambda a: dict(labels=a["labels"].to(F64)),
            TypeError,
            r"labels must be an integer tensor, got torch.float64",
            when=has_labels,
        ),
        "labels bool": Bad(
            dict(labels=torch.zeros(2, 3, dtype=torch.bool)),
            TypeError,
            r"labels must be an integer tensor, got torch.bool",
        ),
        "labels complex": Bad(dict(labels=torch.zeros(2, 3, dtype=torch.complex64)), TypeError, r"labels.*complex64"),
        "CE without labels": Bad(
            dict(labels=None, hard_weight=0.5), ValueError, r"hard_weight=0.5 needs labels for the cross-entropy"
        ),
        "ignore_index float": Bad(
            lambda a: dict(ignore_index=float(ignore_index(a))),
            TypeError,
            lambda a: rf"ignore_index must be an int, got {re.escape(repr(float(ignore_index(a))))}: pass a Python int",
        ),
        "ignore_index None": Bad(dict(ignore_index=None), TypeError, r"ignore_index must be an int, got None"),
        "ignore_index bool": Bad(dict(ignore_index=True), TypeError, r"ignore_index must be an int, got True"),
    }


def device_rows() -> dict[str, Bad]:
    """A tensor on another device (the shape-only "meta" device stands in for a GPU): a
    ValueError listing every tensor's device, raised before any kernel touches the data."""

    def on_meta(name: str) -> Callable[[dict], dict]:
        return lambda a: {name: a[name].to("meta")}

    def match(name: str) -> str:
        return rf"all tensors must be on one device, got .*{name}=meta"

    return {
        "meta student_hidden": Bad(on_meta("student_hidden"), ValueError, match("student_hidden")),
        "meta student_weight": Bad(on_meta("student_weight"), ValueError, match("student_weight")),
        "meta student_bias": Bad(
            lambda a: dict(student_bias=torch.zeros(vocab(a), dtype=dtype_of(a), device="meta")),
            ValueError,
            match("student_bias"),
        ),
        "meta teacher_hidden": Bad(on_meta("teacher_hidden"), ValueError, match("teacher_hidden"), forms=("hidden",)),
        "meta teacher_logits": Bad(on_meta("teacher_logits"), ValueError, match("teacher_logits"), forms=("logits",)),
        "meta teacher_topk ids": Bad(
            lambda a: dict(teacher_topk=(a["teacher_topk"][0].to("meta"), a["teacher_topk"][1])),
            ValueError,
            match("teacher_topk_ids"),
            forms=("topk",),
        ),
        "meta labels": Bad(on_meta("labels"), ValueError, match("labels"), when=has_labels),
    }


def option_rows() -> dict[str, Bad]:
    positive = r"{name} must be a finite number > 0, got {{v}}"
    finite = r"{name} must be a finite number, got {{v}}"
    chunk = r"chunk_size must be an int >= 1 or 'auto', got {v}"
    table = {
        **number_rows(
            "temperature",
            [0, 0.0, -1.0, NAN, INF, -INF, True, "1", None],
            ValueError,
            positive.format(name="temperature"),
        ),
        "temperature tensor": Bad(
            dict(temperature=torch.tensor(2.0)),
            ValueError,
            r"temperature must be a Python number \(a finite number > 0\), not a tensor \(got shape \(\) "
            r"on cpu\): converting it would sync the device, so pass temperature=float\(\.\.\.\) instead",
        ),
        **number_rows("softcap", [0.0, -2.0, NAN, INF, True], ValueError, positive.format(name="softcap")),
        **number_rows(
            "soft_weight", [NAN, INF, -INF, "1", None, True, False], ValueError, finite.format(name="soft_weight")
        ),
        # With hard_weight != 0 the labels are needed first: only calls with labels reach this check.
        **number_rows("hard_weight", [INF], ValueError, finite.format(name="hard_weight"), when=has_labels),
        **number_rows("chunk_size", [0, -1, -4, True, False, 2.5, "8", None, "AUTO"], ValueError, chunk),
        **number_rows(
            "reduction",
            ["avg", "MEAN", None, "", "batchmean"],
            ValueError,
            r"reduction must be one of \('mean', 'sum', 'none'\), got {v}",
        ),
        **number_rows(
            "impl", ["triton", None, "Eager"], ValueError, r"impl must be one of \('compile', 'eager'\), got {v}"
        ),
        "memory_budget str": Bad(
            dict(memory_budget="lots"),
            ValueError,
            r"memory_budget: memory budget must be bytes > 1 .* or a fraction in \(0, 1\] .*, got 'lots'",
        ),
        "memory_budget 0": Bad(dict(memory_budget=0), ValueError, r"memory_budget: .* got 0$"),
        "memory_budget bool": Bad(dict(memory_budget=True), ValueError, r"memory_budget: .* got True$"),
        "memory_budget partial bytes": Bad(
            dict(memory_budget=1.5), ValueError, r"memory_budget: .* must be whole, got 1.5"
        ),
    }
    return table


def divergence_rows() -> dict[str, Bad]:
    resolve = dict(by="resolve")
    table = {
        "divergence 'forward_kl_'": Bad(
            dict(divergence="forward_kl_"),
            ValueError,
            r"unknown divergence 'forward_kl_' \(did you mean 'forward_kl'.*\); built-ins: ",
            **resolve,
        ),
        "divergence 'forward-kl'": Bad(
            dict(divergence="forward-kl"),
            ValueError,
            r"unknown divergence 'forward-kl' \(did you mean 'forward_kl'.*\); built-ins: ",
            **resolve,
        ),
        **{
            f"divergence {name!r}": Bad(
                dict(divergence=name), ValueError, rf"unknown divergence '{name}'.*; built-ins: ", **resolve
            )
            for name in ("kl", "kl_forward", "topk_forward_kl")
        },
        **{
            f"divergence {name!r}": Bad(
                dict(divergence=name), ValueError, rf"{param} must be in \[0, 1\], got {value}", **resolve
            )
            for name, param, value in (
                ("jsd_beta1.5", "beta", "1.5"),
                ("jsd_beta2", "beta", "2.0"),
                ("jsd_beta-0.1", "beta", "-0.1"),
                ("skew_kl_alpha2", "alpha", "2.0"),
            )
        },
        **{
            f"divergence {value!r}": Bad(
                dict(divergence=value),
                TypeError,
                rf"divergence must be a name or a callable, got {type(value).__name__}",
                **resolve,
            )
            for value in (3, None, 0.5)
        },
        "sparse divergence, hidden teacher": Bad(
            dict(divergence="topk_forward_kl_bucket"),
            ValueError,
            r"divergence topk_forward_kl_bucket takes a top-k teacher: pass teacher_topk=\(ids, logprobs\)",
            forms=DENSE,
            **resolve,
        ),
        "sparse divergence, dense teacher": Bad(
            dict(divergence="topk_soft_ce_bucket"),
            ValueError,
            r"divergence topk_soft_ce_bucket takes a top-k teacher",
            forms=("logits", "hidden"),
            **resolve,
        ),
        "dense divergence, top-k teacher": Bad(
            dict(divergence="forward_kl"),
            ValueError,
            r"teacher_topk needs a sparse divergence from kdfuse.topk \(e.g. 'topk_forward_kl_renormalize'\), "
            r"got forward_kl",
            forms=("topk",),
            **resolve,
        ),
    }
    # A user divergence whose output is not per-row losses, found by the chunk function (the
    # whole call one chunk, so the message names all rows).
    for kind in ("(R, V)", "scalar", "(R, 1)", "(1, R)"):
        table[f"divergence output {kind}"] = Bad(
            lambda a, kind=kind: dict(divergence=bad_shape(kind), chunk_size=rows(a) + 16),
            ValueError,
            lambda a, kind=kind: (
                rf"divergence bad_shape returned shape "
                rf"{re.escape(bad_shape_text(kind, rows(a), vocab(a)))}, expected per-row losses \({rows(a)},\)"
            ),
            forms=DENSE,
            when=some_rows,
            by="output",
        )
    return table


def normalizer_rows() -> dict[str, Bad]:
    positive = r"normalizer must be a finite number > 0, got {v}"
    by = dict(by="normalizer")
    table = {
        f"normalizer {v!r} ({reduction})": Bad(
            dict(normalizer=v, reduction=reduction), ValueError, positive.format(v=re.escape(repr(v))), **by
        )
        for v, reduction in ((0, "mean"), (0.0, "sum"), (-3.0, "mean"), (-2.0, "sum"), (NAN, "mean"), (INF, "sum"))
    }
    table.update(
        {
            "normalizer vector": Bad(
                lambda a: dict(normalizer=torch.tensor([1.0, 2.0]), reduction="mean"),
                ValueError,
                r"normalizer must be a number or a one-element tensor, got shape \(2\)",
                **by,
            ),
            "normalizer str": Bad(
                dict(normalizer="8", reduction="mean"),
                TypeError,
                r"normalizer must be a number or a tensor, got str",
                **by,
            ),
            "normalizer bool": Bad(
                dict(normalizer=True, reduction="sum"),
                TypeError,
                r"normalizer must be a number or a tensor, got bool",
                **by,
            ),
            "normalizer with none": Bad(
                dict(normalizer=4.0, reduction="none"),
                ValueError,
                r"normalizer has no effect with reduction='none': pass it with 'mean' or 'sum'",
                **by,
            ),
        }
    )
    return table


def value_rows() -> dict[str, Bad]:
    values = dict(by="values")
    table = {
        f"labels {labels} (ignore_index={ii})": Bad(
            dict(labels=torch.tensor(labels).reshape(2, 3), ignore_index=ii, validate=True),
            ValueError,
            LABELS_RANGE.format(count=count, ii=ii),
            **values,
        )
        for labels, ii, count in (
            ([0, 1, 5, 2, 3, 4], -100, 1),  # == V
            ([0, -1, 1, 2, 3, 4], -100, 1),  # negative but not ignore_index
            ([0, -100, 1, 2, 3, 4], -1, 1),  # -100 is not *this* ignore_index
            ([0, 99, 7, -7, 3, -1], -1, 3),
        )
    }
    for name, bad in (
        ("V", lambda a: vocab(a)),
        ("V + 7", lambda a: vocab(a) + 7),
        ("-2", lambda a: -2),
        ("-101", lambda a: -101),
    ):
        table[f"label {name}"] = Bad(
            lambda a, bad=bad: label_out_of_range(a, bad),
            ValueError,
            lambda a: (
                rf"labels has \d+ value\(s\) outside \[0, {vocab(a)}\) that are not ignore_index={ignore_index(a)}"
            ),
            when=lambda a, bad=bad: has_labels(a) and some_rows(a) and bad(a) != ignore_index(a),
            **values,
        )
    table["top-k ids out of range"] = Bad(
        dict(
            teacher_topk=(
                torch.tensor([[[0, 1], [2, 5], [1, 0]], [[4, 3], [0, 0], [-1, 2]]]),
                torch.full((2, 3, 2), math.log(0.4)),
            ),
            validate=True,
        ),
        ValueError,
        r"teacher_topk ids has 2 value\(s\) outside \[0, 5\)",
        forms=("topk",),
        **values,
    )
    for name, bad in (("V", lambda a: vocab(a)), ("-1", lambda a: -1), ("1e6", lambda a: 10**6)):
        table[f"top-k id {name}"] = Bad(
            lambda a, bad=bad: out_of_range_ids(a, bad(a)),
            ValueError,
            lambda a: rf"teacher_topk ids has 1 value\(s\) outside \[0, {vocab(a)}\)",
            forms=("topk",),
            # (labels need a value in range that is not ignore_index, to make the row count)
            when=lambda a: some_rows(a) and (not has_labels(a) or any(v != ignore_index(a) for v in range(vocab(a)))),
            **values,
        )
    return table


BAD_INPUTS: dict[str, Bad] = {
    **student_rows(),
    **teacher_rows(),
    **label_rows(),
    **device_rows(),
    **option_rows(),
    **divergence_rows(),
    **normalizer_rows(),
    **value_rows(),
}


# --- the table on the fixed calls ------------------------------------------------------------------


def _cases(by: tuple[str, ...]) -> list[str]:
    return [name for name, bad in BAD_INPUTS.items() if bad.by in by]


def _params(validates: tuple[bool, ...]) -> list:
    """(case, validate): value checks only with validate=True (their change sets it anyway)."""
    return [
        pytest.param(name, v, id=f"{name}-validate={v}")
        for name, bad in BAD_INPUTS.items()
        for v in validates
        if bad.by != "values" or v
    ]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=FN_IDS)
@pytest.mark.parametrize("case,validate", _params((True, False)))
def test_bad_input_raises_its_error(case, validate, fn):
    bad = BAD_INPUTS[case]
    args, match = bad.apply({**base(bad.forms[0]), "validate": validate})
    with pytest.raises(bad.error, match=match) as info:
        fn(**args)
    assert str(info.value)


def _check_inputs(args: dict) -> str:
    """validate.check_inputs on a call's keyword arguments (fused_linear_distill's defaults)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(fused_linear_distill).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    a = {**defaults, **args}
    return validate.check_inputs(
        a["student_hidden"],
        a["student_weight"],
        a["teacher_hidden"],
        a["teacher_weight"],
        a["teacher_logits"],
        a["labels"],
        teacher_topk=a["teacher_topk"],
        student_bias=a["student_bias"],
        teacher_bias=a["teacher_bias"],
        temperature=a["temperature"],
        soft_weight=a["soft_weight"],
        hard_weight=a["hard_weight"],
        reduction=a["reduction"],
        chunk_size=a["chunk_size"],
        softcap=a["softcap"],
        impl=a["impl"],
        ignore_index=a["ignore_index"],
        memory_budget=a["memory_budget"],
    )


@pytest.mark.parametrize("case", _cases(by=("check_inputs",)))
def test_check_inputs_raises_it_itself(case):
    """Everything that reads no tensor value is validate.check_inputs' (so it runs whatever
    ``validate`` says), called here directly."""
    bad = BAD_INPUTS[case]
    args, match = bad.apply(base(bad.forms[0]))
    with pytest.raises(bad.error, match=match):
        _check_inputs(args)


@pytest.mark.parametrize("form", FORMS)
def test_check_inputs_accepts_the_bases(form):
    assert _check_inputs(base(form)) == form


ENGINE_MODES = [(True, "mean"), (True, "none"), (False, "mean")]


@pytest.mark.parametrize("hard_weight", [0.0, 1.0])
@pytest.mark.parametrize("grad,reduction", ENGINE_MODES, ids=["grad-mean", "grad-none", "no-grad"])
@pytest.mark.parametrize("case", _cases(by=("values", "output")))
def test_value_and_output_checks_in_every_mode(case, grad, reduction, hard_weight):
    """The value checks fire even when no cross-entropy reads the labels, and (hard_weight=1)
    before the first chunk's cross-entropy would index with them (an IndexError here); the
    divergence's output shape is checked on every path: in each of the engine's three modes
    (gradients in forward, per-row losses recomputed in backward, no gradient)."""
    bad = BAD_INPUTS[case]
    args, match = bad.apply({**base(bad.forms[0]), "hard_weight": hard_weight, "reduction": reduction})
    args["student_hidden"] = args["student_hidden"].detach().requires_grad_(grad)
    with pytest.raises(bad.error, match=match), torch.set_grad_enabled(grad):
        fused_linear_distill(**args)


def test_every_row_is_raised_by_one_check():
    assert {bad.by for bad in BAD_INPUTS.values()} == {"check_inputs", "resolve", "normalizer", "values", "output"}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fn", FUNCTIONS, ids=FN_IDS)
def test_the_bases_are_valid(form, fn):
    """The table's fixed calls compute (so each row's error is its own mistake's)."""
    out = fn(**base(form))
    assert out.shape == () and torch.isfinite(out)


# --- the table on drawn valid calls ----------------------------------------------------------------


@given(call=valid_calls(), data=st.data())
def test_a_mistake_in_any_valid_call_raises_its_own_error(call, data):
    """A valid call (every dtype, rank, N = 0, teacher form and option) with one mistake of the
    table: the error of *that* mistake, from both the combinator and its reference."""
    args, _ = call.args(leaves=False)
    cases = sorted(name for name, bad in BAD_INPUTS.items() if bad.applies_to(args))
    case = data.draw(st.sampled_from(cases), label="mistake")
    bad = BAD_INPUTS[case]
    broken, match = bad.apply(args)
    for fn in FUNCTIONS:
        with pytest.raises(bad.error, match=match) as info:
            fn(**broken)
        assert str(info.value)


# --- what the checks accept ----------------------------------------------------------------------


def test_flattened_row_aligned_tensors_are_still_accepted():
    """The layout check only refuses two *different multi-dim* layouts: a flattened side is fine."""
    t = inputs(leading=(2, 3), dtype=F64)
    base_out = fused_linear_distill(**t, hard_weight=0.5, impl="eager", reduction="none")
    flat = dict(t, labels=t["labels"].reshape(6), teacher_hidden=t["teacher_hidden"].reshape(6, 6))
    out = fused_linear_distill(**flat, hard_weight=0.5, impl="eager", reduction="none")
    assert_close_scaled(out, base_out, 1e-12)
    flat_student = dict(t, student_hidden=t["student_hidden"].reshape(6, 4))  # labels (2, 3) with (6, Hs) hidden
    out = fused_linear_distill(**flat_student, hard_weight=0.5, impl="eager", reduction="none")
    assert_close_scaled(out.reshape(2, 3), base_out, 1e-12)


def test_labels_out_of_range_without_validate_are_not_checked():
    """validate=False skips the host sync: out-of-range labels are then ordinary (valid) rows, and
    without the cross-entropy (which would index with them) the result is the reference's."""
    t = inputs(dtype=F64)
    t["labels"] = torch.tensor([[0, 7, -3], [2, -100, 4]])
    prob = Problem((2, 3), t, dict(validate=False, reduction="mean"))
    out, _ = compare_to_reference(prob)
    assert torch.isfinite(out)
    # 5 valid rows (only -100 is ignored): the same as giving those labels in range.
    in_range = dict(t, labels=torch.tensor([[0, 1, 1], [2, -100, 4]]))
    same, _ = Problem((2, 3), in_range, {}).call(fused_linear_distill, impl="eager")
    assert_close_scaled(out.detach(), same.detach(), 1e-12)


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
    numbers = {k: v for k, v in NUMPY_NUMBERS.items() if k != "normalizer"}
    assert _check_inputs({**base(), **numbers, "memory_budget": np.float32(0.5), "chunk_size": 4}) == "hidden"
    validate.check_normalizer(NUMPY_NUMBERS["normalizer"], "mean")


@pytest.mark.parametrize("fn", FUNCTIONS, ids=FN_IDS)
def test_numpy_scalars_are_numbers(fn):
    t = inputs(dtype=F64)
    out = fn(**t, **NUMPY_NUMBERS, chunk_size=4, impl="eager")
    assert_close_scaled(out, fn(**t, **PYTHON_NUMBERS, chunk_size=4, impl="eager"), 1e-12)


def test_numpy_scalars_with_chunk_size_auto(tuning_env):
    # NumPy's call first: an equal Python call's memoised choice would skip the tuning key.
    t = inputs(dtype=F64)
    out = fused_linear_distill(**t, **NUMPY_NUMBERS, impl="eager")
    assert_close_scaled(out, fused_linear_distill(**t, **PYTHON_NUMBERS, impl="eager"), 1e-12)
