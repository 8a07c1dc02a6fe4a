"""``impl="compile"``: agreement with eager and the float64 reference, and the compile count.

CPU compilation costs ~5-10 s per graph, so every test here uses one fixed vocabulary and dtype,
and the file compiles four graphs in all (one per chunk-function spec), shared by the tests:

  A  forward_kl + CE, with gradient     (mean/sum forward, and the "none" backward)
  B  forward_kl + CE, no gradient       (torch.no_grad, and the "none" forward)
  C  jsd (mixture kernel), with gradient
  D  reverse_kl + softcap, with gradient

Each compiled configuration has a code object of its own (kdfuse.compiled), so these tests count
graphs as differences of Dynamo's counters, never resetting Dynamo: a reset would hide exactly
the bug a shared recompile limit caused (the ninth configuration of a process silently ran
eagerly). Labels are ignored with ``IGNORE`` (part of every spec), so no other test file compiles
these specs first. The agreement tests reuse the counting test's graphs (run alone, they compile
their own).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import kdfuse
from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref, registry

V, HS, HT, CHUNK = 61, 16, 24, 8  # V prime; with CHUNK = 8 the row counts below leave tails
IGNORE = -3
ROW_COUNTS = (8, 13, 17, 21, 30)  # of 0, 5, 1 (merged into a 9-row chunk), 5 and 6 rows
STUDENT = ("student_hidden", "student_weight", "student_bias")


def make_inputs(leading, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        student_hidden=torch.randn(*leading, HS, generator=gen),
        student_weight=torch.randn(V, HS, generator=gen) * (2 / math.sqrt(HS)),
        student_bias=torch.randn(V, generator=gen),
        teacher_hidden=torch.randn(*leading, HT, generator=gen),
        teacher_weight=torch.randn(V + 3, HT, generator=gen) * (2 / math.sqrt(HT)),  # 3 padded rows
        labels=torch.randint(0, V, leading, generator=gen).masked_fill(
            torch.rand(leading, generator=gen) < 0.25, IGNORE
        ),
    )


def run(fn, inputs: dict, grad: bool = True, grad_output=None, **kwargs):
    """(loss, [grad hidden, grad weight, grad bias]) with the student tensors as fresh leaves."""
    args = dict(inputs)
    leaves = [args[name].detach().clone().requires_grad_(grad) for name in STUDENT]
    args.update(zip(STUDENT, leaves))
    out = fn(**args, **kwargs)
    if not grad:
        return out, None
    return out, list(torch.autograd.grad(out, leaves, grad_outputs=grad_output))


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_rel_close(actual, expected, tol, what=""):
    """Norm-relative error (float32 compute: sums over V = 61 in a different order)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err < tol, (what, err.item())


def check_against_reference(out, grads, inputs, grad_output=None, **kwargs):
    ref, ref_grads = run(fused_linear_distill_ref, inputs, grad_output=grad_output, **kwargs)
    # float32 inputs, float32 compute vs float64: a few float32 roundings (u = 6e-8) per term.
    assert_rel_close(out, ref, 2e-5, "loss")
    for name, g, r in zip(STUDENT, grads, ref_grads):
        assert_rel_close(g, r, 2e-5, name)


def test_one_graph_per_spec_across_row_counts_and_scalars():
    start = unique_graphs()
    base = dict(divergence="forward_kl", hard_weight=0.5, chunk_size=CHUNK, impl="compile", ignore_index=IGNORE)

    # A: five row counts, various tails, one graph.
    for n in ROW_COUNTS:
        inputs = make_inputs((n,), seed=n)
        out, grads = run(fused_linear_distill, inputs, **base)
        check_against_reference(out, grads, inputs, **base)
    assert unique_graphs() - start == 1

    # Temperature, soft/hard weights (hard stays non-zero), normalizer, leading dims: still A.
    inputs = make_inputs((3, 7), seed=1)
    for temperature, soft, hard in ((2.0, 0.3, 0.7), (0.5, 1.5, 2.0)):
        kwargs = dict(base, temperature=temperature, soft_weight=soft, hard_weight=hard, normalizer=100.0)
        out, grads = run(fused_linear_distill, inputs, reduction="sum", **kwargs)
        check_against_reference(out, grads, inputs, reduction="sum", **kwargs)
    assert unique_graphs() - start == 1

    # reduction="none": forward is B (no gradient), its backward reuses A.
    for n in (13, 22):
        inputs = make_inputs((n,), seed=n)
        go = torch.randn(n, generator=torch.Generator().manual_seed(n))
        out, grads = run(fused_linear_distill, inputs, grad_output=go, reduction="none", **base)
        check_against_reference(out, grads, inputs, grad_output=go, reduction="none", **base)
    assert unique_graphs() - start == 2
    # B again, through torch.no_grad, at new row counts and temperature.
    with torch.no_grad():
        for n in (9, 30):
            out, _ = run(fused_linear_distill, make_inputs((n,)), grad=False, temperature=3.0, **base)
            assert out.grad_fn is None
    assert unique_graphs() - start == 2

    # C: jsd across row counts; beta 0.3 -> 0.6 reuses it.
    for n, beta in ((8, 0.3), (13, 0.3), (21, 0.6), (30, 0.6)):
        inputs = make_inputs((n,), seed=n)
        kwargs = dict(
            divergence=D.jsd(beta), chunk_size=CHUNK, impl="compile", temperature=1.0 + beta, ignore_index=IGNORE
        )
        out, grads = run(fused_linear_distill, inputs, **kwargs)
        check_against_reference(out, grads, inputs, **kwargs)
    assert unique_graphs() - start == 3
    # A name string resolves to the same kernel: still C.
    run(
        fused_linear_distill,
        make_inputs((17,)),
        divergence="jsd_beta0.45",
        chunk_size=CHUNK,
        impl="compile",
        ignore_index=IGNORE,
    )
    assert unique_graphs() - start == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(divergence="forward_kl", hard_weight=0.5, temperature=2.0),
        dict(divergence=D.jsd(0.3), temperature=1.5),
        dict(divergence="reverse_kl", softcap=5.0, temperature=0.7),
    ],
    ids=["forward_kl+ce", "jsd0.3", "reverse_kl+softcap"],
)
def test_compiled_matches_eager(kwargs):
    """Same values and gradients as eager (and as the float64 reference), at two row counts
    and with 2-D leading dims; the softcap value changes without a recompile."""
    before = None
    for leading, extra in (((21,), {}), ((4, 6), {"softcap": 9.0} if "softcap" in kwargs else {})):
        inputs = make_inputs(leading, seed=sum(leading))
        call = dict(kwargs, **extra, chunk_size=CHUNK, ignore_index=IGNORE)
        out, grads = run(fused_linear_distill, inputs, impl="compile", **call)
        eager, eager_grads = run(fused_linear_distill, inputs, impl="eager", **call)
        # Same float32 math, fused differently by inductor: agreement to a few float32 ulps.
        assert_rel_close(out, eager, 1e-5, "loss")
        for name, g, e in zip(STUDENT, grads, eager_grads):
            assert_rel_close(g, e, 1e-5, name)
        check_against_reference(out, grads, inputs, **call)
        if before is None:
            before = unique_graphs()
        else:
            assert unique_graphs() == before  # new N, leading dims, softcap value: no new graph


def _user_divergence(i: int):
    """A distinct pure function per ``i`` (a new code object each: Dynamo compiles each anew)."""

    def divergence(student, teacher):
        p_s, p_t = student.softmax(-1), teacher.softmax(-1)
        return (p_s - p_t).abs().pow(1.0 + i / 8).sum(-1)

    divergence.__name__ = f"user_divergence_{i}"
    return divergence


@pytest.mark.slow
def test_every_configuration_gets_its_own_graph_without_a_reset(monkeypatch, caplog):
    """12 user divergences and every built-in (dense and top-k), each with and without gradient,
    in one process: each configuration compiles exactly one graph of its own, and none reaches
    Dynamo's recompile limit (which, shared by every configuration, used to make the ninth run
    eagerly with one log line). No torch._dynamo.reset() anywhere."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # a hit raises
    ignore = -11  # a value no other test uses: every spec below is new to this process
    inputs = make_inputs((13,), seed=5)
    inputs["labels"] = inputs["labels"].masked_fill(inputs["labels"] == IGNORE, ignore)
    topk = kdfuse.teacher_topk(inputs["teacher_hidden"], inputs["teacher_weight"], 5, vocab=V)
    dense_teacher = {k: inputs[k] for k in ("teacher_hidden", "teacher_weight")}
    calls = [(_user_divergence(i), dense_teacher, True) for i in range(12)]
    for name in registry.names():
        sparse = registry.get(name).sparse
        for grad in (True, False):
            calls.append((name, {"teacher_topk": topk} if sparse else dense_teacher, grad))
    student = {k: inputs[k] for k in (*STUDENT, "labels")}
    for divergence, teacher, grad in calls:
        before = unique_graphs()
        kwargs = dict(divergence=divergence, chunk_size=CHUNK, impl="compile", ignore_index=ignore, hard_weight=0.5)
        out, _ = run(fused_linear_distill, {**student, **teacher}, grad=grad, **kwargs)
        assert torch.isfinite(out)
        assert unique_graphs() - before == 1, (getattr(divergence, "__name__", divergence), grad)
    assert "recompile_limit" not in caplog.text
