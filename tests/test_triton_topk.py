"""The fused top-k chunk step (kdfuse.triton_topk) against the generic torch.func path it replaces.

Without a GPU its two Triton kernels run under Triton's interpreter (see conftest.py), so CI checks
the kernel source the GPU runs. Drawn: every built-in sparse divergence, CE or not, k from 1 to V,
padding entries (log-prob −inf) whose ids repeat a real id or not, labels inside and outside the
teacher's top-k, ignored rows (with all-padding teacher rows), temperatures, row weights,
loss-only mode, float32 and bfloat16 logits, vocabulary sizes that do not divide the block.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import fused
from kdfuse import topk as K

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPARSE = [K.get(name) for name in K.names()]


@pytest.fixture(scope="module")
def tt():
    """kdfuse.triton_topk; without a GPU conftest.py has put Triton in interpreter mode."""
    return importlib.import_module("kdfuse.triton_topk")


def _teacher(g: torch.Generator, rows: int, vocab: int, k: int, padding: int, repeat: bool):
    """(ids, logprobs) (rows, k): the top-k of random teacher logits, the last ``padding`` entries
    padding (log-prob −inf) with id 0 or (``repeat``) the row's first real id."""
    lp = (torch.randn(rows, vocab, generator=g) * 3).log_softmax(-1)
    logprobs, ids = lp.topk(k, dim=-1)
    if padding:
        logprobs[:, k - padding :] = float("-inf")
        ids[:, k - padding :] = ids[:, :1] if repeat else 0
    return ids, logprobs


@given(
    div=st.sampled_from(SPARSE),
    rows=st.integers(1, 4),
    vocab=st.sampled_from([1, 7, 97, 4099]),
    k_frac=st.sampled_from([0.0, 0.5, 1.0]),
    padding=st.integers(0, 3),
    repeat=st.booleans(),
    label_in_topk=st.booleans(),
    has_ce=st.booleans(),
    inv_t=st.sampled_from([0.25, 1.0, 2.0]),
    with_grad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_chunk_step_matches_torch_func(
    tt, div, rows, vocab, k_frac, padding, repeat, label_in_topk, has_ce, inv_t, with_grad, dtype, seed
):
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(vocab, round(k_frac * vocab), 9)) if k_frac < 1 else vocab
    padding = min(padding, k - 1)
    ids, logprobs = _teacher(g, rows, vocab, k, padding, repeat)
    student = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    labels = torch.where(
        torch.tensor(label_in_topk), ids[:, 0], torch.randint(0, vocab, (rows,), generator=g)
    )  # fmt: skip
    labels[0] = -100  # an ignored row, with an all-padding teacher row
    logprobs[0] = float("-inf")
    valid = labels != -100
    weights = (torch.rand(rows, generator=g) + 0.5) * valid
    scalars = torch.tensor([inv_t, 0.7, 0.4 if has_ce else 0.0, 1.0])
    ids, logprobs, labels, valid, weights, scalars = (t.to(DEVICE) for t in (ids, logprobs, labels, valid, weights, scalars))
    student = student.to(DEVICE)
    spec = fused._Spec(div, 0, has_ce, False, -100, torch.float32, with_grad, False, sparse=True)

    got_grad, got = tt.chunk_step(
        div, has_ce, student.clone(), ids, logprobs, labels, valid, weights if with_grad else None, scalars, compiled=False
    )
    if with_grad:
        want_grad, want = fused._loss_and_grad(spec, student, (ids, logprobs), labels, valid, weights, scalars)
        assert got_grad.dtype == dtype
        # Against float64 (the generic path on the same logits): both float32 paths lose
        # digits to cancellations inside a row's gradient (the bucket policy's tail coefficient
        # is a difference of O(1) terms), so the kernel may err up to 8x the generic path's worst
        # in that row, plus rounding to the logits' dtype.
        spec64 = fused._Spec(div, 0, has_ce, False, -100, torch.float64, True, False, sparse=True)
        as64 = (student.double(), (ids, logprobs.double()), labels, valid, weights.double(), scalars.double())
        exact = fused._loss_and_grad(spec64, *as64)[0]
        unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
        row_err = 8 * (want_grad.double() - exact).abs().amax(-1, keepdim=True) + 1e-7 * exact.abs().amax()
        allowed = 2 * unit * exact.abs() + row_err + 1e-30
        err = (got_grad.double() - exact).abs()
        assert (err <= allowed).all(), (err / allowed).max().item()
    else:
        assert got_grad is None
        want = fused._row_losses(spec, student, (ids, logprobs), labels, valid, scalars)
    for name, a, b in zip(("loss", "soft", "hard"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_supported_only_for_builtins_on_cuda_without_softcap(tt):
    div = K.forward_kl("bucket")
    assert tt.supported(div, torch.float32, torch.device("cuda"), softcap=False)
    assert not tt.supported(div, torch.float32, torch.device("cuda"), softcap=True)
    assert not tt.supported(div, torch.float64, torch.device("cuda"), softcap=False)
    assert not tt.supported(div, torch.float32, torch.device("cpu"), softcap=False)

    def user(student, ids, logprobs):  # a user's sparse divergence: generic path
        return K.forward_kl("renormalize")(student, ids, logprobs)

    assert not tt.supported(user, torch.float32, torch.device("cuda"), softcap=False)


def test_the_combinator_picks_the_fused_paths_where_they_apply():
    """fused._triton_supports: which spec runs which kernel (decided on the host, so checkable
    without a GPU): dense built-ins and built-in sparse divergences without softcap, float32
    compute, impl="compile", CUDA; float16 keeps the generic path for top-k teachers."""
    cuda = torch.device("cuda")

    def spec(divergence, sparse=False, **changes):
        kernel, params = fused._kernel_of(divergence)
        base = fused._Spec(kernel, len(params), True, False, -100, torch.float32, False, True, sparse=sparse)
        return fused._Spec(**{**base.__dict__, **changes})

    assert fused._triton_supports(spec("forward_kl"), cuda)
    assert fused._triton_supports(spec("topk_forward_kl_bucket", sparse=True), cuda)
    assert not fused._triton_supports(spec("forward_kl"), torch.device("cpu"))
    assert not fused._triton_supports(spec("forward_kl", compiled=False), cuda)
    assert not fused._triton_supports(spec("tvd"), cuda)
    assert not fused._triton_supports(spec("topk_forward_kl_bucket", sparse=True, softcap=True), cuda)
    assert not fused._triton_supports(spec("topk_soft_ce_ignore", sparse=True, wide_grad=True), cuda)
    assert fused._triton_supports(spec("forward_kl", wide_grad=True), cuda)  # writes a float32 buffer
