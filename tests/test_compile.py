"""``impl="compile"``: agreement with eager and the float64 reference, and the compile count.

CPU compilation costs ~5-10 s per graph, so the tests share a few graphs (one per chunk-function
spec), each test on one fixed vocabulary and dtype:

  A  forward_kl + CE, with gradient     (mean/sum forward, and the "none" backward)
  B  forward_kl + CE, no gradient       (torch.no_grad, and the "none" forward)
  C  jsd (mixture kernel), with gradient
  D  reverse_kl + softcap, with gradient
  E  skew_reverse_kl + CE, with gradient, float64 inputs cast to float32 (20 row counts, edge values)

plus one graph per configuration of the test that compiles every divergence, one for a user's
parametrised divergence and one for a built-in factory's (each shared by all their parameter
values), and one of a sparse divergence's gradient compiled directly.

Each compiled configuration has a code object of its own (kdfuse.compiled), so these tests count
graphs as differences of Dynamo's counters, never resetting Dynamo: a reset would hide exactly
the bug a shared recompile limit caused (the ninth configuration of a process silently ran
eagerly). Labels are ignored with ``IGNORE`` (part of every spec), so no other test file compiles
these specs first. The agreement tests reuse the counting test's graphs (run alone, they compile
their own). The same holds for the float64-input tests below (their own spec, one graph for 20
row counts and every per-call number).

Every test here compiles on the CPU (5-10 s per new graph, 2-3 minutes for the file with a cold
inductor cache): the module is marked ``slow``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, INF, STUDENT, Problem, grads_of, rel_err, run_student, topk_mixed_case
from torch._dynamo.utils import counters

import kdfuse
from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref, registry
from kdfuse import topk as T
from kdfuse.chunk import chunk_fn

pytestmark = pytest.mark.slow

V, HS, HT, CHUNK = 61, 16, 24, 8  # V prime; with CHUNK = 8 the row counts below leave tails
IGNORE = -3
ROW_COUNTS = (8, 13, 17, 21, 30)  # of 0, 5, 1 (merged into a 9-row chunk), 5 and 6 rows


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


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_rel_close(actual, expected, tol, what=""):
    """Norm-relative error (float32 compute: sums over V = 61 in a different order)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err < tol, (what, err.item())


def check_against_reference(out, grads, inputs, grad_output=None, **kwargs):
    ref, ref_grads = run_student(fused_linear_distill_ref, inputs, grad_output=grad_output, **kwargs)
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
        out, grads = run_student(fused_linear_distill, inputs, **base)
        check_against_reference(out, grads, inputs, **base)
    assert unique_graphs() - start == 1

    # Temperature, soft/hard weights (hard stays non-zero), normalizer, leading dims: still A.
    inputs = make_inputs((3, 7), seed=1)
    for temperature, soft, hard in ((2.0, 0.3, 0.7), (0.5, 1.5, 2.0)):
        kwargs = dict(base, temperature=temperature, soft_weight=soft, hard_weight=hard, normalizer=100.0)
        out, grads = run_student(fused_linear_distill, inputs, reduction="sum", **kwargs)
        check_against_reference(out, grads, inputs, reduction="sum", **kwargs)
    assert unique_graphs() - start == 1

    # reduction="none": forward is B (no gradient), its backward reuses A.
    for n in (13, 22):
        inputs = make_inputs((n,), seed=n)
        go = torch.randn(n, generator=torch.Generator().manual_seed(n))
        out, grads = run_student(fused_linear_distill, inputs, grad_output=go, reduction="none", **base)
        check_against_reference(out, grads, inputs, grad_output=go, reduction="none", **base)
    assert unique_graphs() - start == 2
    # B again, through torch.no_grad, at new row counts and temperature.
    with torch.no_grad():
        for n in (9, 30):
            out, _ = run_student(fused_linear_distill, make_inputs((n,)), grad=False, temperature=3.0, **base)
            assert out.grad_fn is None
    assert unique_graphs() - start == 2

    # C: jsd across row counts; beta 0.3 -> 0.6 reuses it.
    for n, beta in ((8, 0.3), (13, 0.3), (21, 0.6), (30, 0.6)):
        inputs = make_inputs((n,), seed=n)
        kwargs = dict(
            divergence=D.jsd(beta), chunk_size=CHUNK, impl="compile", temperature=1.0 + beta, ignore_index=IGNORE
        )
        out, grads = run_student(fused_linear_distill, inputs, **kwargs)
        check_against_reference(out, grads, inputs, **kwargs)
    assert unique_graphs() - start == 3
    # A name string resolves to the same kernel: still C.
    run_student(
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
        out, grads = run_student(fused_linear_distill, inputs, impl="compile", **call)
        eager, eager_grads = run_student(fused_linear_distill, inputs, impl="eager", **call)
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
        out, _ = run_student(fused_linear_distill, {**student, **teacher}, grad=grad, **kwargs)
        assert torch.isfinite(out)
        assert unique_graphs() - before == 1, (getattr(divergence, "__name__", divergence), grad)
    assert "recompile_limit" not in caplog.text


def _tilted_kl(student, teacher, alpha, beta):
    """beta·KL(P_t^alpha ‖ P_s), the teacher's logits scaled by alpha: both parameters are 0-dim
    tensors (kdfuse.divergences.Parametrized), alpha inside a softmax."""
    ls, lt = student.log_softmax(-1), (teacher * alpha).log_softmax(-1)
    return beta * (lt.exp() * (lt - ls)).sum(-1)


@pytest.mark.parametrize(
    ("make", "values"),
    [
        (lambda v: D.parametrized(_tilted_kl, alpha=v[0], beta=v[1]), [(1.0, 1.0), (0.5, 2.0), (2.0, 0.25)]),
        (D.symmetric_kl, [0.2, 0.5, 0.9]),
    ],
    ids=["parametrized", "symmetric_kl"],
)
def test_parameter_values_share_one_compiled_chunk_function(make, values):
    """A parametrised divergence (divergences.parametrized, or a built-in factory) passes its
    numbers as tensors: its values share one chunk function (one code object, built once) and
    one graph, each value's loss still its own and equal to the reference's."""
    ignore = -13  # a value no other test uses: the first call compiles this spec anew
    inputs = make_inputs((21,), seed=7)
    inputs["labels"] = inputs["labels"].masked_fill(inputs["labels"] == IGNORE, ignore)
    graphs, built = unique_graphs(), chunk_fn.cache_info().misses
    losses = set()
    for value in values:
        kwargs = dict(divergence=make(value), chunk_size=CHUNK, impl="compile", ignore_index=ignore, hard_weight=0.5)
        out, grads = run_student(fused_linear_distill, inputs, **kwargs)
        check_against_reference(out, grads, inputs, **kwargs)
        losses.add(out.item())
    assert len(losses) == len(values)  # the values reached the compiled code
    assert chunk_fn.cache_info().misses - built == 1
    assert unique_graphs() - graphs == 1


# =================================================================================================
# One graph for 20 row counts and every per-call number (float64 inputs cast to float32)
# =================================================================================================

# skew_reverse_kl is not on the Triton path on CUDA either (kdfuse.triton_chunk handles forward/
# reverse KL, soft CE and JSD), so this is the torch.compile graph on every device. One spec
# (divergence kernel, CE on, float32, with gradient, ignore_index CIGNORE, which nothing else
# uses): ONE compiled graph for these three tests, counted by the first.
CV, CHS, CHT, CCHUNK, CIGNORE = 17, 8, 12, 8, -7
ROWS_20 = (2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 15, 17, 23, 24, 25, 31, 33, 40, 47, 64)
SKEW = dict(divergence=D.skew_reverse_kl(0.1), hard_weight=0.3, chunk_size=CCHUNK, ignore_index=CIGNORE)


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


def test_one_graph_for_20_row_counts_and_per_call_numbers():
    start = unique_graphs()
    _compiled_vs_reference(_compile_inputs((16,)), **SKEW)  # warm-up: the one compile
    assert unique_graphs() - start == 1
    for n in ROWS_20:  # full chunks, tails of 2..7 rows and 1-row tails (merged): no recompile
        _compiled_vs_reference(_compile_inputs((n,), seed=n), **SKEW)
    assert unique_graphs() - start == 1, f"{unique_graphs() - start} graphs for 20 row counts"
    # The divergence's parameter, temperature, both weights, normalizer, reduction and leading
    # dims change per call; the lm_head weights are new tensors every call anyway.
    for i, (alpha, temperature, soft, hard) in enumerate([(0.3, 2.0, 0.5, 1.5), (0.7, 0.25, 2.0, 0.1)]):
        kwargs = dict(
            SKEW,
            divergence=D.skew_reverse_kl(alpha),
            temperature=temperature,
            soft_weight=soft,
            hard_weight=hard,
            normalizer=37.0,
            reduction="sum",
        )
        _compiled_vs_reference(_compile_inputs((3, 5 + i), seed=i), **kwargs)
    assert unique_graphs() - start == 1, "a per-call number caused a recompile"


def test_compiled_edge_values_without_a_recompile():
    """The compiled chunk on edge values (masked teacher vocabulary, one-hot-like rows, extreme
    temperatures): finite and equal to the reference, in the graph compiled above."""
    _compiled_vs_reference(_compile_inputs((16,)), **SKEW)  # (the graph, when run alone)
    before = unique_graphs()
    prob = _compile_inputs((21,), seed=5, teacher_logits=True)
    t = prob.tensors["teacher_logits"]
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, 0] = False
    t = t.masked_fill(mask, -INF)
    t[::3, 1] += 50.0  # one-hot-like rows (column 1 is unmasked in them or -inf + 50 = -inf)
    t[::3, 1] = torch.where(torch.isinf(t[::3, 1]), 50.0, t[::3, 1])
    prob.tensors["teacher_logits"] = t
    for temperature in (0.05, 20.0):
        _compiled_vs_reference(prob, **dict(SKEW, temperature=temperature))
    assert unique_graphs() == before


def test_a_single_row_does_not_recompile():
    _compiled_vs_reference(_compile_inputs((16,)), **SKEW)
    before = unique_graphs()
    _compiled_vs_reference(_compile_inputs((1,)), **SKEW)
    assert unique_graphs() == before


# --- a sparse divergence's gradient compiles -----------------------------------------------------


def test_a_sparse_divergence_gradient_compiles():
    fn = T.forward_kl("bucket")
    student, ids, logprobs = topk_mixed_case()
    student = student.detach().float()
    logprobs = logprobs.float()

    def grad(s, i, lp):
        return torch.func.grad(lambda x: fn(x, i, lp).sum())(s)

    compiled = torch.compile(grad, dynamic=False)
    torch.testing.assert_close(compiled(student, ids, logprobs), grad(student, ids, logprobs))
