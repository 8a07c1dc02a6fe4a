"""Sparse (top-k teacher) divergences (kdfuse.topk) against independent float64 formulas.

The reference side loops over Python floats: probabilities from its own softmax, ``math.log``,
the tail mass outside the top-k as an explicit sum over the complement, and 0·log 0 = 0 by
skipping zero terms, so a mistake in the library's log-space code cannot cancel out.
(teacher_topk, which extracts a teacher's top-k, is in test_extract.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import floats, topk_mixed_case
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import divergences as D
from kdfuse import topk as T

F64 = torch.float64
INF = float("inf")
KINDS = {"forward_kl": T.forward_kl, "soft_ce": T.soft_ce}
CASES = [(kind, tail) for kind in KINDS for tail in T.TAIL_POLICIES]


# --- the reference (float64 Python floats) --------------------------------------------------------


def softmax_row(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def reference_row(student: list[float], ids: list[int], logprobs: list[float], kind: str, tail: str) -> float:
    ps = softmax_row(student)
    entries = [(i, math.exp(lp)) for i, lp in zip(ids, logprobs) if lp != -INF]  # padding dropped
    mass = sum(p for _, p in entries)
    if tail == "renormalize" and mass > 0:
        entries = [(i, p / mass) for i, p in entries]
    loss = 0.0
    for i, p in entries:
        if p > 0:
            loss += -p * math.log(ps[i]) + (p * math.log(p) if kind == "forward_kl" else 0.0)
    if tail == "bucket":
        top = {i for i, _ in entries}
        outside = sum(ps[v] for v in range(len(ps)) if v not in top)
        leftover = 1.0 - mass
        # No term when the teacher has (up to rounding) no leftover or there is no token outside.
        if leftover > 1e-12 and len(top) < len(ps):
            loss += -leftover * math.log(outside) + (leftover * math.log(leftover) if kind == "forward_kl" else 0.0)
    return loss


def reference(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, kind: str, tail: str) -> torch.Tensor:
    rows = zip(student.double().tolist(), ids.tolist(), logprobs.double().tolist())
    return torch.tensor([reference_row(s, i, lp, kind, tail) for s, i, lp in rows], dtype=F64)


# --- inputs --------------------------------------------------------------------------------------


@st.composite
def topk_inputs(draw):
    """(student (R, V), ids (R, k), logprobs (R, k)) float64 with k in {1, 7, V}; per row the
    teacher is either the full softmax's top-k slice (P < 1) or a softmax over the k ids only
    (P = 1), and the last few entries may be padding (a repeated id, log-prob -inf). The logits
    are drawn entry by entry (in [-3, 3] times a drawn scale), each row's ids as a permutation."""
    rows, vocab = draw(st.integers(1, 4), label="rows"), draw(st.integers(2, 20), label="V")
    k = min(draw(st.sampled_from([1, 7, vocab]), label="k"), vocab)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]), label="scale")
    student = draw(floats((rows, vocab), 3.0), label="student") * scale
    teacher = draw(floats((rows, vocab), 3.0), label="teacher") * scale
    ids = torch.tensor([draw(st.permutations(range(vocab)), label="ids")[:k] for _ in range(rows)])
    logprobs = torch.empty(rows, k, dtype=F64)
    for r in range(rows):
        if draw(st.booleans(), label="P = 1"):  # exact: P = 1
            logprobs[r] = teacher[r, ids[r]].log_softmax(-1)
        else:
            logprobs[r] = teacher[r].log_softmax(-1)[ids[r]]
        pad = draw(st.integers(0, k), label="padding")
        if pad:
            logprobs[r, k - pad :] = -INF
            ids[r, k - pad :] = ids[r, 0] if draw(st.booleans(), label="repeat a real id") else 0
    return student, ids, logprobs


# --- values against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("kind,tail", CASES)
@given(inputs=topk_inputs())
def test_matches_reference(kind, tail, inputs):
    student, ids, logprobs = inputs
    got = KINDS[kind](tail)(student, ids, logprobs)
    torch.testing.assert_close(got, reference(student, ids, logprobs, kind, tail), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind,tail", CASES)
def test_float32_student(kind, tail):
    """float32 logits and log-probs: value within float32 rounding of the float64 reference."""
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 40, generator=gen, dtype=F64) * 3
    teacher = (torch.randn(6, 40, generator=gen, dtype=F64) * 3).log_softmax(-1)
    logprobs, ids = teacher.topk(7)
    got = KINDS[kind](tail)(student.float(), ids, logprobs.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(student, ids, logprobs, kind, tail), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,tail", CASES)
def test_gradcheck(kind, tail):
    student, ids, logprobs = topk_mixed_case()
    fn = KINDS[kind](tail)
    assert torch.autograd.gradcheck(lambda s: fn(s, ids, logprobs), (student,))


@pytest.mark.parametrize("kind,tail", CASES)
def test_torch_func_grad_matches_autograd(kind, tail):
    """The combinator's path (torch.func.grad of the summed rows) gives autograd's gradient."""
    student, ids, logprobs = topk_mixed_case()
    fn = KINDS[kind](tail)
    (expected,) = torch.autograd.grad(fn(student, ids, logprobs).sum(), student)
    got = torch.func.grad(lambda s: fn(s, ids, logprobs).sum())(student.detach())
    torch.testing.assert_close(got, expected)


# --- k = V: the dense divergences --------------------------------------------------------------------


@pytest.mark.parametrize("tail", T.TAIL_POLICIES)
@pytest.mark.parametrize("kind", KINDS)
def test_full_vocabulary_equals_dense(kind, tail):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(5, 13, generator=gen, dtype=F64, requires_grad=True)
    teacher = torch.randn(5, 13, generator=gen, dtype=F64) * 2
    ids = torch.stack([torch.randperm(13, generator=gen) for _ in range(5)])  # k = V, shuffled
    logprobs = teacher.log_softmax(-1).gather(-1, ids)
    sparse = KINDS[kind](tail)(student, ids, logprobs)
    dense = getattr(D, kind)(student, teacher)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), student)
    (g_dense,) = torch.autograd.grad(dense.sum(), student)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-12, atol=1e-12)


# --- extremes: P -> 1, S -> 1 ------------------------------------------------------------------


def _grad(fn, student, ids, logprobs):
    return torch.func.grad(lambda s: fn(s, ids, logprobs).sum())(student)


@pytest.mark.parametrize("kind,tail", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_finite_when_teacher_mass_is_one(kind, tail, dtype):
    """P = 1 exactly, P = 1 - 1e-30, and P a little over 1 (float16 rounding): finite values and
    gradients, and the bucket term vanishes (bucket equals ignore) for P >= 1."""
    fn = KINDS[kind](tail)
    student = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=dtype)
    ids = torch.tensor([[2, 0, 0], [1, 4, 0], [3, 5, 0]])
    half = math.log(0.5)
    logprobs = torch.tensor(
        [[0.0, -INF, -INF], [half, math.log1p(-0.5 - 1e-30), -INF], [half, half + 1e-3, -INF]], dtype=dtype
    )
    value, grad = fn(student, ids, logprobs), _grad(fn, student, ids, logprobs)
    assert value.isfinite().all() and grad.isfinite().all()
    if tail == "bucket":
        ignore = KINDS[kind]("ignore")
        torch.testing.assert_close(value[[0, 2]], ignore(student, ids, logprobs)[[0, 2]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_bucket_exact_when_student_mass_is_one(kind, dtype):
    """Student mass outside the top-k e^-120 (0 when computed as 1 - S in float32): the bucket
    term is exact (log(1 - S) from the complement) and value and gradient are finite."""
    c, vocab, k = 60.0, 10, 3
    student = torch.full((1, vocab), -c, dtype=dtype)
    student[0, :k] = c
    ids = torch.arange(k).unsqueeze(0)
    logprobs = torch.full((1, k), math.log(0.5 / k), dtype=dtype)  # P = 0.5
    log_z = c + math.log(k + (vocab - k) * math.exp(-2 * c))
    log_top, log_outside = c - log_z, -c + math.log(vocab - k) - log_z
    expected = -0.5 * log_top - 0.5 * log_outside
    if kind == "forward_kl":
        expected += 0.5 * math.log(0.5 / k) + 0.5 * math.log(0.5)
    fn = KINDS[kind]("bucket")
    value = fn(student, ids, logprobs)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert _grad(fn, student, ids, logprobs).isfinite().all()


@pytest.mark.parametrize("kind,tail", CASES)
def test_finite_gradients_with_saturated_student(kind, tail):
    """Student log-probs far below the floor on the teacher's ids: floored, still finite."""
    fn = KINDS[kind](tail)
    student = torch.tensor([[1e5, 0.0, -1e5, 3.0]])
    ids, logprobs = torch.tensor([[2, 1]]), torch.tensor([[-0.5, -2.0]])
    assert fn(student, ids, logprobs).isfinite().all()
    assert _grad(fn, student, ids, logprobs).isfinite().all()


# --- registry ----------------------------------------------------------------------------------


def test_names_and_get():
    assert len(T.names()) == 6
    for kind, tail in CASES:
        fn = KINDS[kind](tail)
        assert fn.__name__ == f"topk_{kind}_{tail}"
        assert T.get(fn.__name__) is fn is KINDS[kind](tail)  # one object: compile caches hit
        assert fn.sparse is True and T.is_sparse(fn)
    assert not T.is_sparse(D.forward_kl)
    with pytest.raises(ValueError, match="tail must be one of"):
        T.forward_kl("drop")
    with pytest.raises(ValueError, match="unknown sparse divergence"):
        T.get("forward_kl")
