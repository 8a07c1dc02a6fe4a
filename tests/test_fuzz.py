"""Hypothesis fuzz of the public API: every draw ends in a clear error or in the reference's result.

``test_fuzz_public_api`` draws a whole call of :func:`kdfuse.fused_linear_distill` (impl="eager":
CPU compiles would cost ~10 s per new graph) - shapes including N = 0, every input dtype, the three
teacher forms, labels with ignored rows, every built-in and a user divergence, temperatures from
0.05 to 20, softcap, reductions, normalizers, chunk sizes, ``validate``, which leaves need a
gradient - and then, for about a third of the draws, breaks exactly one thing (a shape, a dtype,
a device, a number, a name, a label value, a teacher form, ...). It then requires:

* a broken draw raises the ``ValueError``/``TypeError`` of *that* mistake (the message is matched:
  the check that fired is the one for the argument that was broken);
* a valid draw returns a finite loss (of the right shape and dtype) and finite gradients equal to
  the float64 reference's (:func:`kdfuse.fused_linear_distill_ref`) within the tolerance below.

Tolerance. Inputs are drawn on a grid every dtype holds exactly, such that the logits (at most 6
products of grid values plus a bias) are exact in bfloat16 too; so the fused path's logits equal
the reference's and the remaining error is (a) the float32 compute (float64 for float64 inputs)
and (b) rounding the logit gradient D and the gradient matmuls' outputs to the input dtype:

* float64: |fused - ref| <= 1e-9 |ref| + 1e-12 M (loss) or + err(D) propagated as below with
  err(D) = 1e-9 |D| + 1e-13 M_r (1 + 1/T) (gradients), M the magnitude of the terms that cancel
  (log-probabilities up to max|z|/T, the 1e4 log-probability floor in rows with masked teacher
  entries): the same function summed in another order;
* others, the loss (and parts): |fused - ref| <= 8 |ref32 - ref| + 1e-6 (|ref| + 1e-6), where
  ref32 is the reference computed at ``precision=float32``: what float32 math cannot resolve is
  allowed, but no more than 8 times what the reference itself loses;
* others, gradients, elementwise: |g - e| <= E + u |e| + floors, u the dtype's unit roundoff
  (2^-24, 2^-11, 2^-8), E the error of the logit gradient D propagated through the matmuls that
  form each gradient: with err(D) = 2u |D| (D and the matmul output rounded to the dtype) + 8x
  the float32 reference's worst error in that row of D (float32 cancellations, e.g. p_s - p_t
  at T = 20) + 2 eps32 M_r (1 + 1/T) (M_r as for float64: float32's rounding of the terms D is
  formed from, for rows where the float32 reference happens to be exact), E = err(D) @ |W| for
  the hidden states, err(D)^T @ |H| for the weight, and the column sums for the bias. D is
  exact (the reference with the logits as inputs). Floors: float32
  underflow (2^-126 per term) and float16 subnormals: 2^-25 for the returned gradients, and
  2^-38 max|D| for D (each chunk's D is scaled to a largest entry of 2^14 before rounding).

A float16 draw whose exact gradient lies beyond float16's range is counted as an event, not
checked (no float16 result can hold it).
Ignored rows whose teacher row is entirely -inf (padding) are drawn; valid rows always keep some
teacher support (a distribution with none has no divergence).
Out-of-range labels are drawn with ``validate=True`` (a ValueError), and with ``validate=False``
only without the cross-entropy (on CPU torch's cross_entropy would raise an IndexError: with
``validate=False`` the caller vouches for the labels).

Profiles (tests/conftest.py): ``ci`` (default) runs 20 examples; ``--hypothesis-profile long``
runs 10 000 (about 15 min on one CPU core); ``--hypothesis-show-statistics`` lists the outcomes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st
from test_fused import draw_labels, hellinger  # hellinger: a user divergence in plain torch ops

from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref

F64 = torch.float64
INF, NAN = float("inf"), float("nan")
DTYPES = [F64, torch.float32, torch.bfloat16, torch.float16]
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
STUDENT = ("student_hidden", "student_weight", "student_bias")

DENSE_NAMES = ["forward_kl", "reverse_kl", "soft_ce", "tvd", "mse_logits", "jsd", "jsd_beta0.1", "skew_kl_alpha0.3"]

PARAM = st.one_of(st.sampled_from([0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]), st.floats(0.0, 1.0))
DENSE = st.one_of(
    st.sampled_from(DENSE_NAMES),
    st.builds(D.jsd, PARAM),
    st.builds(D.skew_kl, PARAM),
    st.builds(D.skew_reverse_kl, PARAM),
    st.builds(D.symmetric_kl, PARAM),
    st.just(hellinger),
)
SPARSE = st.sampled_from(
    [f"topk_{k}_{t}" for k in ("forward_kl", "soft_ce") for t in ("renormalize", "bucket", "ignore")]
)


@dataclass
class Call:
    """One fused_linear_distill call: tensors (float64 grid values, cast to ``dtype`` when called),
    keyword arguments, and which student tensors are gradient leaves."""

    dtype: torch.dtype
    leading: tuple[int, ...]
    tensors: dict
    kwargs: dict
    grad_names: tuple[str, ...]
    raw: dict = field(default_factory=dict)  # tensors passed exactly as given (mutations)

    @property
    def rows(self) -> int:
        return math.prod(self.leading)

    def args(self, dtype=None, leaves: bool = True):
        """(positional-free keyword arguments, {name: leaf})."""
        args, made = {}, {}
        for name, t in self.tensors.items():
            if t is None:
                continue
            x = t.to(dtype or self.dtype) if t.is_floating_point() and name != "teacher_logprobs" else t
            if leaves and name in self.grad_names:
                x = x.detach().clone().requires_grad_()
                made[name] = x
            args[name] = x
        if "teacher_ids" in args:
            args["teacher_topk"] = (args.pop("teacher_ids"), args.pop("teacher_logprobs"))
        args.update(self.raw)
        return {**args, **self.kwargs}, made


# --------------------------------------------------------------------------------------------
# Drawing a valid call
# --------------------------------------------------------------------------------------------


@st.composite
def valid_calls(draw) -> Call:
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    rank = draw(st.integers(1, 3), label="rank")
    dims = st.integers(1, 4) | st.just(0) if draw(st.integers(0, 9), label="empty?") == 0 else st.integers(1, 4)
    leading = tuple(draw(st.lists(dims, min_size=rank, max_size=rank), label="leading"))
    while math.prod(leading) > 24:
        leading = leading[1:] + (1,)
    n = math.prod(leading)
    vocab = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 31]), label="V")
    hs, ht = draw(st.integers(1, 6), label="Hs"), draw(st.integers(1, 6), label="Ht")
    extra = draw(st.sampled_from([0, 0, 1, 3]), label="extra teacher vocab")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    scale = 2.0 ** draw(st.integers(-2, 2), label="log2 weight scale")

    def grid(*shape, lo, hi, unit):  # integers in [lo, hi] times unit: exact in every dtype
        return torch.randint(lo, hi + 1, shape, generator=gen).to(F64) * unit

    # |h.w| <= 2 * 2^k per product, <= 12 * 2^k over 6 features, on a grid of 2^k / 8; with the
    # bias (|b| <= 1/2, grid 1/8) every logit is < 256 grid steps: exact in bfloat16.
    t = {
        "student_hidden": grid(*leading, hs, lo=-4, hi=4, unit=0.5),
        "student_weight": grid(vocab, hs, lo=-4, hi=4, unit=scale / 4),
        "student_bias": grid(vocab, lo=-4, hi=4, unit=0.125) if draw(st.booleans(), label="bias") else None,
    }
    teacher = draw(st.sampled_from(["hidden", "logits", "topk"]), label="teacher")
    if teacher == "hidden":
        t["teacher_hidden"] = grid(*leading, ht, lo=-4, hi=4, unit=0.5)
        t["teacher_weight"] = grid(vocab + extra, ht, lo=-4, hi=4, unit=scale / 4)
        if draw(st.booleans(), label="teacher bias"):
            t["teacher_bias"] = grid(vocab + extra, lo=-4, hi=4, unit=0.125)
    else:
        logits = grid(*leading, vocab + extra, lo=-96, hi=96, unit=scale / 8)
        if vocab > 1 and draw(st.booleans(), label="teacher -inf"):
            mask = torch.rand(logits.shape, generator=gen) < draw(st.sampled_from([0.3, 0.9]), label="masked")
            mask[..., torch.randint(0, vocab, (), generator=gen)] = False  # a teacher needs some support
            logits = logits.masked_fill(mask, -INF)
        if teacher == "logits":
            t["teacher_logits"] = logits
        else:
            k = draw(st.integers(1, vocab), label="k")
            lp = logits[..., :vocab].log_softmax(-1) if vocab else logits[..., :vocab]
            top, ids = lp.topk(k, dim=-1)
            t["teacher_ids"] = ids.to(draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
            t["teacher_logprobs"] = top.float()  # data, in any float dtype; exact as given

    ignore_index = draw(st.sampled_from([-100, -1, vocab]), label="ignore_index")
    labels = draw_labels(draw, gen, leading, vocab, ignore_index)
    if labels is not None:
        t["labels"] = labels
        if teacher != "hidden" and draw(st.booleans(), label="ignored rows: teacher all -inf"):
            ignored = (labels == ignore_index)[..., None]  # e.g. padding stored as -inf
            name = "teacher_logits" if teacher == "logits" else "teacher_logprobs"
            t[name] = t[name].masked_fill(ignored, -INF)

    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    temperature = draw(st.one_of(st.sampled_from([0.05, 1.0, 20.0]), st.floats(0.05, 20.0)), label="temperature")
    kwargs = dict(
        divergence=draw(SPARSE if teacher == "topk" else DENSE, label="divergence"),
        temperature=temperature,
        soft_weight=draw(st.sampled_from([1.0, 0.0, 0.5, 2.0, min(1.0, temperature**2)]), label="soft_weight"),
        hard_weight=0.0 if labels is None else draw(st.sampled_from([0.0, 0.5, 1.0]), label="hard_weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=draw(st.one_of(st.just("auto"), st.integers(1, n + 3)), label="chunk_size"),
        softcap=draw(st.sampled_from([None, None, 2.0, 30.0]), label="softcap"),
        return_parts=draw(st.booleans(), label="return_parts"),
        validate=draw(st.booleans(), label="validate"),
        impl="eager",
    )
    if reduction != "none" and draw(st.booleans(), label="normalizer"):
        value = draw(st.floats(0.5, 64.0), label="normalizer value")
        kwargs["normalizer"] = torch.tensor(value) if draw(st.booleans(), label="as tensor") else value
    grad_names = tuple(draw(st.lists(st.sampled_from(STUDENT), unique=True, max_size=3), label="grad leaves"))
    return Call(dtype, leading, t, kwargs, tuple(g for g in grad_names if t.get(g) is not None))


# --------------------------------------------------------------------------------------------
# Breaking it: one mistake per draw, and the error it must raise
# --------------------------------------------------------------------------------------------


def _other_dtype(dtype):
    return torch.float32 if dtype != torch.float32 else F64


def _teacher_form(c: Call) -> str:
    return "hidden" if "teacher_hidden" in c.tensors else "topk" if "teacher_ids" in c.tensors else "logits"


def _first_row_tensor(c: Call) -> str:
    return {"hidden": "teacher_hidden", "logits": "teacher_logits", "topk": "teacher_ids"}[_teacher_form(c)]


def _mutations(c: Call, data) -> dict:
    """name -> function applying the mistake to ``c`` in place and returning (error, regex)."""
    t, kw = c.tensors, c.kwargs
    n, vocab, hs = c.rows, t["student_weight"].shape[0], t["student_weight"].shape[1]
    form = _teacher_form(c)
    m = {}

    def put(name, value):
        t[name] = value

    m["weight width"] = lambda: (
        put("student_weight", torch.zeros(vocab, hs + 1, dtype=F64)),
        (ValueError, r"student_hidden's last dim must equal student_weight's Hs"),
    )[1]
    m["weight rank"] = lambda: (
        put("student_weight", t["student_weight"][None]),
        (ValueError, r"student_weight must be \(V, Hs\)"),
    )[1]
    m["hidden int"] = lambda: (
        c.raw.update(student_hidden=torch.zeros(*c.leading, hs, dtype=torch.int32)),
        (TypeError, r"student_hidden must be a floating-point"),
    )[1]
    m["weight dtype"] = lambda: (
        c.raw.update(student_weight=t["student_weight"].to(_other_dtype(c.dtype))),
        (TypeError, r"share one dtype, got .*student_weight="),
    )[1]
    m["bias shape"] = lambda: (
        put("student_bias", torch.zeros(vocab + 1, dtype=F64)),
        (ValueError, rf"student_bias must have shape \({vocab},\)"),
    )[1]
    m["bias dtype"] = lambda: (
        c.raw.update(student_bias=torch.zeros(vocab, dtype=_other_dtype(c.dtype))),
        (TypeError, r"share one dtype, got .*student_bias"),
    )[1]
    m["hidden 0-d"] = lambda: (
        c.raw.update(student_hidden=torch.tensor(1.0, dtype=c.dtype)),
        (ValueError, r"student_hidden's last dim"),
    )[1]
    m["Hs = 0"] = lambda: (
        put("student_hidden", torch.zeros(*c.leading, 0, dtype=F64)),
        put("student_weight", torch.zeros(vocab, 0, dtype=F64)),
        (ValueError, r"Hs=0"),
    )[2]

    def teacher_rows():
        """One row more than the student has (a copy of the first, or zeros when there is none)."""

        def grow(x):
            flat = x.reshape(n, x.shape[-1])  # explicit: reshape(0, -1) is ambiguous
            return torch.cat([flat, flat[:1] if n else flat.new_zeros(1, flat.shape[1])])

        name = _first_row_tensor(c)
        put(name, grow(t[name]))
        if form == "topk":
            put("teacher_logprobs", grow(t["teacher_logprobs"]))
            return ValueError, r"teacher_topk ids and logprobs must both be"
        return ValueError, rf"{name} has {n + 1} rows, student_hidden {n}"

    m["teacher rows"] = teacher_rows
    if form == "hidden":
        m["teacher vocab"] = lambda: (
            put("teacher_weight", t["teacher_weight"][: vocab - 1]),
            (ValueError, r"smaller than the student's"),
        )[1]
        m["teacher width"] = lambda: (
            put(
                "teacher_weight",
                torch.zeros(t["teacher_weight"].shape[0], t["teacher_hidden"].shape[-1] + 1, dtype=F64),
            ),
            (ValueError, r"teacher_hidden's last dim must equal teacher_weight's Ht"),
        )[1]
        m["teacher dtype"] = lambda: (
            c.raw.update(teacher_weight=t["teacher_weight"].to(_other_dtype(c.dtype))),
            (TypeError, r"teacher's hidden states, weight and bias must share one dtype"),
        )[1]
        m["teacher bias shape"] = lambda: (
            put("teacher_bias", torch.zeros(t["teacher_weight"].shape[0] + 2, dtype=F64)),
            (ValueError, r"teacher_bias must have shape"),
        )[1]
        m["half a teacher"] = lambda: (
            t.pop("teacher_weight"),
            t.pop("teacher_bias", None),
            (ValueError, r"teacher_hidden and teacher_weight must be given together"),
        )[2]
        m["two teachers"] = lambda: (
            put("teacher_logits", torch.zeros(*c.leading, vocab, dtype=F64)),
            (ValueError, r"give exactly one teacher"),
        )[1]
    elif form == "logits":
        m["teacher vocab"] = lambda: (
            put("teacher_logits", t["teacher_logits"][..., : vocab - 1]),
            (ValueError, r"smaller than the student's"),
        )[1]
        m["teacher bias with logits"] = lambda: (
            put("teacher_bias", torch.zeros(vocab, dtype=F64)),
            (ValueError, r"teacher_bias goes with teacher_weight"),
        )[1]
        m["no teacher"] = lambda: (t.pop("teacher_logits"), (ValueError, r"give exactly one teacher"))[1]
        m["sparse divergence, dense teacher"] = lambda: (
            kw.update(divergence="topk_soft_ce_bucket"),
            (ValueError, r"takes a top-k teacher"),
        )[1]
        m["teacher int"] = lambda: (
            c.raw.update(teacher_logits=torch.zeros(*c.leading, vocab, dtype=torch.int64)),
            (TypeError, r"teacher_logits must be a floating-point"),
        )[1]
    else:
        m["dense divergence, top-k teacher"] = lambda: (
            kw.update(divergence="forward_kl"),
            (ValueError, r"teacher_topk needs a sparse divergence"),
        )[1]
        m["ids float"] = lambda: (
            put("teacher_ids", t["teacher_ids"].to(F64)),
            (TypeError, r"teacher_topk ids must be an integer tensor"),
        )[1]
        m["k > V"] = lambda: (
            put("teacher_ids", torch.zeros(*c.leading, vocab + 1, dtype=torch.long)),
            put("teacher_logprobs", torch.zeros(*c.leading, vocab + 1)),
            (ValueError, rf"k={vocab + 1} > the student's vocabulary"),
        )[2]
        m["ids/logprobs shapes"] = lambda: (
            put("teacher_logprobs", torch.zeros(*c.leading, t["teacher_ids"].shape[-1] + 1)),
            (ValueError, r"ids and logprobs must both be"),
        )[1]
        # An ignored row's ids are padding, never read nor checked: the bad id goes in row 0, made
        # to count (labels absent: every row counts).
        counted = [v for v in range(min(vocab, 2)) if v != kw["ignore_index"]]
        if n and ("labels" not in t or counted):
            bad_id = data.draw(st.sampled_from([vocab, -1, 10**6]), label="bad id")

            def id_out_of_range():
                t["teacher_ids"].view(n, -1)[0, 0] = bad_id
                if "labels" in t:
                    t["labels"].view(-1)[0] = counted[0]
                kw.update(validate=True)
                return ValueError, rf"teacher_topk ids has \d+ value\(s\) outside \[0, {vocab}\)"

            m["id out of range"] = id_out_of_range

    # labels
    if "labels" in t:
        m["labels float"] = lambda: (
            put("labels", t["labels"].to(F64)),
            (TypeError, r"labels must be an integer tensor"),
        )[1]
        m["labels count"] = lambda: (
            put("labels", torch.zeros(n + 1, dtype=torch.long)),
            (ValueError, rf"labels has {n + 1} elements, student_hidden {n} rows"),
        )[1]
        if len(c.leading) >= 2 and c.leading[::-1] != c.leading:
            m["labels transposed"] = lambda: (
                put("labels", t["labels"].reshape(c.leading[::-1])),
                (ValueError, r"labels's leading dims .* do not match student_hidden's"),
            )[1]
        if n:
            bad = data.draw(
                st.sampled_from([v for v in (vocab, vocab + 7, -2, -101) if v != kw["ignore_index"]]), label="bad label"
            )
            m["label out of range"] = lambda: (
                t["labels"].view(-1).__setitem__(0, bad),
                kw.update(validate=True),
                (ValueError, rf"labels has \d+ value\(s\) outside \[0, {vocab}\) that are not ignore_index"),
            )[2]
        m["ignore_index float"] = lambda: (
            kw.update(ignore_index=float(kw["ignore_index"]), validate=True),
            (TypeError, r"ignore_index must be an int"),
        )[1]
    else:
        m["CE without labels"] = lambda: (kw.update(hard_weight=0.5), (ValueError, r"needs labels"))[1]

    def number(name, values, regex):
        value = data.draw(st.sampled_from(values), label=f"bad {name}")
        kw[name] = value
        return ValueError, regex

    m["temperature"] = lambda: number(
        "temperature", [0, 0.0, -1.0, NAN, INF, -INF, True, "1", None], r"temperature must be a finite number > 0"
    )
    m["softcap"] = lambda: number("softcap", [0.0, -2.0, NAN, INF, True], r"softcap must be a finite number > 0")
    m["soft_weight"] = lambda: number(
        "soft_weight", [NAN, INF, -INF, "1", None, True], r"soft_weight must be a finite number"
    )
    m["chunk_size"] = lambda: number(
        "chunk_size", [0, -1, True, False, 2.5, "8", None, "AUTO"], r"chunk_size must be an int >= 1 or 'auto'"
    )
    m["reduction"] = lambda: number("reduction", ["avg", "MEAN", None, "", "batchmean"], r"reduction must be one of")
    m["impl"] = lambda: number("impl", ["triton", None, "Eager"], r"impl must be one of")
    m["divergence name"] = lambda: number(
        "divergence",
        ["kl", "forward-kl", "jsd_beta1.5", "jsd_beta-0.1", "skew_kl_alpha2", "topk_forward_kl"],
        r"unknown (sparse )?divergence|beta must be in|alpha must be in",
    )
    m["divergence type"] = lambda: (
        kw.update(divergence=data.draw(st.sampled_from([3, None, 0.5]), label="bad divergence")),
        (TypeError, r"divergence must be a name or a callable"),
    )[1]
    if n and form != "topk":

        def wrong_shape():
            shape = data.draw(st.sampled_from(["(R, V)", "()", "(R, 1)"]), label="bad output shape")

            def bad(student, teacher):
                loss = D.forward_kl(student, teacher)
                return {"(R, V)": student * 0 + loss[:, None], "()": loss.sum(), "(R, 1)": loss[:, None]}[shape]

            kw["divergence"] = bad
            return ValueError, r"divergence bad returned shape .*, expected per-row losses"

        m["divergence output shape"] = wrong_shape

    def meta():
        name = data.draw(
            st.sampled_from(
                ["student_hidden", "student_weight", _first_row_tensor(c)] + (["labels"] if "labels" in t else [])
            ),
            label="on meta",
        )
        x = t.get(name)
        c.raw[name if name != "teacher_ids" else "teacher_topk"] = (
            (x.to("meta"), t["teacher_logprobs"])
            if name == "teacher_ids"
            else x.to(c.dtype if x.is_floating_point() else x.dtype).to("meta")
        )
        if name == "teacher_ids":
            t.pop("teacher_ids"), t.pop("teacher_logprobs")
        else:
            t.pop(name)
        return ValueError, r"all tensors must be on one device"

    m["meta device"] = meta

    def normalizer():
        value = data.draw(
            st.sampled_from(["0", "0.0", "-2", "nan", "inf", "str", "bool", "vector", "with none"]),
            label="bad normalizer",
        )
        if value == "with none":
            kw.update(reduction="none", normalizer=4.0)
            return ValueError, r"normalizer has no effect with reduction='none'"
        if kw["reduction"] == "none":
            kw["reduction"] = "mean"
        kw["normalizer"] = {
            "0": 0,
            "0.0": 0.0,
            "-2": -2.0,
            "nan": NAN,
            "inf": INF,
            "str": "8",
            "bool": True,
            "vector": torch.tensor([1.0, 2.0]),
        }[value]
        if value == "vector":
            return ValueError, r"normalizer must be a number or a one-element tensor, got shape \(2\)"
        if value in ("str", "bool"):
            return TypeError, r"normalizer must be a number or a tensor"
        return ValueError, r"normalizer must be a finite number > 0"

    m["normalizer"] = normalizer
    return m


# --------------------------------------------------------------------------------------------
# Checking a valid call against the reference
# --------------------------------------------------------------------------------------------


def _grad_output(c: Call):
    if c.kwargs["reduction"] != "none":
        return None
    g = torch.Generator().manual_seed(c.rows)
    return torch.randn(c.leading, generator=g).float().to(F64)  # float32 values: the same on both sides


def _parts(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def _run(fn, c: Call, go, **extra):
    """(parts of the result, {name: gradient}) with fresh leaves."""
    args, leaves = c.args(dtype=F64 if fn is fused_linear_distill_ref else None)
    out = fn(**{**args, **extra})
    loss = _parts(out)[0]
    grads = {}
    if leaves:
        g_out = None if go is None else go.to(loss.dtype)
        grads = dict(
            zip(
                leaves,
                torch.autograd.grad(
                    loss, list(leaves.values()), grad_outputs=g_out, allow_unused=True, materialize_grads=True
                ),
            )
        )
    return _parts(out), grads, leaves


def _logit_grad(c: Call, go, precision=F64) -> torch.Tensor:
    """d(result)/d(student logits) (n, V) from the reference with the logits as hidden states and
    an identity lm_head: exact at ``precision=float64``; float32's own error at float32."""
    t = c.tensors
    logits = t["student_hidden"] @ t["student_weight"].T
    if t.get("student_bias") is not None:
        logits = logits + t["student_bias"]
    leaf = logits.detach().clone().requires_grad_()
    args, _ = Call(F64, c.leading, {k: v for k, v in t.items() if k not in STUDENT}, c.kwargs, ()).args()
    out = _parts(fused_linear_distill_ref(leaf, torch.eye(logits.shape[-1], dtype=F64), **args, precision=precision))[0]
    (d,) = torch.autograd.grad(out, leaf, grad_outputs=go, allow_unused=True, materialize_grads=True)
    return d.reshape(c.rows, -1)


def check_valid(c: Call) -> float:
    """Assert the fused result equals the reference's (see the module docstring); returns the
    worst error / allowed ratio seen (for calibration)."""
    go = _grad_output(c)
    out, grads, leaves = _run(fused_linear_distill, c, go)
    ref, ref_grads, _ = _run(fused_linear_distill_ref, c, go)
    per_row = c.kwargs["reduction"] == "none"
    compute = F64 if c.dtype == F64 else torch.float32
    assert len(out) == (3 if c.kwargs["return_parts"] else 1)
    for a in out:
        assert a.shape == (c.leading if per_row else ()) and a.dtype == compute
        assert torch.isfinite(a).all()
    for name, g in grads.items():
        assert g.shape == leaves[name].shape and g.dtype == c.dtype, name
        assert torch.isfinite(g).all(), name
    worst = 0.0
    row_weight, magnitude = _magnitudes(c, go)
    if c.dtype == F64:
        # The float64 compute's own error, ~eps64 times the magnitude of the terms that cancel
        # (log-probabilities up to max|z|/T, the 1e4 floor where the teacher has -inf entries).
        for what, a, e, floor in zip(("loss", "soft", "hard"), out, ref, _part_floors(c, magnitude)):
            e = e.detach()
            allowed = 1e-9 * e.abs() + 1e-12 * floor + 1e-300
            err = (a.detach() - e).abs()
            worst = max(worst, (err / allowed).max().item() if e.numel() else 0.0)
            assert (err <= allowed).all(), (what, err.max().item())
        if not grads or not c.rows:
            return worst
        exact = _logit_grad(c, go)
        d_err = 1e-9 * exact.abs() + 1e-13 * (row_weight * magnitude * (1 + 1 / c.kwargs["temperature"]))[:, None]
        return max(worst, _check_grads(c, grads, ref_grads, d_err, rel=1e-9, floor=0.0))
    u = UNIT[c.dtype]
    ref32_args, _ = c.args(dtype=F64, leaves=False)
    ref32 = _parts(fused_linear_distill_ref(**ref32_args, precision=torch.float32))
    for what, a, e, e32, floor in zip(("loss", "soft", "hard"), out, ref, ref32, _part_floors(c, magnitude)):
        e, a = e.detach(), a.detach().to(F64)
        allowed = 8 * (e32.detach() - e).abs() + 1e-6 * e.abs() + 2.0**-24 * floor + 1e-300
        err = (a - e).abs()
        worst = max(worst, (err / allowed).max().item() if e.numel() else 0.0)
        assert (err <= allowed).all(), (what, a, e, e32)
    if not grads or not c.rows:
        return worst
    # Error of the logit gradient D, per element: rounding to the dtype (u |D|), float32's own
    # error in that row (8x the float32 reference's worst in the row: cancellations such as
    # p_s - p_t at T = 20 are judged against what float32 can do there), and underflow/subnormals.
    exact = _logit_grad(c, go)
    row_err = 8 * (_logit_grad(c, go, precision=torch.float32) - exact).abs().amax(-1, keepdim=True)
    # ... and at least float32's rounding of the terms D is formed from (in case the float32
    # reference happens to be exact in a row): eps32 * the row's magnitude * (1 + 1/T), twice.
    row_err = row_err + 2 * 2.0**-24 * (row_weight * magnitude * (1 + 1 / c.kwargs["temperature"]))[:, None]
    # float16 scales each chunk's D so that its largest entry is 2^14 (fused._half_with_scale):
    # its subnormal rounding (2^-25) is then at most 2^-38 times the chunk's largest entry.
    half_ulp = 2.0**-38 * exact.abs().max().item() if c.dtype == torch.float16 and exact.numel() else 0.0
    row_err = row_err + 2.0**-126 + half_ulp
    d_err = 2 * u * exact.abs() + row_err  # (u/2 for D, u/2 for the matmul output, with margin)
    floor = 2.0**-25 if c.dtype == torch.float16 else 0.0  # the gradients' own float16 subnormals
    return max(worst, _check_grads(c, grads, ref_grads, d_err, rel=u, floor=floor))


def _check_grads(c: Call, grads, ref_grads, d_err, rel, floor) -> float:
    """|g - e| <= err(D) propagated through the gradient matmuls + rel |e| + floor, elementwise."""
    hidden = c.tensors["student_hidden"].reshape(c.rows, -1)
    terms = {
        "student_hidden": (d_err @ c.tensors["student_weight"].abs()).reshape(c.tensors["student_hidden"].shape),
        "student_weight": d_err.T @ hidden.abs(),
        "student_bias": d_err.sum(0),
    }
    worst = 0.0
    for name, g in grads.items():
        e = ref_grads[name]
        allowed = terms[name] + rel * e.abs() + floor + 1e-300
        err = (g.to(F64) - e).abs()
        worst = max(worst, (err / allowed).max().item())
        assert (err <= allowed).all(), (name, err.max().item())
    return worst


def _magnitudes(c: Call, go):
    """(row weight (n,): d(result)/d(row loss), magnitude (n,) of the terms in a row's loss:
    sw (F + max|z|/T + log V + 1) + hw (max|z| + log V + 1), F = 1e4 (the log-probability floor)
    where the teacher row has -inf entries, z the row's finite student and teacher logits)."""
    t, kw = c.tensors, c.kwargs
    n, vocab = c.rows, t["student_weight"].shape[0]

    def rows(x):  # (n, last dim); explicit, since reshape(0, -1) is ambiguous
        return x.reshape(n, x.shape[-1])

    logits = rows(t["student_hidden"]) @ t["student_weight"].T
    if "teacher_hidden" in t:
        teacher = rows(t["teacher_hidden"]) @ t["teacher_weight"][:vocab].T
    elif "teacher_logits" in t:
        teacher = rows(t["teacher_logits"])[:, :vocab]
    else:
        teacher = rows(t["teacher_logprobs"]).to(F64)
    finite = torch.where(torch.isfinite(teacher), teacher, 0).abs()
    zmax = torch.maximum(
        logits.abs().amax(-1) if vocab else logits.new_zeros(n),
        finite.amax(-1) if finite.shape[-1] else finite.new_zeros(n),
    )
    floored = torch.isneginf(teacher).any(-1).to(F64) * 1e4
    log_v = math.log(max(vocab, 1)) + 1
    magnitude = abs(kw["soft_weight"]) * (floored + zmax / kw["temperature"] + log_v) + abs(kw["hard_weight"]) * (
        zmax + log_v
    )
    labels = t.get("labels")
    valid = torch.ones(n, dtype=F64) if labels is None else (labels.reshape(n) != kw["ignore_index"]).to(F64)
    if kw["reduction"] == "none":
        weight = valid if go is None else go.reshape(n).abs() * valid
    elif kw.get("normalizer") is not None:
        weight = valid / float(kw["normalizer"])
    elif kw["reduction"] == "mean":
        weight = valid / max(valid.sum().item(), 1.0)
    else:
        weight = valid
    return weight, magnitude


def _reduce_like_loss(c: Call, magnitude):
    """The magnitude reduced as the loss is (per row for "none"; without grad_output weights)."""
    weight, _ = _magnitudes(c, None)
    if c.kwargs["reduction"] == "none":
        return (weight * magnitude).reshape(c.leading)
    return (weight * magnitude).sum()


def _part_floors(c: Call, magnitude):
    """The magnitudes of (loss, soft, hard) reduced like the loss: the parts are unweighted, so
    theirs are the magnitude with soft_weight = 1, hard_weight = 0 and the other way round."""

    def with_weights(soft: float, hard: float) -> Call:
        return Call(c.dtype, c.leading, c.tensors, {**c.kwargs, "soft_weight": soft, "hard_weight": hard}, c.grad_names)

    parts = (_magnitudes(with_weights(1.0, 0.0), None)[1], _magnitudes(with_weights(0.0, 1.0), None)[1])
    return [_reduce_like_loss(c, m) for m in (magnitude, *parts)]


def _float16_out_of_range(c: Call) -> str | None:
    """Why a float16 draw is not checked, or None: an exact gradient beyond float16's range
    cannot come back finite at all."""
    if c.dtype != torch.float16 or not c.grad_names or not c.rows:
        return None
    _, exact, _ = _run(fused_linear_distill_ref, c, _grad_output(c))
    if any(g.abs().max().item() >= 6e4 for g in exact.values()):
        return "the exact gradient beyond float16's range"
    return None


# --------------------------------------------------------------------------------------------
# The fuzz test
# --------------------------------------------------------------------------------------------


@given(call=valid_calls(), data=st.data())
def test_fuzz_public_api(call, data):
    mutations = _mutations(call, data)
    mistake = data.draw(st.one_of(st.just(None), st.just(None), st.sampled_from(sorted(mutations))), label="mistake")
    unchecked = not call.kwargs["validate"] and "labels" in call.tensors and call.kwargs["hard_weight"] == 0
    # validate=False with out-of-range labels: no check, and without CE they are ordinary rows.
    # (On a row that is already valid: an ignored row's teacher may be all -inf, i.e. no support.)
    if mistake is None and unchecked and data.draw(st.booleans(), label="unchecked out-of-range labels"):
        flat = call.tensors["labels"].view(-1)
        valid_rows = (flat != call.kwargs["ignore_index"]).nonzero()
        if len(valid_rows):
            flat[valid_rows[0, 0]] = call.tensors["student_weight"].shape[0] + 3  # ignore_index: -100, -1 or V
    if mistake is None:
        skip = _float16_out_of_range(call)
        if skip is not None:
            event(f"valid, not checked: {skip}")
            return
        note(f"dtype={call.dtype} leading={call.leading} kwargs={call.kwargs} leaves={call.grad_names}")
        worst = check_valid(call)
        bucket = next(b for b in (1e-3, 1e-2, 0.1, 0.5, 1.0) if worst <= b)
        event(f"valid: worst error / allowed <= {bucket:g}")
        event(f"valid: {'N=0' if call.rows == 0 else call.dtype} - matches the reference")
        return
    error, regex = mutations[mistake]()
    note(f"mistake={mistake!r} dtype={call.dtype} leading={call.leading} kwargs={call.kwargs}")
    args, _ = call.args(leaves=False)
    with pytest.raises(error, match=regex) as info:
        fused_linear_distill(**args)
    assert str(info.value)
    event(f"invalid: {mistake} -> {error.__name__}")
