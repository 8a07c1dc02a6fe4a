"""What several test modules share (a test module never imports another; fixtures are in conftest.py).

* comparing kdfuse with its float64 reference: :class:`Problem`, :func:`compare_to_reference`,
  :func:`assert_close_scaled`, :func:`rel_err` and the low-precision bounds
  (:data:`LOW_PRECISION_BOUNDS`, :func:`assert_low_precision_close`);
* fixed inputs: :func:`fixed_problem`, :func:`inputs`, :func:`topk_mixed_case`, and
  :func:`hellinger`, a user divergence;
* hypothesis strategies that draw the tensors themselves, entry by entry, so that a failure
  shrinks to small, simple values (:func:`grid`, :func:`floats`, :func:`wide_grid`,
  :func:`sparse_floats`, :func:`label_tensors`, :func:`problems`, :func:`valid_calls`);
* stubs of kdfuse's measuring, for the tuning and sweep tests (:class:`SweepCalls`,
  :class:`FakeBench`, :func:`resolve`, :func:`key_for`).

Tests import it as ``import helpers`` / ``from helpers import ...``: pytest's default (prepend)
import mode puts tests/ on sys.path.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor

from kdfuse import divergences as D
from kdfuse import env, fused_linear_distill, fused_linear_distill_ref, sweep, tuning
from kdfuse.tuning import TuningKey

F64 = torch.float64
INF = float("inf")
NAN = float("nan")
HALF = (torch.float16, torch.bfloat16)


def name_of(x) -> str:
    """A test id: a divergence's, function's or dtype's name."""
    return getattr(x, "__name__", str(x)).removeprefix("torch.")


# =================================================================================================
# Comparing with the reference
# =================================================================================================


@dataclass
class Problem:
    """Tensors and keyword arguments for one call; ``call()`` makes fresh leaves every time.
    ``grad_output`` (optional) weights the rows of a ``reduction="none"`` result in backward."""

    leading: tuple[int, ...]
    tensors: dict  # name -> tensor (student ones become grad leaves)
    kwargs: dict = field(default_factory=dict)
    grad_names: tuple[str, ...] = ("student_hidden", "student_weight", "student_bias")
    grad_output: Tensor | None = None

    def call(self, fn, dtype=None, **overrides):
        """(result, {name: leaf}) with the student tensors as fresh leaves, cast to ``dtype``."""
        leaves = {}
        args = {}
        for name, t in self.tensors.items():
            if t is None:
                args[name] = None
                continue
            x = t if dtype is None or not t.is_floating_point() else t.to(dtype)
            if name in self.grad_names:
                x = x.detach().clone().requires_grad_()
                leaves[name] = x
            args[name] = x
        hidden, weight = args.pop("student_hidden"), args.pop("student_weight")
        th, tw = args.pop("teacher_hidden", None), args.pop("teacher_weight", None)
        return fn(hidden, weight, th, tw, **args, **{**self.kwargs, **overrides}), leaves


def grads_of(out, leaves, grad_output=None):
    names = list(leaves)
    gs = torch.autograd.grad(
        out, [leaves[n] for n in names], grad_outputs=grad_output, allow_unused=True, materialize_grads=True
    )
    return dict(zip(names, gs))


def assert_close_scaled(actual, expected, rtol, what=""):
    """Elementwise |a − e| ≤ rtol·|e| + rtol·max|e|: relative to the tensor's own scale, so tiny
    entries (sums that cancel) are judged against the magnitudes they were computed from."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    expected = expected.to(F64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(F64), expected, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=lambda m: f"{what}: {m}"
    )


def rel_err(actual, expected) -> float:
    """‖a − e‖ / ‖e‖ (0 when both vanish)."""
    diff = (actual.to(F64) - expected.to(F64)).norm().item()
    ref = expected.to(F64).norm().item()
    return diff / ref if ref > 0 else diff


def compare_to_reference(prob: Problem, rtol: float = 1e-9, grad_output=None):
    """Fused (eager) against the reference, values and gradients, both in float64. A per-row
    result is weighted in backward by ``grad_output``, else the problem's, else a fixed draw."""
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref)
    per_row = prob.kwargs.get("reduction", "mean") == "none"
    assert out.dtype == F64 and out.shape == ref.shape == (prob.leading if per_row else ())
    assert_close_scaled(out.detach(), ref.detach(), rtol, "loss")
    if per_row and grad_output is None:
        grad_output = prob.grad_output
        if grad_output is None:
            grad_output = torch.randn(prob.leading, generator=torch.Generator().manual_seed(0), dtype=F64)
    g, g_ref = grads_of(out, leaves, grad_output), grads_of(ref, ref_leaves, grad_output)
    for name in leaves:
        assert torch.isfinite(g[name]).all(), name
        assert g[name].dtype == leaves[name].dtype
        assert_close_scaled(g[name], g_ref[name], rtol, f"grad {name}")
    return out, g


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run_student(fn, inputs: dict, grad: bool = True, grad_output=None, **kwargs):
    """(result, [grad hidden, grad weight, grad bias]) of ``fn(**inputs, **kwargs)`` with the
    student tensors of ``inputs`` as fresh leaves (requiring grad if ``grad``; then no grads)."""
    args = dict(inputs)
    leaves = [args[name].detach().clone().requires_grad_(grad) for name in STUDENT]
    args.update(zip(STUDENT, leaves))
    out = fn(**args, **kwargs)
    if not grad:
        return out, None
    return out, list(torch.autograd.grad(out, leaves, grad_outputs=grad_output))


# --- per input dtype, against the float64 reference ----------------------------------------------

# Both sides see the *same* rounded inputs (the reference gets exact float64 copies of them, so
# its gradients are exact too, not rounded to the leaves' dtype), so the error measured is only
# the fused path's own rounding:
#   1. each chunk's logits come out of a matmul in the input dtype (fp32 accumulation, output
#      rounded to the input dtype): a relative error u per logit, i.e. an absolute error |z|·u,
#      which moves log-probabilities (and so losses and logit gradients) by ~|z|·u;
#   2. the divergence and CE run in float32 (negligible next to 1. for the 16-bit types);
#   3. the logit gradient comes back in the input dtype (another u) and grad_hidden = dlogits @ W
#      is rounded to it once more (u); grad_weight/grad_bias accumulate in float32;
#   4. the returned gradient is in the parameter's dtype: even the exact gradient rounded to it
#      is off by ``inherent`` = rel_err(exact.to(dtype), exact), ~0.5u for normal numbers but far
#      more for fp16 gradients in its subnormal range (< 6.1e-5: "mean" over many rows).
# u is the unit roundoff 2^-p, p the significand bits: bf16 p=8, u ≈ 3.9e-3; fp16 p=11,
# u ≈ 4.9e-4; fp32 p=24, u ≈ 6e-8. With logits |z| ~ 3 (1.) dominates: measured over seeds and
# divergences (here and at V = 3001 on CPU and H100) loss ≤ 0.5u, gradients ≤ 3.3u beyond
# ``inherent``. Bounds: loss 2.5u, gradients 6u + inherent. For fp32 the float32 sums over V
# dominate instead (measured ≤ 3.4e-7 loss, 1.1e-6 gradients at V = 257); the bounds leave 10x
# margin and stay ~100x below fp16's error, so a silent downcast would fail.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOW_PRECISION_BOUNDS = {  # (loss, gradient) bounds on the norm-relative error
    torch.float32: (5e-6, 1e-5),
    torch.float16: (2.5 * UNIT_ROUNDOFF[torch.float16], 6 * UNIT_ROUNDOFF[torch.float16]),
    torch.bfloat16: (2.5 * UNIT_ROUNDOFF[torch.bfloat16], 6 * UNIT_ROUNDOFF[torch.bfloat16]),
}


def assert_low_precision_close(out, grads, ref, ref_grads, dtype, bounds=LOW_PRECISION_BOUNDS, loss_scale=0.0):
    """``out``/``grads`` (fused, low precision) vs ``ref``/``ref_grads`` (float64); see above.

    The loss error is relative to max(‖ref‖, ``loss_scale``): a loss that is a small difference of
    larger terms carries their rounding, so it is judged against their scale.
    """
    loss_bound, grad_bound = bounds[dtype]
    assert out.dtype == torch.float32  # the compute dtype
    loss_err = (out.detach().to(F64) - ref.detach()).norm().item() / max(ref.detach().norm().item(), loss_scale)
    assert loss_err < loss_bound, ("loss", loss_err)
    for name in ref_grads:
        g, r = grads[name], ref_grads[name]
        assert r.dtype == F64  # exact, see above
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        inherent = rel_err(r.to(dtype), r)  # 4.: the exact gradient rounded to the output dtype
        err = rel_err(g, r)
        assert err < grad_bound + inherent, (name, err, inherent)


# =================================================================================================
# Fixed inputs
# =================================================================================================


def fixed_problem(n=12, vocab=13, hs=5, ht=7, labels=True, seed=0, teacher="hidden", dtype=F64, **kwargs):
    """N rows, a student with bias, a hidden (or logits) teacher, labels with every third row
    ignored; ``kwargs`` become the call's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "student_hidden": torch.randn(n, hs, generator=gen, dtype=F64).to(dtype),
        "student_weight": (torch.randn(vocab, hs, generator=gen, dtype=F64) / math.sqrt(hs)).to(dtype),
        "student_bias": torch.randn(vocab, generator=gen, dtype=F64).to(dtype),
    }
    if teacher == "hidden":
        t["teacher_hidden"] = torch.randn(n, ht, generator=gen, dtype=F64).to(dtype)
        t["teacher_weight"] = (torch.randn(vocab, ht, generator=gen, dtype=F64) / math.sqrt(ht)).to(dtype)
    else:
        t["teacher_logits"] = torch.randn(n, vocab, generator=gen, dtype=F64).to(dtype)
    if labels:
        y = torch.randint(0, vocab, (n,), generator=gen)
        y[::3] = -100
        t["labels"] = y
    return Problem((n,), t, dict(kwargs))


def inputs(leading=(2, 3), hs=4, ht=6, vocab=5, dtype=torch.float32, seed=0, teacher="hidden", labels=True) -> dict:
    """Keyword arguments of a small valid call: student hidden states and weight, a hidden (or
    logits) teacher and labels in range (none ignored)."""
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


def topk_mixed_case() -> tuple[Tensor, Tensor, Tensor]:
    """(student (4, 9) float64 leaf, ids (4, 4), logprobs (4, 4)) for the sparse divergences, one
    row of each kind: P < 1; P = 1 over the k ids; padding repeating a real id; all padding."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, generator=gen, dtype=F64, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen, dtype=F64)
    ids = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(4)])
    logprobs = teacher.log_softmax(-1).gather(-1, ids)
    logprobs[1] = teacher[1, ids[1]].log_softmax(-1)
    ids[2, 3], logprobs[2, 3] = ids[2, 0], -INF
    ids[3], logprobs[3] = 0, -INF
    return student, ids, logprobs


def hellinger(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared Hellinger distance ½ Σ (√p_s − √p_t)², with plain torch ops: a user divergence."""
    root_s = torch.exp(0.5 * torch.log_softmax(student, -1))
    root_t = torch.exp(0.5 * torch.log_softmax(teacher, -1))
    return 0.5 * (root_s - root_t).pow(2).sum(-1)


# =================================================================================================
# Hypothesis: tensors drawn entry by entry
# =================================================================================================
#
# Hypothesis bounds what one example may draw (a few thousand small integers, under a thousand
# floats), so large tensors are drawn as integers on a grid, and tensors with thousands of entries
# (kernel rows of 4099, GEMM operands) are built from fewer drawn values: a block tiled with drawn
# offsets (wide_grid) or hypothesis' own sparse arrays (sparse_floats). Either way every value is a
# function of drawn data, so a failing example shrinks (towards zeros, small shapes, no masks).


def _tensor(array: np.ndarray, dtype: torch.dtype, unit: float = 1.0) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.to(dtype) if unit == 1 else (t.to(F64) * unit).to(dtype)


def grid(shape, lo: int = -4, hi: int = 4, unit: float = 1.0, dtype: torch.dtype = F64) -> st.SearchStrategy[Tensor]:
    """Tensors of ``shape`` whose every entry is a drawn integer in [lo, hi] times ``unit`` (exact
    in every dtype when ``unit`` is a power of two and |entries| < 256)."""
    elements = st.integers(lo, hi)
    return arrays(np.int16, tuple(shape), elements=elements, fill=st.nothing()).map(lambda a: _tensor(a, dtype, unit))


def floats(shape, bound: float, dtype: torch.dtype = F64, width: int = 64) -> st.SearchStrategy[Tensor]:
    """Tensors of ``shape`` whose every entry is a drawn float in [-bound, bound] (of ``width``
    bits: 16, 32 or 64). A few hundred entries at most (hypothesis' limit per example)."""
    np_dtype = {16: np.float16, 32: np.float32, 64: np.float64}[width]
    elements = st.floats(-bound, bound, width=width)
    return arrays(np_dtype, tuple(shape), elements=elements, fill=st.nothing()).map(lambda a: _tensor(a, dtype))


def sparse_floats(shape, bound: float, dtype: torch.dtype, width: int = 32) -> st.SearchStrategy[Tensor]:
    """Large tensors the hypothesis way: a drawn value at a few hundred drawn positions, the rest
    one drawn fill value (hypothesis.extra.numpy.arrays' ``fill``)."""
    np_dtype = {16: np.float16, 32: np.float32, 64: np.float64}[width]
    return arrays(np_dtype, tuple(shape), elements=st.floats(-bound, bound, width=width)).map(
        lambda a: _tensor(a, dtype)
    )


PERIOD = 97  # a prime: the tiles of wide_grid never line up with a kernel's power-of-two blocks


@st.composite
def wide_grid(draw, rows: int, cols: int, lo: int, hi: int, unit: float, dtype: torch.dtype = torch.float32):
    """(rows, cols): every entry drawn (as :func:`grid`) up to :data:`PERIOD` columns; wider, a
    drawn (rows, PERIOD) block repeated along the columns, each (row, repeat) shifted by a drawn
    offset, so a wide row (a 4099-long vocabulary) varies along its length for ~cols/97 draws."""
    width = min(cols, PERIOD)
    block = draw(grid((rows, width), lo, hi, unit, F64), label="block")
    if cols <= PERIOD:
        return block.to(dtype)
    repeats = -(-cols // PERIOD)
    offsets = draw(grid((rows, repeats, 1), lo, hi, unit, F64), label="offsets")
    tiled = (block[:, None, :] + offsets).reshape(rows, repeats * width)
    return tiled[:, :cols].to(dtype)


@st.composite
def label_tensors(draw, leading: tuple[int, ...], vocab: int, ignore_index: int) -> Tensor | None:
    """Labels (or None) with none, some, all or no rows ignored, as int64 or int32: each label
    and which rows are ignored are drawn."""
    mode = draw(st.sampled_from(["none", "some ignored", "all ignored", "no ignored"]), label="labels")
    if mode == "none":
        return None
    values = draw(grid(leading, 0, max(vocab - 1, 0), dtype=torch.int64), label="label values")
    if mode == "some ignored":
        ignored = draw(arrays(np.bool_, leading, elements=st.booleans(), fill=st.nothing()), label="ignored rows")
        values = values.masked_fill(torch.from_numpy(ignored), ignore_index)
    elif mode == "all ignored":
        values = torch.full(leading, ignore_index)
    return values.to(draw(st.sampled_from([torch.int64, torch.int32]), label="label dtype"))


def leading_dims(draw, max_rank: int, lo: int, hi: int, max_rows: int) -> tuple[int, ...]:
    """Leading dims of rank 1..max_rank, each in [lo, hi], trimmed to at most ``max_rows`` rows."""
    rank = draw(st.integers(1, max_rank), label="rank")
    leading = tuple(draw(st.lists(st.integers(lo, hi), min_size=rank, max_size=rank), label="leading"))
    while math.prod(leading) > max_rows:
        leading = leading[1:] + (1,)
    return leading


# --- problems(): fused vs reference in float64 ---------------------------------------------------

DIVERGENCES = st.one_of(
    st.sampled_from(["forward_kl", "reverse_kl", "soft_ce", "tvd", "mse_logits", "jsd", "jsd_beta0.1"]),
    st.builds(D.jsd, st.floats(0.0, 1.0)),
    st.builds(D.skew_kl, st.floats(0.0, 1.0)),
    st.builds(D.skew_reverse_kl, st.floats(0.0, 1.0)),
    st.builds(D.symmetric_kl, st.floats(0.0, 1.0)),
)
VOCABS = [1, 2, 3, 5, 7, 13, 31, 64, 97]  # odd, prime, one power of two
# Rows x teacher vocabulary drawn per problem at most: the teacher logits' entries are drawn one by one.
MAX_LOGITS = 2500


@st.composite
def problems(draw, max_rows: int = 40, allow_empty: bool = True) -> Problem:
    """A float64 call of fused_linear_distill: leading dims of rank 1..3 (N = 0 unless
    ``allow_empty`` is false), an odd or prime V, Hs != Ht, a teacher vocabulary up to 4 larger,
    hidden or logits teacher (with -inf entries), biases, labels with ignored rows, every built-in,
    temperature, weights, reduction, normalizer, chunk size and softcap. Every tensor entry is
    drawn on a grid: values in [-2, 2], logits of scale 0.3, 1 or 4."""
    leading = leading_dims(draw, 3, 0 if allow_empty else 1, 5, max_rows)
    n = math.prod(leading)
    vocab = draw(st.sampled_from(VOCABS), label="V")
    hs = draw(st.integers(1, 6), label="Hs")
    ht = hs + draw(st.integers(1, 5), label="Ht-Hs")  # Hs != Ht
    extra = draw(st.sampled_from([0, 0, 1, 4]), label="extra teacher vocab")
    while n * (vocab + extra) > MAX_LOGITS:  # the largest leading dim halved (never the vocabulary)
        i = leading.index(max(leading))
        leading = (*leading[:i], leading[i] // 2, *leading[i + 1 :])
        n = math.prod(leading)
    logit_scale = draw(st.sampled_from([0.3, 1.0, 4.0]), label="logit scale")

    def draw_grid(name, *shape, scale=1.0):  # entries in [-2, 2] * scale, on a grid of scale / 2
        return draw(grid(shape, -4, 4, 0.5 * scale), label=name)

    t = {
        "student_hidden": draw_grid("student_hidden", *leading, hs),
        "student_weight": draw_grid("student_weight", vocab, hs, scale=logit_scale / math.sqrt(hs)),
        "student_bias": draw_grid("student_bias", vocab) if draw(st.booleans(), label="student bias") else None,
    }
    if draw(st.booleans(), label="teacher as logits"):
        # Entries in [-5, 4]: with masking on, the code -5 marks a -inf (outside the teacher's support).
        logits = draw(grid((*leading, vocab + extra), -5, 4), label="teacher_logits")
        if vocab > 1 and draw(st.booleans(), label="teacher -inf"):
            mask = logits == -5
            mask[..., 0] = False  # keep every row's support non-empty
            logits = logits.masked_fill(mask, -INF)
        t["teacher_logits"] = logits * (0.5 * logit_scale)
    else:
        t["teacher_hidden"] = draw_grid("teacher_hidden", *leading, ht)
        t["teacher_weight"] = draw_grid("teacher_weight", vocab + extra, ht, scale=logit_scale / math.sqrt(ht))
        if draw(st.booleans(), label="teacher bias"):
            t["teacher_bias"] = draw_grid("teacher_bias", vocab + extra)

    ignore_index = draw(st.sampled_from([-100, -1]), label="ignore_index")
    y = draw(label_tensors(leading, vocab, ignore_index))
    if y is not None:
        t["labels"] = y

    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    kwargs = dict(
        divergence=draw(DIVERGENCES, label="divergence"),
        temperature=draw(st.floats(0.5, 4.0), label="temperature"),
        soft_weight=draw(st.sampled_from([1.0, 0.0, 0.3, 2.5]), label="soft_weight"),
        hard_weight=0.0 if y is None else draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]), label="hard_weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=draw(st.one_of(st.just("auto"), st.integers(1, max(n, 1) + 3)), label="chunk_size"),
        softcap=draw(st.sampled_from([None, None, 3.0, 30.0]), label="softcap"),
    )
    grad_output = None
    if reduction == "none":
        grad_output = draw_grid("grad_output", *leading)
    else:
        kind = draw(st.sampled_from(["none", "number", "tensor"]), label="normalizer")
        if kind == "number":
            kwargs["normalizer"] = draw(st.floats(0.5, 100.0), label="normalizer value")
        elif kind == "tensor":
            kwargs["normalizer"] = torch.tensor(draw(st.floats(0.5, 100.0), label="normalizer value"), dtype=F64)
    return Problem(leading, t, kwargs, grad_output=grad_output)


# --- valid_calls(): the public API's fuzz (test_fuzz.py) and its mistakes (test_validate.py) -----

DTYPES = [F64, torch.float32, torch.bfloat16, torch.float16]
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
    keyword arguments, which student tensors are gradient leaves, and the drawn weights of a
    per-row result's rows in backward (float32 values: the same on every side)."""

    dtype: torch.dtype
    leading: tuple[int, ...]
    tensors: dict
    kwargs: dict
    grad_names: tuple[str, ...]
    grad_output: Tensor | None = None

    @property
    def rows(self) -> int:
        return math.prod(self.leading)

    def args(self, dtype=None, leaves: bool = True):
        """(keyword arguments, {name: leaf})."""
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
        return {**args, **self.kwargs}, made


@st.composite
def valid_calls(draw) -> Call:
    """A valid call of the public API, every entry drawn on a grid that every dtype holds exactly
    (see test_fuzz.py): dtype, leading dims (N = 0 included), V, the three teacher forms (-inf
    entries, padding rows), labels, every divergence, options, and the gradient leaves."""
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    empty = draw(st.integers(0, 9), label="empty?") == 0
    leading = leading_dims(draw, 3, 0 if empty else 1, 4, 24)
    n = math.prod(leading)
    vocab = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 31]), label="V")
    hs, ht = draw(st.integers(1, 6), label="Hs"), draw(st.integers(1, 6), label="Ht")
    extra = draw(st.sampled_from([0, 0, 1, 3]), label="extra teacher vocab")
    scale = 2.0 ** draw(st.integers(-2, 2), label="log2 weight scale")

    # |h.w| <= 2 * 2^k per product, <= 12 * 2^k over 6 features, on a grid of 2^k / 8; with the
    # bias (|b| <= 1/2, grid 1/8) every logit is < 256 grid steps: exact in bfloat16.
    t = {
        "student_hidden": draw(grid((*leading, hs), -4, 4, 0.5), label="student_hidden"),
        "student_weight": draw(grid((vocab, hs), -4, 4, scale / 4), label="student_weight"),
        "student_bias": draw(grid((vocab,), -4, 4, 0.125), label="student_bias")
        if draw(st.booleans(), label="bias")
        else None,
    }
    teacher = draw(st.sampled_from(["hidden", "logits", "topk"]), label="teacher")
    if teacher == "hidden":
        t["teacher_hidden"] = draw(grid((*leading, ht), -4, 4, 0.5), label="teacher_hidden")
        t["teacher_weight"] = draw(grid((vocab + extra, ht), -4, 4, scale / 4), label="teacher_weight")
        if draw(st.booleans(), label="teacher bias"):
            t["teacher_bias"] = draw(grid((vocab + extra,), -4, 4, 0.125), label="teacher_bias")
    else:
        logits = draw(grid((*leading, vocab + extra), -96, 96, scale / 8), label="teacher logits")
        if vocab > 1 and draw(st.booleans(), label="teacher -inf"):
            # A drawn code per entry in [0, 9], masked from 7 up (30%) or from 1 up (90%): shrinks to unmasked.
            start = draw(st.sampled_from([7, 1]), label="masked from code")
            codes = draw(grid(logits.shape, 0, 9, dtype=torch.int64), label="mask codes")
            mask = codes >= start
            mask[..., draw(st.integers(0, vocab - 1), label="kept column")] = False  # a teacher needs some support
            logits = logits.masked_fill(mask, -INF)
        if teacher == "logits":
            t["teacher_logits"] = logits
        else:
            k = draw(st.integers(1, vocab), label="k")
            top, ids = logits[..., :vocab].log_softmax(-1).topk(k, dim=-1)
            t["teacher_ids"] = ids.to(draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
            t["teacher_logprobs"] = top.float()  # data, in any float dtype; exact as given

    ignore_index = draw(st.sampled_from([-100, -1, vocab]), label="ignore_index")
    y = draw(label_tensors(leading, vocab, ignore_index))
    if y is not None:
        t["labels"] = y
        if teacher != "hidden" and draw(st.booleans(), label="ignored rows: teacher all -inf"):
            ignored = (y == ignore_index)[..., None]  # e.g. padding stored as -inf
            name = "teacher_logits" if teacher == "logits" else "teacher_logprobs"
            t[name] = t[name].masked_fill(ignored, -INF)

    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    temperature = draw(st.one_of(st.sampled_from([0.05, 1.0, 20.0]), st.floats(0.05, 20.0)), label="temperature")
    kwargs = dict(
        divergence=draw(SPARSE if teacher == "topk" else DENSE, label="divergence"),
        temperature=temperature,
        soft_weight=draw(st.sampled_from([1.0, 0.0, 0.5, 2.0, min(1.0, temperature**2)]), label="soft_weight"),
        hard_weight=0.0 if y is None else draw(st.sampled_from([0.0, 0.5, 1.0]), label="hard_weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=draw(st.one_of(st.just("auto"), st.integers(1, n + 3)), label="chunk_size"),
        softcap=draw(st.sampled_from([None, None, 2.0, 30.0]), label="softcap"),
        return_parts=draw(st.booleans(), label="return_parts"),
        validate=draw(st.booleans(), label="validate"),
        impl="eager",
    )
    grad_output = None
    if reduction == "none":
        grad_output = draw(grid(leading, -16, 16, 0.125), label="grad_output")
    elif draw(st.booleans(), label="normalizer"):
        value = draw(st.floats(0.5, 64.0), label="normalizer value")
        kwargs["normalizer"] = torch.tensor(value) if draw(st.booleans(), label="as tensor") else value
    grad_names = tuple(draw(st.lists(st.sampled_from(STUDENT), unique=True, max_size=3), label="grad leaves"))
    leaves = tuple(g for g in grad_names if t.get(g) is not None)
    return Call(dtype, leading, t, kwargs, leaves, grad_output)


# =================================================================================================
# Stubs of kdfuse's measuring (test_tuning.py, test_sweep.py, test_cli.py)
# =================================================================================================

GiB = 2**30
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
CANDIDATES = (256, 512, 1024, 2048, 4096, 8192)
# An LLM-sized call: V >= 32768, so candidates run 256 .. min(8192, bucket).
CALL = {
    "rows": 5000,
    "vocab": 128256,
    "student_hidden": 2048,
    "teacher": "hidden",
    "teacher_dim": 4096,
    "dtype": torch.bfloat16,
    "divergence": "forward_kl",
    "with_ce": True,
    "with_grad": True,
}


class SweepCalls:
    """The chunk sizes a stubbed ``bench_chunk_size`` was called with: ``calls`` has every call;
    ``chunks`` each sweep's candidates once, in the order its first round ran them (tuning runs
    rounds over the candidates, see autotune.tune). A sweep is one problem object: holding on to
    the last one keeps its id from being reused by the next."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.chunks: list[int] = []
        self._problem: object = None
        self._seen: set[int] = set()

    def record(self, problem: object, chunk_size: int) -> None:
        if problem is not self._problem:
            self._problem, self._seen = problem, set()
        if chunk_size not in self._seen:
            self._seen.add(chunk_size)
            self.chunks.append(chunk_size)
        self.calls.append(chunk_size)


class FakeBench(SweepCalls):
    """Replaces kdfuse.sweep's measuring functions: canned ms (and peak bytes) per chunk size, an
    exception value raised instead. Every call is recorded in ``calls``; ``chunks`` has each
    sweep's candidates once, in the order its first round ran them."""

    def __init__(self, monkeypatch, times: dict | None = None, peaks: dict[int, int] | None = None):
        self.times, self.peaks = times or {}, peaks or {}
        super().__init__()
        self.floors = 0
        monkeypatch.setattr(sweep, "bench_chunk_size", self.bench)
        monkeypatch.setattr(sweep, "bench_floor", self.floor)

    def bench(self, problem, chunk_size, distill, *, warmup, repeat):
        self.record(problem, chunk_size)
        result = self.times.get(chunk_size, 10.0 + chunk_size / 1000)
        if isinstance(result, BaseException):
            raise result
        return result, self.peaks.get(chunk_size, 0)

    def floor(self, problem, *, warmup, repeat):
        self.floors += 1
        return 1.0, 0


def stub_tune(device: torch.device):
    """resolve_chunk_size's ``tune``: kdfuse.sweep.tune_in_process on a stand-in problem (the
    call's own tensors in kdfuse.fused; the benches are stubbed)."""

    def tune(key, preferred):
        problem = sweep.build_problem(key, device)
        return sweep.tune_in_process(key, preferred, device=device, problem=problem, distill=None)

    return tune


def resolve(device: torch.device = CPU, **overrides) -> int:
    """chunk_size="auto" for :data:`CALL` (with ``overrides``) on ``device``."""
    return tuning.resolve_chunk_size("auto", device=device, tune=stub_tune(device), **{**CALL, **overrides})


def key_for(**overrides) -> TuningKey:
    return tuning.make_key(**{**CALL, "memory_budget": None, **overrides})


def stored(device: torch.device = CPU) -> dict:
    """The tuning cache's entries for ``device`` in the current KDFUSE_CACHE_DIR."""
    return tuning.open_cache(env.settings().cache_dir, device).entries()


def no_problem_stubs(monkeypatch) -> types.SimpleNamespace:
    """The benchmark's inputs are not built and its warm-up step does nothing (for stubbed benches
    at LLM sizes); returns the keys built and the chunk sizes warmed up (conftest's no_problem)."""
    built, warmed = [], []
    monkeypatch.setattr(
        sweep,
        "build_problem",
        lambda key, device: built.append(key) or types.SimpleNamespace(key=key, rows=key.rows_bucket),
    )
    monkeypatch.setattr(sweep, "distill_step", lambda problem, chunk, distill: lambda: warmed.append(chunk))
    return types.SimpleNamespace(built=built, warmed=warmed)
