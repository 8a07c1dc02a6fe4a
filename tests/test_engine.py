"""The chunk loop and its autograd Function (kdfuse.engine), through ``fused_linear_distill``.

Chunking never changes a result (drawn chunk sizes, N = 1, one-row tails merged into the chunk
before them); gradients are computed for exactly the leaves that need them, never for the teacher,
and a retained graph runs twice; float16 takes its own path, each chunk's logit gradient scaled
into float16's range (engine.half_with_scale) and the result cast back, checked where that range
is exceeded and where every row is ignored. On a CPU, the first compiled call says once that it
compiles.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
from helpers import (
    F64,
    INF,
    LOW_PRECISION_BOUNDS,
    UNIT_ROUNDOFF,
    Problem,
    assert_close_scaled,
    assert_low_precision_close,
    compare_to_reference,
    fixed_problem,
    grads_of,
    name_of,
    problems,
    rel_err,
)
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import divergences as D
from kdfuse import engine, fused_linear_distill, fused_linear_distill_ref
from kdfuse.chunk import chunk_fn

# --- chunking ------------------------------------------------------------------------------------


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


def test_single_row_and_one_row_tail():
    # N = 1 and chunk tails of one row (which kdfuse merges into the previous chunk).
    for n, chunk in ((1, 1), (1, 4), (5, 4), (9, 4), (9, 2), (3, 1)):
        prob = fixed_problem(n=n, hard_weight=0.5, divergence=D.jsd(0.3), chunk_size=chunk)
        compare_to_reference(prob)


# --- which leaves get a gradient -----------------------------------------------------------------


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


@pytest.mark.parametrize("names", [("student_hidden", "student_bias"), ("student_bias",), ()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=name_of)
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


# --- float16: the logit gradient scaled per chunk ------------------------------------------------


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
    assert rel_err(g, exact) < 6 * UNIT_ROUNDOFF[torch.float16] + rel_err(exact.to(torch.float16), exact)


def test_float16_logit_gradient_beyond_its_range_does_not_overflow():
    """One row's d(loss)/d(logits) is ~1.9e5 (reverse KL against a masked teacher at T = 0.01),
    beyond float16's 65504, though the final 1/N-scaled gradient (~2.9e3) fits: each chunk's
    logit gradient is scaled into float16's range by a power of two (engine.half_with_scale)."""
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


# --- the one-time notice that the CPU path compiles ----------------------------------------------


def test_the_first_compiled_cpu_call_says_once_that_it_compiles(monkeypatch, caplog):
    """impl="compile" on a CPU: the first call logs one warning through the "kdfuse" logger (a
    first compile of seconds would otherwise look like a hang); later calls, a new configuration
    among them, and eager calls say nothing. The chunk functions are built uncompiled here (the
    notice is the engine's, whatever Dynamo does), so nothing compiles."""
    monkeypatch.setattr(engine, "_announced", [])  # as in a fresh process
    monkeypatch.setattr(engine, "chunk_fn", lambda spec: chunk_fn(replace(spec, compiled=False)))
    caplog.set_level(logging.WARNING, logger="kdfuse")

    def notices() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "kdfuse" and "torch.compile" in r.getMessage()]

    prob = fixed_problem(hard_weight=0.5, chunk_size=5)
    eager, _ = prob.call(fused_linear_distill, impl="eager")
    assert notices() == []
    out, leaves = prob.call(fused_linear_distill, impl="compile")
    grads_of(out, leaves)  # the backward runs the chunks again
    (notice,) = notices()
    assert "impl='eager'" in notice
    assert_close_scaled(out.detach(), eager.detach(), 1e-12, "loss")
    with torch.no_grad():  # another configuration, which would compile a graph of its own
        prob.call(fused_linear_distill, impl="compile", divergence=D.jsd(0.3))
    assert len(notices()) == 1
