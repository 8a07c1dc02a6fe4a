"""``fused_linear_distill(impl="eager")`` against the float64 full-logits reference.

Values and gradients (student hidden, weight, bias) are compared over drawn problems in float64
(tight: the two compute the same function, only the summation order differs), then per input
dtype with tolerances derived from the dtype, then the invariants, the module wrapper and the
argument checks. The compiled path is in test_compile.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import Tensor

import kdfuse
from kdfuse import DistillLoss, DistillOutput, fused_linear_distill, fused_linear_distill_ref
from kdfuse import divergences as D

F64 = torch.float64
INF = float("inf")

DIVERGENCES = st.one_of(
    st.sampled_from(["forward_kl", "reverse_kl", "soft_ce", "tvd", "mse_logits", "jsd", "jsd_beta0.1"]),
    st.builds(D.jsd, st.floats(0.0, 1.0)),
    st.builds(D.skew_kl, st.floats(0.0, 1.0)),
    st.builds(D.skew_reverse_kl, st.floats(0.0, 1.0)),
    st.builds(D.symmetric_kl, st.floats(0.0, 1.0)),
)
VOCABS = [1, 2, 3, 5, 7, 13, 31, 64, 97]  # odd, prime, one power of two


@dataclass
class Problem:
    """Tensors and keyword arguments for one call; ``call()`` makes fresh leaves every time."""

    leading: tuple[int, ...]
    tensors: dict  # name -> tensor (student ones become grad leaves)
    kwargs: dict = field(default_factory=dict)
    grad_names: tuple[str, ...] = ("student_hidden", "student_weight", "student_bias")

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


def draw_labels(draw, gen: torch.Generator, leading: tuple, vocab: int, ignore_index: int) -> Tensor | None:
    """Labels (or None) with none, some, all or no rows ignored, as int64 or int32."""
    label_mode = draw(st.sampled_from(["none", "some ignored", "all ignored", "no ignored"]), label="labels")
    if label_mode == "none":
        return None
    labels = torch.randint(0, vocab, leading, generator=gen)
    if label_mode == "some ignored":
        labels = labels.masked_fill(torch.rand(leading, generator=gen) < 0.4, ignore_index)
    elif label_mode == "all ignored":
        labels = torch.full(leading, ignore_index)
    return labels.to(draw(st.sampled_from([torch.int64, torch.int32]), label="label dtype"))


@st.composite
def problems(draw, max_rows: int = 40, allow_empty: bool = True):
    rank = draw(st.integers(1, 3), label="rank")
    lo = 0 if allow_empty else 1
    leading = tuple(draw(st.lists(st.integers(lo, 5), min_size=rank, max_size=rank), label="leading"))
    while math.prod(leading) > max_rows:
        leading = leading[1:] + (1,)
    n = math.prod(leading)
    vocab = draw(st.sampled_from(VOCABS), label="V")
    hs = draw(st.integers(1, 6), label="Hs")
    ht = hs + draw(st.integers(1, 5), label="Ht-Hs")  # Hs != Ht
    extra = draw(st.sampled_from([0, 0, 1, 4]), label="extra teacher vocab")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    logit_scale = draw(st.sampled_from([0.3, 1.0, 4.0]), label="logit scale")
    t = {
        "student_hidden": randn(*leading, hs),
        "student_weight": randn(vocab, hs, scale=logit_scale / math.sqrt(hs)),
        "student_bias": randn(vocab) if draw(st.booleans(), label="student bias") else None,
    }
    if draw(st.booleans(), label="teacher as logits"):
        logits = randn(*leading, vocab + extra, scale=logit_scale)
        if vocab > 1 and draw(st.booleans(), label="teacher -inf"):
            mask = torch.rand(*leading, vocab + extra, generator=gen) < 0.3
            mask[..., 0] = False  # keep every row's support non-empty
            logits = logits.masked_fill(mask, -INF)
        t["teacher_logits"] = logits
    else:
        t["teacher_hidden"] = randn(*leading, ht)
        t["teacher_weight"] = randn(vocab + extra, ht, scale=logit_scale / math.sqrt(ht))
        if draw(st.booleans(), label="teacher bias"):
            t["teacher_bias"] = randn(vocab + extra)

    ignore_index = draw(st.sampled_from([-100, -1]), label="ignore_index")
    labels = draw_labels(draw, gen, leading, vocab, ignore_index)
    if labels is not None:
        t["labels"] = labels

    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    kwargs = dict(
        divergence=draw(DIVERGENCES, label="divergence"),
        temperature=draw(st.floats(0.5, 4.0), label="temperature"),
        soft_weight=draw(st.sampled_from([1.0, 0.0, 0.3, 2.5]), label="soft_weight"),
        hard_weight=0.0 if labels is None else draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]), label="hard_weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=draw(st.one_of(st.just("auto"), st.integers(1, max(n, 1) + 3)), label="chunk_size"),
        softcap=draw(st.sampled_from([None, None, 3.0, 30.0]), label="softcap"),
    )
    if reduction != "none":
        kind = draw(st.sampled_from(["none", "number", "tensor"]), label="normalizer")
        if kind == "number":
            kwargs["normalizer"] = draw(st.floats(0.5, 100.0), label="normalizer value")
        elif kind == "tensor":
            kwargs["normalizer"] = torch.tensor(draw(st.floats(0.5, 100.0)), dtype=F64)
    return Problem(leading, t, kwargs)


def compare_to_reference(prob: Problem, rtol: float = 1e-9, grad_output=None):
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref)
    per_row = prob.kwargs.get("reduction", "mean") == "none"
    assert out.dtype == F64 and out.shape == ref.shape == (prob.leading if per_row else ())
    assert_close_scaled(out.detach(), ref.detach(), rtol, "loss")
    if prob.kwargs.get("reduction", "mean") == "none" and grad_output is None:
        grad_output = torch.randn(prob.leading, dtype=F64)
    g, g_ref = grads_of(out, leaves, grad_output), grads_of(ref, ref_leaves, grad_output)
    for name in leaves:
        assert torch.isfinite(g[name]).all(), name
        assert g[name].dtype == leaves[name].dtype
        assert_close_scaled(g[name], g_ref[name], rtol, f"grad {name}")
    return out, g


# --- float64: fused == reference -----------------------------------------------------------------


@given(prob=problems())
def test_matches_reference_float64(prob):
    note(f"leading={prob.leading} kwargs={prob.kwargs}")
    compare_to_reference(prob)


@given(prob=problems(allow_empty=False))
def test_parts_match_reference_and_combine(prob):
    """return_parts: (loss, soft, hard) equal the reference's, and loss == sw·soft + hw·hard."""
    out, _ = prob.call(fused_linear_distill, impl="eager", return_parts=True)
    ref, _ = prob.call(fused_linear_distill_ref, return_parts=True)
    assert isinstance(out, DistillOutput)
    for name, a, b in zip(DistillOutput._fields, out, ref):
        assert_close_scaled(a.detach(), b, 1e-9, name)
    assert out.soft_loss.grad_fn is None and out.hard_loss.grad_fn is None
    sw, hw = prob.kwargs["soft_weight"], prob.kwargs["hard_weight"]
    assert_close_scaled(out.loss.detach(), sw * out.soft_loss + hw * out.hard_loss, 1e-12, "combination")
    if hw == 0:
        assert (out.hard_loss == 0).all()


@given(prob=problems(allow_empty=False), data=st.data())
def test_chunk_size_invariance(prob, data):
    n = math.prod(prob.leading)
    sizes = data.draw(st.lists(st.integers(1, n + 2), min_size=2, max_size=3), label="chunk sizes")
    results = []
    for size in sizes:
        out, leaves = prob.call(fused_linear_distill, impl="eager", chunk_size=size)
        go = torch.ones(prob.leading, dtype=F64) if prob.kwargs["reduction"] == "none" else None
        results.append((out.detach(), grads_of(out, leaves, go)))
    (out0, g0), *rest = results
    for out, g in rest:
        assert_close_scaled(out, out0, 1e-12, "loss")
        for name in g0:
            assert_close_scaled(g[name], g0[name], 1e-12, name)


@given(prob=problems(allow_empty=False), seed=st.integers(0, 2**31 - 1))
def test_rows_permute_with_reduction_none(prob, seed):
    prob.kwargs.update(reduction="none")
    prob.kwargs.pop("normalizer", None)
    n = math.prod(prob.leading)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    flat = {k: None if v is None else v for k, v in prob.tensors.items()}
    permuted = dict(flat)
    for name in ("student_hidden", "teacher_hidden", "teacher_logits", "labels"):
        if flat.get(name) is not None:
            x = flat[name].reshape(n, *flat[name].shape[len(prob.leading) :])
            permuted[name] = x[perm].reshape(flat[name].shape)
    go = torch.randn(prob.leading, dtype=F64)
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    g = grads_of(out, leaves, go)
    pprob = Problem(prob.leading, permuted, prob.kwargs)
    pout, pleaves = pprob.call(fused_linear_distill, impl="eager")
    pg = grads_of(pout, pleaves, go.reshape(n)[perm].reshape(prob.leading))
    assert_close_scaled(pout.reshape(n), out.detach().reshape(n)[perm], 1e-12, "loss")
    hs = g["student_hidden"].shape[-1]
    assert_close_scaled(pg["student_hidden"].reshape(n, hs), g["student_hidden"].reshape(n, hs)[perm], 1e-12, "hidden")
    for name in ("student_weight", "student_bias"):
        if name in g:
            assert_close_scaled(pg[name], g[name], 1e-12, name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("divergence", ["forward_kl", D.jsd(0.4), "reverse_kl"])
def test_gradcheck_float64(reduction, teacher, divergence):
    """Numerical vs analytic Jacobian through the autograd Function (the per-row backward
    recompute for "none" included), with bias, ignored rows, CE, softcap and temperature."""
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(2, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    y = torch.tensor([[1, -100, 4], [0, 2, 3]])
    if teacher == "hidden":
        teach = dict(
            teacher_hidden=torch.randn(2, 3, 4, generator=gen, dtype=F64),
            teacher_weight=torch.randn(6, 4, generator=gen, dtype=F64),
        )
    else:
        teach = dict(teacher_logits=torch.randn(2, 3, 6, generator=gen, dtype=F64))

    def f(h, w, b):
        return fused_linear_distill(
            h,
            w,
            **teach,
            labels=y,
            student_bias=b,
            divergence=divergence,
            temperature=1.7,
            hard_weight=0.3,
            reduction=reduction,
            chunk_size=2,
            softcap=4.0,
            impl="eager",
        )

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_retain_graph_backward_twice():
    prob = fixed_problem(n=9, vocab=11)
    for reduction in ("mean", "none"):
        out, leaves = prob.call(fused_linear_distill, impl="eager", reduction=reduction)
        total = out.sum()
        first = torch.autograd.grad(total, list(leaves.values()), retain_graph=True)
        second = torch.autograd.grad(total, list(leaves.values()))
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        with pytest.raises(RuntimeError):  # graph freed: PyTorch's usual error, not a crash
            torch.autograd.grad(total, list(leaves.values()))


# --- edge cases: nothing to compute --------------------------------------------------------------


def fixed_problem(n=12, vocab=13, hs=5, ht=7, labels=True, seed=0, teacher="hidden", dtype=F64, **kwargs):
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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction, teacher, dtype):
    prob = fixed_problem(n=10, teacher=teacher, dtype=dtype, hard_weight=0.7, divergence="reverse_kl")
    prob.tensors["labels"] = torch.full((10,), -100)
    out, leaves = prob.call(fused_linear_distill, impl="eager", reduction=reduction, return_parts=True)
    for part in out:
        assert torch.equal(part, torch.zeros_like(part))
    go = torch.ones(10) if reduction == "none" else None
    for name, g in grads_of(out.loss, leaves, go).items():
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("leading", [(0,), (2, 0), (0, 3, 4)])
def test_no_rows_gives_zero_loss_and_zero_grads(reduction, teacher, leading):
    gen = torch.Generator().manual_seed(0)
    t = {
        "student_hidden": torch.randn(*leading, 4, dtype=F64),
        "student_weight": torch.randn(7, 4, generator=gen, dtype=F64),
        "student_bias": torch.randn(7, generator=gen, dtype=F64),
        "labels": torch.zeros(leading, dtype=torch.long),
    }
    if teacher == "hidden":
        t.update(teacher_hidden=torch.randn(*leading, 6, dtype=F64), teacher_weight=torch.randn(9, 6, dtype=F64))
    else:
        t.update(teacher_logits=torch.randn(*leading, 9, dtype=F64))
    prob = Problem(leading, t, dict(reduction=reduction, hard_weight=1.0, impl="eager"))
    for fn in (fused_linear_distill, fused_linear_distill_ref):
        out, leaves = prob.call(fn)
        assert out.shape == (leading if reduction == "none" else ())
        assert torch.equal(out, torch.zeros_like(out))
        go = torch.ones(leading, dtype=F64) if reduction == "none" else None
        for name, g in grads_of(out, leaves, go).items():
            assert torch.equal(g, torch.zeros_like(leaves[name])), name


def test_single_row_and_one_row_tail():
    # N = 1 and chunk tails of one row (which kdfuse merges into the previous chunk).
    for n, chunk in ((1, 1), (1, 4), (5, 4), (9, 4), (9, 2), (3, 1)):
        prob = fixed_problem(n=n, hard_weight=0.5, divergence=D.jsd(0.3), chunk_size=chunk)
        compare_to_reference(prob)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(reduction):
    """Transposed / strided views give the same values and gradients as contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(5, 12, generator=gen, dtype=F64).t()  # (12, 5), strides (1, 12)
    weight = torch.randn(5, 17, generator=gen, dtype=F64).t()  # (17, 5)
    t_logits = torch.randn(12, 40, generator=gen, dtype=F64)[:, ::2]  # (12, 20), every other column
    labels = torch.randint(0, 17, (24,), generator=gen)[::2]
    strided = Problem(
        (12,),
        dict(student_hidden=hidden, student_weight=weight, teacher_logits=t_logits, labels=labels),
        dict(reduction=reduction, hard_weight=0.5, divergence=D.jsd(0.7), chunk_size=5),
    )
    dense = Problem((12,), {k: v.contiguous() for k, v in strided.tensors.items()}, strided.kwargs)
    strided.grad_names = dense.grad_names = ("student_hidden", "student_weight")
    a, _ = strided.call(fused_linear_distill, impl="eager")
    b, lb = dense.call(fused_linear_distill, impl="eager")
    # Leaves that keep the strides (clone preserves them), so the gradients are strided too.
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    assert not h.is_contiguous() and not w.is_contiguous()
    out = fused_linear_distill(h, w, teacher_logits=t_logits, labels=labels, impl="eager", **strided.kwargs)
    go = torch.ones(12, dtype=F64) if reduction == "none" else None
    gh, gw = torch.autograd.grad(out, (h, w), go)
    gb = grads_of(b, lb, go)
    assert_close_scaled(out.detach(), b.detach(), 1e-12)
    assert_close_scaled(gh, gb["student_hidden"], 1e-12, "hidden")
    assert_close_scaled(gw, gb["student_weight"], 1e-12, "weight")
    assert_close_scaled(a.detach(), b.detach(), 1e-12)
    compare_to_reference(strided)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dense_teacher_logits_in_another_dtype(teacher_dtype):
    """Precomputed teacher logits may come in any float dtype: they are upcast exactly, so a
    float64 student still matches the reference to float64 precision."""
    prob = fixed_problem(n=10, vocab=13, teacher="logits", hard_weight=0.5, divergence="reverse_kl", temperature=1.5)
    prob.tensors["teacher_logits"] = prob.tensors["teacher_logits"].to(teacher_dtype)
    compare_to_reference(prob)


# --- teacher vocabulary larger than the student's ------------------------------------------------


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("extra", [1, 5])
def test_extra_teacher_columns_are_dropped(teacher, extra):
    vocab = 11
    prob = fixed_problem(n=8, vocab=vocab, teacher=teacher, hard_weight=0.4, divergence="jsd")
    gen = torch.Generator().manual_seed(1)
    wide = dict(prob.tensors)
    if teacher == "hidden":
        # Padded rows with huge values: if they leaked into the softmax they would dominate it.
        pad = torch.randn(extra, 7, generator=gen, dtype=F64) * 100
        wide["teacher_weight"] = torch.cat([prob.tensors["teacher_weight"], pad])
        wide["teacher_bias"] = torch.cat([torch.zeros(vocab, dtype=F64), torch.full((extra,), 50.0, dtype=F64)])
        narrow = dict(prob.tensors, teacher_bias=torch.zeros(vocab, dtype=F64))
    else:
        pad = torch.full((8, extra), 60.0, dtype=F64)
        wide["teacher_logits"] = torch.cat([prob.tensors["teacher_logits"], pad], dim=-1)
        narrow = prob.tensors
    wide_out, wl = Problem((8,), wide, prob.kwargs).call(fused_linear_distill, impl="eager")
    narrow_out, nl = Problem((8,), narrow, prob.kwargs).call(fused_linear_distill, impl="eager")
    ref_out, _ = Problem((8,), wide, prob.kwargs).call(fused_linear_distill_ref)
    assert_close_scaled(wide_out.detach(), narrow_out.detach(), 1e-12)
    assert_close_scaled(wide_out.detach(), ref_out.detach(), 1e-9)
    gw, gn = grads_of(wide_out, wl), grads_of(narrow_out, nl)
    for name in gw:
        assert_close_scaled(gw[name], gn[name], 1e-12, name)


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


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_BOUNDS), ids=str)
@pytest.mark.parametrize(
    "divergence,hard_weight",
    [("forward_kl", 0.5), (D.jsd(0.3), 0.0), ("reverse_kl", 0.0), (D.skew_kl(0.1), 1.0)],
    ids=["forward_kl+ce", "jsd0.3", "reverse_kl", "skew_kl+ce"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs_match_float64_reference(dtype, divergence, hard_weight, reduction):
    prob = fixed_problem(
        n=64,
        vocab=257,
        hs=32,
        ht=48,
        dtype=dtype,
        seed=3,
        divergence=divergence,
        hard_weight=hard_weight,
        temperature=2.0,
        chunk_size=24,
        reduction=reduction,
    )
    for name in ("student_weight", "teacher_weight"):  # logits of magnitude ~3
        prob.tensors[name] = prob.tensors[name] * 3
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    ref, ref_leaves = prob.call(fused_linear_distill_ref, dtype=F64)  # exact copies of the inputs
    go = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=F64) if reduction == "none" else None
    g = grads_of(out, leaves, None if go is None else go.float())
    g_ref = grads_of(ref, ref_leaves, go)
    assert_low_precision_close(out, g, ref, g_ref, dtype)


# --- user divergences ----------------------------------------------------------------------------


def hellinger(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared Hellinger distance ½ Σ (√p_s − √p_t)², with plain torch ops."""
    root_s = torch.exp(0.5 * torch.log_softmax(student, -1))
    root_t = torch.exp(0.5 * torch.log_softmax(teacher, -1))
    return 0.5 * (root_s - root_t).pow(2).sum(-1)


@given(prob=problems(max_rows=20))
def test_custom_divergence_matches_reference(prob):
    prob.kwargs["divergence"] = hellinger
    out, _ = compare_to_reference(prob)
    kw = prob.kwargs
    if kw["reduction"] == "mean" and "normalizer" not in kw and kw["soft_weight"] == 1.0 and kw["hard_weight"] == 0:
        assert 0.0 <= out.item() <= 1.0 + 1e-12  # a mean of squared Hellinger distances, in [0, 1]


def test_custom_divergence_against_textbook():
    """The whole pipeline with Hellinger, checked against probabilities computed here."""
    prob = fixed_problem(n=6, vocab=9, labels=False, divergence=hellinger, temperature=2.0)
    out, _ = prob.call(fused_linear_distill, impl="eager", reduction="none")
    t = prob.tensors
    s_logits = (t["student_hidden"] @ t["student_weight"].T + t["student_bias"]) / 2.0
    t_logits = (t["teacher_hidden"] @ t["teacher_weight"].T) / 2.0
    ps, pt = s_logits.softmax(-1), t_logits.softmax(-1)
    expected = 0.5 * ((ps.sqrt() - pt.sqrt()) ** 2).sum(-1)
    assert_close_scaled(out.detach(), expected, 1e-12)


# --- module, gradient bookkeeping ----------------------------------------------------------------


def test_distill_loss_module_matches_functional():
    prob = fixed_problem(n=10, hard_weight=0.5)
    t = prob.tensors
    opts = dict(divergence=D.jsd(0.3), temperature=2.0, hard_weight=0.5, chunk_size=3, impl="eager")
    module = DistillLoss(**opts)
    assert "jsd_beta0.3" in repr(module) and "temperature=2.0" in repr(module)
    args = (t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"])
    expected = fused_linear_distill(*args, labels=t["labels"], student_bias=t["student_bias"], **opts)
    got = module(*args, labels=t["labels"], student_bias=t["student_bias"])
    assert torch.equal(got, expected)
    # Per-call overrides win over the stored options.
    got = module(*args, labels=t["labels"], reduction="none", return_parts=True)
    ref = fused_linear_distill_ref(*args, labels=t["labels"], **{**opts, "reduction": "none"}, return_parts=True)
    assert isinstance(got, DistillOutput) and got.loss.shape == (10,)
    for a, b in zip(got, ref):
        assert_close_scaled(a, b, 1e-9)


def test_distill_loss_module_passes_the_divergence_object_itself():
    """A callable-object divergence must reach the kernel as the same object on every call (a
    copy would be a new compile-cache key, i.e. a recompile per step)."""

    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, student, teacher):
            self.calls += 1
            return D.forward_kl(student, teacher)

    div = Counting()
    module = DistillLoss(divergence=div, impl="eager")
    prob = fixed_problem(n=4)
    t = prob.tensors
    for _ in range(2):
        module(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"])
    assert div.calls >= 2
    assert module.options.divergence is div


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_gets_no_gradient(teacher, reduction):
    prob = fixed_problem(n=7, teacher=teacher, hard_weight=0.3)
    if teacher == "hidden":
        prob.tensors["teacher_bias"] = torch.randn(13, dtype=F64)
    teacher_names = [n for n in prob.tensors if n.startswith("teacher")]
    prob.grad_names = ("student_hidden", "student_weight", "student_bias", *teacher_names)
    out, leaves = prob.call(fused_linear_distill, impl="eager", reduction=reduction)
    out.sum().backward()
    for name in teacher_names:
        assert leaves[name].grad is None, name
    assert leaves["student_hidden"].grad is not None and leaves["student_hidden"].grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_partial_requires_grad(reduction):
    """Only the tensors that require grad get one, and they match the reference's."""
    prob = fixed_problem(n=9, hard_weight=0.5, reduction=reduction)
    go = torch.randn(9, dtype=F64) if reduction == "none" else None
    for names in (("student_hidden",), ("student_weight",), ("student_bias",), ("student_weight", "student_bias")):
        prob.grad_names = names
        out, leaves = prob.call(fused_linear_distill, impl="eager")
        ref, ref_leaves = prob.call(fused_linear_distill_ref)
        g, g_ref = grads_of(out, leaves, go), grads_of(ref, ref_leaves, go)
        assert set(g) == set(names)
        for name in names:
            assert_close_scaled(g[name], g_ref[name], 1e-9, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_fn_when_no_gradient_is_needed(reduction):
    prob = fixed_problem(n=6, hard_weight=0.5, reduction=reduction, impl="eager")
    with_grad, _ = prob.call(fused_linear_distill)
    with torch.no_grad():
        under_no_grad, _ = prob.call(fused_linear_distill)
    prob.grad_names = ()
    plain, _ = prob.call(fused_linear_distill)
    for out in (under_no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        assert_close_scaled(out, with_grad.detach(), 1e-12)
    assert with_grad.grad_fn is not None


def test_string_divergence_and_labels_none():
    prob = fixed_problem(n=8, labels=False, divergence="jsd_beta0.3")
    out, _ = prob.call(fused_linear_distill, impl="eager")
    same, _ = prob.call(fused_linear_distill, impl="eager", divergence=D.jsd(0.3))
    assert torch.equal(out, same)
    compare_to_reference(prob)


# --- argument checks -----------------------------------------------------------------------------


def _base():
    return dict(
        student_hidden=torch.randn(2, 3, 4),
        student_weight=torch.randn(5, 4),
        teacher_hidden=torch.randn(2, 3, 6),
        teacher_weight=torch.randn(5, 6),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(teacher_hidden=None, teacher_weight=None), ValueError, "exactly one teacher"),
        (dict(teacher_logits=torch.randn(2, 3, 5)), ValueError, "exactly one teacher"),
        (dict(teacher_weight=None), ValueError, "together"),
        (dict(student_weight=torch.randn(5, 3)), ValueError, "Hs=3"),
        (dict(student_weight=torch.randn(5, 4, 1)), ValueError, "student_weight"),
        (dict(teacher_weight=torch.randn(5, 7)), ValueError, "Ht"),
        (dict(teacher_weight=torch.randn(4, 6)), ValueError, "smaller"),
        (dict(teacher_hidden=torch.randn(2, 4, 6)), ValueError, "rows"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 3, 4)), ValueError, "smaller"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(5, 7)), ValueError, "rows"),
        (
            dict(
                teacher_hidden=None,
                teacher_weight=None,
                teacher_logits=torch.randn(2, 3, 5),
                teacher_bias=torch.randn(5),
            ),
            ValueError,
            "teacher_bias",
        ),
        (dict(student_bias=torch.randn(4)), ValueError, "student_bias"),
        (dict(teacher_bias=torch.randn(6)), ValueError, "teacher_bias"),
        (dict(student_hidden=torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (dict(teacher_weight=[[1.0]]), TypeError, "Tensor"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "integer"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "integer"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        (dict(hard_weight=0.5), ValueError, "needs labels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=INF), ValueError, "temperature"),
        (dict(soft_weight=float("nan")), ValueError, "soft_weight"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(impl="triton"), ValueError, "impl"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=True), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(divergence="kl_forward"), ValueError, "unknown divergence"),
        (dict(divergence=3), TypeError, "divergence"),
        (dict(divergence="jsd_beta2"), ValueError, "beta"),
    ],
)
@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
def test_invalid_arguments_raise(change, error, match, fn):
    kwargs = {**_base(), **change}
    with pytest.raises(error, match=match):
        fn(**kwargs)


def test_public_api():
    assert kdfuse.fused_linear_distill is fused_linear_distill
    assert kdfuse.fused_linear_distill_ref is fused_linear_distill_ref
    assert set(DistillOutput._fields) == {"loss", "soft_loss", "hard_loss"}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_is_an_explicit_cast(reduction, hidden_dtype):
    """Under autocast (float32 weights; hidden states float32 or, as a bf16 autocast model hands
    them over, bf16) the loss and gradients are those of the same call with every matmul input
    cast to bf16 first, whatever the reduction (``"none"`` recomputes in backward, here run inside
    the autocast region too), and the gradients arrive in the parameters' dtypes."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=gen).to(hidden_dtype).requires_grad_()
    w = torch.randn(13, 8, generator=gen, requires_grad=True)
    th, tw = torch.randn(2, 5, 6, generator=gen), torch.randn(13, 6, generator=gen)
    y = torch.randint(0, 13, (2, 5), generator=gen)
    y[0, 1] = -100
    kw = dict(labels=y, hard_weight=0.5, temperature=2.0, reduction=reduction, chunk_size=3, impl="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kdfuse.fused_linear_distill(h, w, th, tw, **kw)
        grads = torch.autograd.grad(loss.sum(), (h, w))
    hb, wb = (t.detach().bfloat16().requires_grad_() for t in (h, w))
    want = kdfuse.fused_linear_distill(hb, wb, th.bfloat16(), tw.bfloat16(), **kw)
    want_grads = torch.autograd.grad(want.sum(), (hb, wb))
    assert torch.equal(loss, want)
    # And that call is right: the float64 reference of the bf16 inputs, up to the bf16 logits.
    ref = kdfuse.fused_linear_distill_ref(hb.detach(), wb.detach(), th.bfloat16(), tw.bfloat16(), **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=1e-3)
    for g, leaf, expected in zip(grads, (h, w), want_grads):
        assert g.dtype == leaf.dtype
        assert torch.equal(g, expected.to(leaf.dtype))
