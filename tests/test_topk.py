"""Sparse (top-k teacher) divergences and teacher_topk against independent float64 formulas.

The reference side loops over Python floats: probabilities from its own softmax, ``math.log``,
the tail mass outside the top-k as an explicit sum over the complement, and 0·log 0 = 0 by
skipping zero terms, so a mistake in the library's log-space code cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdfuse
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
    (P = 1), and the last few entries may be padding (a repeated id, log-prob -inf)."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 20))
    k = min(draw(st.sampled_from([1, 7, vocab])), vocab)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    student = torch.randn(rows, vocab, generator=gen, dtype=F64) * scale
    teacher = torch.randn(rows, vocab, generator=gen, dtype=F64) * scale
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    logprobs = torch.empty(rows, k, dtype=F64)
    for r in range(rows):
        if draw(st.booleans()):  # exact: P = 1
            logprobs[r] = teacher[r, ids[r]].log_softmax(-1)
        else:
            logprobs[r] = teacher[r].log_softmax(-1)[ids[r]]
        pad = draw(st.integers(0, k))
        if pad:
            logprobs[r, k - pad :] = -INF
            ids[r, k - pad :] = ids[r, 0] if draw(st.booleans()) else 0
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


def _mixed_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows: P < 1; P = 1 over k ids; padding repeating a real id; all padding."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, generator=gen, dtype=F64, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen, dtype=F64)
    ids = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(4)])
    logprobs = teacher.log_softmax(-1).gather(-1, ids)
    logprobs[1] = teacher[1, ids[1]].log_softmax(-1)
    ids[2, 3], logprobs[2, 3] = ids[2, 0], -INF
    ids[3], logprobs[3] = 0, -INF
    return student, ids, logprobs


@pytest.mark.parametrize("kind,tail", CASES)
def test_gradcheck(kind, tail):
    student, ids, logprobs = _mixed_case()
    fn = KINDS[kind](tail)
    assert torch.autograd.gradcheck(lambda s: fn(s, ids, logprobs), (student,))


@pytest.mark.parametrize("kind,tail", CASES)
def test_torch_func_grad_matches_autograd(kind, tail):
    """The combinator's path (torch.func.grad of the summed rows) gives autograd's gradient."""
    student, ids, logprobs = _mixed_case()
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


def test_full_vocabulary_via_teacher_topk_equals_dense():
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 8, generator=gen), torch.randn(21, 8, generator=gen)
    student = torch.randn(7, 21, generator=gen)
    ids, logprobs = kdfuse.teacher_topk(hidden, weight, 21, temperature=2.0)
    dense = D.forward_kl(student, (hidden @ weight.T) / 2.0)
    torch.testing.assert_close(T.forward_kl("renormalize")(student, ids, logprobs), dense, rtol=1e-5, atol=1e-6)


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


def test_compiles():
    fn = T.forward_kl("bucket")
    student, ids, logprobs = _mixed_case()
    student = student.detach().float()
    logprobs = logprobs.float()
    grad = torch.compile(lambda s, i, lp: torch.func.grad(lambda x: fn(x, i, lp).sum())(s), dynamic=False)
    torch.testing.assert_close(grad(student, ids, logprobs), _grad(fn, student, ids, logprobs))


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


# --- teacher_topk ------------------------------------------------------------------------------


def full_topk(hidden, weight, k, *, temperature=1.0, bias=None, softcap=None, vocab=None):
    """The full-logits float64 answer: (sorted top-k log-probs, log-probs of every token)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits[..., : vocab or weight.shape[0]]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = (logits / temperature).log_softmax(-1)
    return logprobs.topk(k, dim=-1).values, logprobs


@st.composite
def topk_problems(draw):
    leading = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    width, full_vocab = draw(st.integers(1, 8)), draw(st.integers(1, 40))
    vocab = draw(st.one_of(st.none(), st.integers(1, full_vocab)))
    k = draw(st.integers(1, vocab or full_vocab))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(*leading, width, generator=gen, dtype=dtype)
    weight = torch.randn(full_vocab, width, generator=gen, dtype=dtype)
    bias = torch.randn(full_vocab, generator=gen, dtype=dtype) if draw(st.booleans()) else None
    options = dict(
        temperature=draw(st.sampled_from([1.0, 0.7, 2.5])),
        bias=bias,
        softcap=draw(st.sampled_from([None, 3.0])),
        vocab=vocab,
    )
    chunk = draw(st.sampled_from(["auto", 1, 3, 4, 7, 1000]))
    return hidden, weight, k, chunk, options


@given(problem=topk_problems())
def test_teacher_topk_matches_full_logits(problem):
    hidden, weight, k, chunk, options = problem
    ids, logprobs = kdfuse.teacher_topk(
        hidden,
        weight,
        k,
        chunk_size=chunk,
        temperature=options["temperature"],
        teacher_bias=options["bias"],
        softcap=options["softcap"],
        vocab=options["vocab"],
    )
    top, every = full_topk(hidden, weight, k, **options)
    assert ids.shape == logprobs.shape == (*hidden.shape[:-1], k)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if hidden.dtype == torch.float32 else dict(rtol=1e-6, atol=1e-6)
    # Each id carries its own exact log-prob, the values are the k largest, and no id repeats: the
    # top-k up to near-ties, without depending on how ties within rounding are broken.
    torch.testing.assert_close(logprobs.double(), every.gather(-1, ids), **tol)
    torch.testing.assert_close(logprobs.double(), top, **tol)
    flat = ids.reshape(-1, k)
    assert all(len(set(row)) == k for row in flat.tolist())
    if hidden.dtype == F64:  # computed in float64: the same sets of ids
        expected = every.topk(k, dim=-1).indices.reshape(-1, k)
        assert [set(r) for r in flat.tolist()] == [set(r) for r in expected.tolist()]


def test_teacher_topk_no_grad():
    hidden = torch.randn(4, 3, requires_grad=True)
    _, logprobs = kdfuse.teacher_topk(hidden, torch.randn(5, 3, requires_grad=True), 2)
    assert not logprobs.requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be an int in"),
        (dict(k=6), r"k must be an int in \[1, V=5\]"),
        (dict(k=4, vocab=3), r"k must be an int in \[1, V=3\]"),
        (dict(vocab=9), r"vocab must be an int in \[1, Vt=5\]"),
        (dict(hidden=torch.randn(2, 4)), r"teacher_hidden's last dim must equal teacher_weight's Ht=3"),
        (dict(weight=torch.randn(5)), r"teacher_weight must be \(Vt, Ht\)"),
        (dict(teacher_bias=torch.randn(4)), r"teacher_bias must be \(Vt,\) = \(5,\)"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(softcap=-1.0), "softcap must be a finite number > 0"),
        (dict(chunk_size=0), "chunk_size must be an int >= 1 or 'auto'"),
    ],
)
def test_teacher_topk_errors(kwargs, match):
    args = dict(hidden=torch.randn(2, 3), weight=torch.randn(5, 3), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kdfuse.teacher_topk(args.pop("hidden"), args.pop("weight"), args.pop("k"), **args)


def test_teacher_topk_type_errors():
    with pytest.raises(TypeError, match="teacher_hidden must be a floating-point tensor"):
        kdfuse.teacher_topk(torch.ones(2, 3, dtype=torch.long), torch.randn(5, 3), 2)
    with pytest.raises(TypeError, match="must share a dtype"):
        kdfuse.teacher_topk(torch.randn(2, 3, dtype=F64), torch.randn(5, 3), 2)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("fn", ["fused", "reference"])
def test_ignored_row_may_hold_anything(fn, validate):
    """A top-k teacher's ignored rows (labels == ignore_index) may hold NaN log-probs and
    out-of-range ids, as a dense teacher's may hold anything: the loss and gradients are those of
    the same call with clean rows there, and finite."""
    from kdfuse import fused_linear_distill, fused_linear_distill_ref

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
