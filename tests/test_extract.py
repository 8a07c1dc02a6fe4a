"""``kdfuse.teacher_topk`` (kdfuse.extract): a teacher's top-k ids and exact log-probs, chunk by
chunk, against the full float64 logits; its argument checks."""

from __future__ import annotations

import pytest
import torch
from helpers import floats, leading_dims
from hypothesis import given
from hypothesis import strategies as st

import kdfuse
from kdfuse import divergences as D
from kdfuse import topk as T

F64 = torch.float64


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
    """(hidden, weight, k, chunk size, options): leading dims of rank 1..3 (N = 0 included, at
    most 20 rows), Ht in 1..8, Vt in 1..40, an optional vocab cut, k in [1, V], float32 or
    float64, bias, temperature and softcap; hidden states and weights drawn entry by entry."""
    leading = leading_dims(draw, 3, 0, 5, 20)
    width, full_vocab = draw(st.integers(1, 8), label="Ht"), draw(st.integers(1, 40), label="Vt")
    vocab = draw(st.one_of(st.none(), st.integers(1, full_vocab)), label="vocab")
    k = draw(st.integers(1, vocab or full_vocab), label="k")
    dtype = draw(st.sampled_from([torch.float32, F64]), label="dtype")
    hidden = draw(floats((*leading, width), 3.0, dtype), label="hidden")
    weight = draw(floats((full_vocab, width), 3.0, dtype), label="weight")
    bias = draw(floats((full_vocab,), 3.0, dtype), label="bias") if draw(st.booleans(), label="bias?") else None
    options = dict(
        temperature=draw(st.sampled_from([1.0, 0.7, 2.5]), label="temperature"),
        bias=bias,
        softcap=draw(st.sampled_from([None, 3.0]), label="softcap"),
        vocab=vocab,
    )
    chunk = draw(st.sampled_from(["auto", 1, 3, 4, 7, 1000]), label="chunk_size")
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
    if hidden.dtype == F64:  # computed in float64: the same sets of ids, wherever they are defined
        expected = every.topk(k, dim=-1).indices.reshape(-1, k)
        # A row whose k-th and (k+1)-th log-probs are within float64 rounding has two right
        # answers (the reference's log_softmax can even merge logits 1e-16 apart that the
        # library's logits still order): there the assertions above decide.
        ordered = every.reshape(flat.shape[0], every.shape[-1]).sort(-1, descending=True).values
        vocab = ordered.shape[-1]
        gap = ordered[:, k - 1] - ordered[:, k] if k < vocab else torch.full((flat.shape[0],), float("inf"))
        apart = (gap > 1e-12 * (1 + ordered[:, k - 1].abs())).tolist()
        for got, want, defined in zip(flat.tolist(), expected.tolist(), apart):
            assert not defined or set(got) == set(want), (got, want)


def test_full_vocabulary_via_teacher_topk_equals_dense():
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 8, generator=gen), torch.randn(21, 8, generator=gen)
    student = torch.randn(7, 21, generator=gen)
    ids, logprobs = kdfuse.teacher_topk(hidden, weight, 21, temperature=2.0)
    dense = D.forward_kl(student, (hidden @ weight.T) / 2.0)
    torch.testing.assert_close(T.forward_kl("renormalize")(student, ids, logprobs), dense, rtol=1e-5, atol=1e-6)


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
