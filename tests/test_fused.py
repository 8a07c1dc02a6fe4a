"""``fused_linear_distill(impl="eager")`` against the float64 full-logits reference.

Values and gradients (student hidden, weight, bias) are compared over drawn problems in float64
(tight: the two compute the same function, only the summation order differs), then on fixed
calls: reductions and normalizers, N = 0 and all rows ignored, layouts (leading dims of rank 1 to
4, strided, expanded and non-contiguous views, tied and sliced weights), teacher forms and
dtypes, per input dtype with tolerances derived from the dtype (helpers.LOW_PRECISION_BOUNDS),
and numerical edge values (16-bit logits near their range limits, extreme temperatures, masked
teacher vocabulary, one-hot and identical teachers, divergence parameters at their ends).

The chunk loop and its autograd bookkeeping are in test_engine.py, the compiled path in
test_compile.py, the argument checks in test_validate.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    F64,
    HALF,
    INF,
    LOW_PRECISION_BOUNDS,
    UNIT_ROUNDOFF,
    Problem,
    assert_close_scaled,
    assert_low_precision_close,
    compare_to_reference,
    fixed_problem,
    grads_of,
    grid,
    hellinger,
    inputs,
    name_of,
    problems,
    rel_err,
)
from hypothesis import given, note
from hypothesis import strategies as st

import kdfuse
from kdfuse import DistillOutput, fused_linear_distill, fused_linear_distill_ref
from kdfuse import divergences as D

# --- float64: fused == reference over drawn problems ---------------------------------------------


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
def test_rows_permute_with_reduction_none(prob, data):
    prob.kwargs.update(reduction="none")
    prob.kwargs.pop("normalizer", None)
    n = math.prod(prob.leading)
    perm = torch.tensor(data.draw(st.permutations(range(n)), label="permutation"))
    flat = {k: None if v is None else v for k, v in prob.tensors.items()}
    permuted = dict(flat)
    for name in ("student_hidden", "teacher_hidden", "teacher_logits", "labels"):
        if flat.get(name) is not None:
            x = flat[name].reshape(n, *flat[name].shape[len(prob.leading) :])
            permuted[name] = x[perm].reshape(flat[name].shape)
    go = data.draw(grid(prob.leading, -4, 4, 0.5), label="grad_output")
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


@given(prob=problems(max_rows=20))
def test_custom_divergence_matches_reference(prob):
    prob.kwargs["divergence"] = hellinger
    out, _ = compare_to_reference(prob)
    kw = prob.kwargs
    if kw["reduction"] == "mean" and "normalizer" not in kw and kw["soft_weight"] == 1.0 and kw["hard_weight"] == 0:
        assert 0.0 <= out.item() <= 1.0 + 1e-12  # a mean of squared Hellinger distances, in [0, 1]


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


# --- nothing to compute: all rows ignored, no rows ------------------------------------------------


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


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=name_of)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_in_low_precision(dtype, reduction):
    """N = 0 (rank-4 leading dims) in every input dtype: a zero loss of the right shape and dtype,
    zero gradients of the leaves' shapes and dtypes."""
    leading = (2, 0, 3, 1)
    t = inputs(leading=leading, dtype=dtype, vocab=7)
    t["student_bias"] = torch.randn(7).to(dtype)
    prob = Problem(leading, t, dict(reduction=reduction, hard_weight=0.5, divergence=D.jsd(0.2)))
    out, leaves = prob.call(fused_linear_distill, impl="eager")
    assert out.dtype == torch.float32 and out.shape == (leading if reduction == "none" else ())
    assert torch.equal(out, torch.zeros_like(out))
    go = torch.ones(leading) if reduction == "none" else None
    for name, g in grads_of(out, leaves, go).items():
        assert g.shape == leaves[name].shape and g.dtype == dtype, name
        assert torch.equal(g, torch.zeros_like(g)), name


# --- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("leading", [(7,), (2, 3), (2, 1, 3), (1, 2, 3, 2)], ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_dims_of_rank_1_to_4(leading, reduction):
    t = inputs(leading=leading, dtype=F64, vocab=9, seed=len(leading))
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


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=name_of)
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
    else:  # bf16 inputs: helpers.LOW_PRECISION_BOUNDS
        assert_low_precision_close(out, {"w": g[2:17, :5]}, ref, {"w": g_ref}, dtype)


# --- teacher forms and vocabularies --------------------------------------------------------------


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dense_teacher_logits_in_another_dtype(teacher_dtype):
    """Precomputed teacher logits may come in any float dtype: they are upcast exactly, so a
    float64 student still matches the reference to float64 precision."""
    prob = fixed_problem(n=10, vocab=13, teacher="logits", hard_weight=0.5, divergence="reverse_kl", temperature=1.5)
    prob.tensors["teacher_logits"] = prob.tensors["teacher_logits"].to(teacher_dtype)
    compare_to_reference(prob)


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


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("fn", ["fused", "reference"])
def test_ignored_top_k_row_may_hold_anything(fn, validate):
    """A top-k teacher's ignored rows (labels == ignore_index) may hold NaN log-probs and
    out-of-range ids, as a dense teacher's may hold anything: the loss and gradients are those of
    the same call with clean rows there, and finite."""
    call = fused_linear_distill if fn == "fused" else fused_linear_distill_ref
    gen = torch.Generator().manual_seed(5)
    n, hidden, vocab, k = 6, 5, 11, 3
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    logprobs, ids = torch.randn(n, vocab, generator=gen, dtype=torch.float64).log_softmax(-1).topk(k, dim=-1)

    def run(ids, logprobs):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        kw = {"impl": "eager"} if fn == "fused" else {}
        loss = call(
            hl,
            wl,
            teacher_topk=(ids, logprobs),
            labels=labels,
            divergence="topk_forward_kl_bucket",
            hard_weight=0.5,
            chunk_size=4,
            validate=validate,
            **kw,
        )
        return (loss, *torch.autograd.grad(loss, (hl, wl)))

    dirty_ids, dirty_lp = ids.clone(), logprobs.clone()
    dirty_lp[1] = math.nan
    dirty_ids[1] = vocab + 7
    dirty_lp[4, 0] = math.inf
    want = run(ids, logprobs)
    for got, expected in zip(run(dirty_ids, dirty_lp), want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fn", [fused_linear_distill, fused_linear_distill_ref], ids=["fused", "ref"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", D.jsd(0.3)], ids=name_of)
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


# --- per input dtype, against the float64 reference (bounds: helpers.LOW_PRECISION_BOUNDS) ------


def _against_float64(dtype, divergence, hard_weight, reduction, **options):
    """(fused loss, its grads, reference loss, its grads) on a fixed problem in ``dtype`` with
    logits of magnitude ~3; the reference gets exact float64 copies of the rounded inputs."""
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
    for name in ("student_weight", "teacher_weight"):
        prob.tensors[name] = prob.tensors[name] * 3
    out, leaves = prob.call(fused_linear_distill, impl="eager", **options)
    ref, ref_leaves = prob.call(fused_linear_distill_ref, dtype=F64)
    go = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=F64) if reduction == "none" else None
    return out, grads_of(out, leaves, None if go is None else go.float()), ref, grads_of(ref, ref_leaves, go)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_BOUNDS), ids=str)
@pytest.mark.parametrize(
    "divergence,hard_weight",
    [("forward_kl", 0.5), (D.jsd(0.3), 0.0), ("reverse_kl", 0.0), (D.skew_kl(0.1), 1.0)],
    ids=["forward_kl+ce", "jsd0.3", "reverse_kl", "skew_kl+ce"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs_match_float64_reference(dtype, divergence, hard_weight, reduction):
    assert_low_precision_close(*_against_float64(dtype, divergence, hard_weight, reduction), dtype)


# fp32_logits: the logits are float32 GEMM outputs, so the loss is as accurate as with float32
# inputs (LOW_PRECISION_BOUNDS[float32]; measured 2.9e-7, where 16-bit logits give 1.5e-4 to
# 1.6e-3); the gradients carry one rounding of the logit gradient to the input dtype besides the
# output's own (inherent): measured ≤ 0.22u beyond inherent (16-bit logits: 2.4u), bound 1u.
FP32_LOGITS_BOUNDS = {dtype: (LOW_PRECISION_BOUNDS[torch.float32][0], u) for dtype, u in UNIT_ROUNDOFF.items()}


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=str)
@pytest.mark.parametrize(
    "divergence,hard_weight", [("forward_kl", 0.5), (D.jsd(0.3), 0.0), ("reverse_kl", 0.0)], ids=name_of
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_logits_reach_float32_accuracy(dtype, divergence, hard_weight, reduction):
    results = _against_float64(dtype, divergence, hard_weight, reduction, fp32_logits=True)
    assert_low_precision_close(*results, dtype, bounds=FP32_LOGITS_BOUNDS)


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


# --- user divergences, names, the public API -----------------------------------------------------


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


def test_string_divergence_and_labels_none():
    prob = fixed_problem(n=8, labels=False, divergence="jsd_beta0.3")
    out, _ = prob.call(fused_linear_distill, impl="eager")
    same, _ = prob.call(fused_linear_distill, impl="eager", divergence=D.jsd(0.3))
    assert torch.equal(out, same)
    compare_to_reference(prob)


def test_public_api():
    assert kdfuse.fused_linear_distill is fused_linear_distill
    assert kdfuse.fused_linear_distill_ref is fused_linear_distill_ref
    assert set(DistillOutput._fields) == {"loss", "soft_loss", "hard_loss"}


# =================================================================================================
# Numerical edge cases against the float64 reference
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
    u = UNIT_ROUNDOFF[dtype]
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
    ids=name_of,
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
    16-bit: helpers.LOW_PRECISION_BOUNDS (the reference sees exact float64 copies of the inputs;
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
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=name_of)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=name_of)
def test_extreme_temperatures(temperature, divergence, dtype):
    prob = _random_problem(seed=3, divergence=divergence, temperature=temperature, hard_weight=0.3)
    _check_dtype(prob, dtype, reduction="mean" if temperature < 1 else "none")


@pytest.mark.parametrize("masked", [0.3, "all but one"])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=name_of)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=name_of)
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


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=name_of)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_one_hot_like_teacher(divergence, temperature):
    """One teacher logit 50 above the rest (p ~ 1 - V e^-50; at T = 0.05 a gap of 1000): float32."""
    prob = _random_problem(seed=7, divergence=divergence, temperature=temperature, hard_weight=0.5, scale=1.0)
    t = prob.tensors["teacher_logits"]
    top = torch.randint(0, t.shape[1], (t.shape[0],), generator=torch.Generator().manual_seed(8))
    prob.tensors["teacher_logits"] = t.scatter_add(1, top[:, None], torch.full((t.shape[0], 1), 50.0, dtype=F64))
    _check_dtype(prob, torch.float32)


IDENTICAL_TOL = {F64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6}  # soft loss / its gradient


@pytest.mark.parametrize("divergence", [d for d in ALL_DIVERGENCES if d != "soft_ce"], ids=name_of)
@pytest.mark.parametrize("dtype", list(IDENTICAL_TOL), ids=name_of)
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
        allowed = IDENTICAL_TOL[dtype] + (UNIT_ROUNDOFF[dtype] * scale if dtype in HALF else 0.0)
        assert diff <= allowed, (name, diff, allowed)


@pytest.mark.parametrize("value", [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
@pytest.mark.parametrize("factory", [D.jsd, D.skew_kl, D.skew_reverse_kl, D.symmetric_kl], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=name_of)
def test_divergence_parameter_at_and_near_the_ends(factory, value, dtype):
    prob = _random_problem(seed=11, divergence=factory(value), temperature=1.5, hard_weight=0.25)
    out, _ = _check_dtype(prob, dtype)
    assert torch.isfinite(out)


@pytest.mark.parametrize("divergence", [D.jsd(1 - 1e-9), D.skew_kl(1 - 1e-9), D.skew_reverse_kl(1e-50)], ids=name_of)
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
