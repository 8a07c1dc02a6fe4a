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

from kdfuse import chunk, registry
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
    labels = torch.where(torch.tensor(label_in_topk), ids[:, 0], torch.randint(0, vocab, (rows,), generator=g))
    labels[0] = -100  # an ignored row, with an all-padding teacher row
    logprobs[0] = float("-inf")
    valid = labels != -100
    weights = (torch.rand(rows, generator=g) + 0.5) * valid
    scalars = torch.tensor([inv_t, 0.7, 0.4 if has_ce else 0.0, 1.0])
    ids, logprobs, labels, valid, weights, scalars = (
        t.to(DEVICE) for t in (ids, logprobs, labels, valid, weights, scalars)
    )
    student = student.to(DEVICE)
    spec = chunk.ChunkSpec(div.fn, 0, True, has_ce, False, -100, torch.float32, with_grad, False)

    got_grad, got = tt.chunk_step(
        registry.entry_of(div.fn).reduced,
        has_ce,
        student.clone(),
        ids,
        logprobs,
        labels,
        valid,
        weights if with_grad else None,
        scalars,
        compiled=False,
    )
    if with_grad:
        want_grad, want = chunk.loss_and_grad(spec, student, (ids, logprobs), labels, valid, weights, scalars)
        assert got_grad.dtype == dtype
        # Against float64 (the generic path on the same logits): both float32 paths lose
        # digits to cancellations inside a row's gradient (the bucket policy's tail coefficient
        # is a difference of O(1) terms), so the kernel may err up to 8x the generic path's worst
        # in that row, plus rounding to the logits' dtype.
        spec64 = chunk.ChunkSpec(div.fn, 0, True, has_ce, False, -100, torch.float64, True, False)
        as64 = (student.double(), (ids, logprobs.double()), labels, valid, weights.double(), scalars.double())
        exact = chunk.loss_and_grad(spec64, *as64)[0]
        unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
        row_err = 8 * (want_grad.double() - exact).abs().amax(-1, keepdim=True) + 1e-7 * exact.abs().amax()
        allowed = 2 * unit * exact.abs() + row_err + 1e-30
        err = (got_grad.double() - exact).abs()
        assert (err <= allowed).all(), (err / allowed).max().item()
    else:
        assert got_grad is None
        want = chunk.row_losses(spec, student, (ids, logprobs), labels, valid, scalars)
    for name, a, b in zip(("loss", "soft", "hard"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def _spec(divergence, **changes) -> chunk.ChunkSpec:
    div = registry.get(divergence)
    base = dict(
        fn=div.fn,
        n_args=len(div.args),
        sparse=div.sparse,
        has_ce=True,
        softcap=False,
        ignore_index=-100,
        compute_dtype=torch.float32,
        with_grad=False,
        compiled=True,
    )
    return chunk.ChunkSpec(**{**base, **changes})


def _kernel(spec: chunk.ChunkSpec, device_type: str = "cuda") -> str | None:
    return chunk.fast_kernel(
        spec.fn,
        softcap=spec.softcap,
        compute_dtype=spec.compute_dtype,
        device_type=device_type,
        compiled=spec.compiled,
        wide_grad=spec.wide_grad,
    )


def test_the_combinator_picks_the_fused_paths_where_they_apply():
    """chunk.fast_kernel: which spec runs which kernel (decided on the host, so checkable
    without a GPU): dense built-ins and built-in sparse divergences without softcap, float32
    compute, impl="compile", CUDA; float16 keeps the generic path for top-k teachers; a user's
    function always the generic path."""
    assert _kernel(_spec("forward_kl")) == "forward_kl" and _kernel(_spec("jsd_beta0.3")) == "jsd"
    assert _kernel(_spec("jsd_beta0")) == "forward_kl"  # the endpoint is forward KL's function
    assert _kernel(_spec("topk_forward_kl_bucket")) == "topk"
    assert _kernel(_spec("forward_kl"), "cpu") is None
    assert _kernel(_spec("forward_kl", compiled=False)) is None
    assert _kernel(_spec("forward_kl", compute_dtype=torch.float64)) is None
    assert _kernel(_spec("tvd")) is None
    assert _kernel(_spec("topk_forward_kl_bucket", softcap=True)) is None
    assert _kernel(_spec("topk_soft_ce_ignore", wide_grad=True)) is None
    assert _kernel(_spec("forward_kl", wide_grad=True)) == "forward_kl"  # writes a float32 buffer

    def user(student, ids, logprobs):  # a user's sparse divergence: the generic path
        return K.forward_kl("renormalize")(student, ids, logprobs)

    assert (
        chunk.fast_kernel(
            user, softcap=False, compute_dtype=torch.float32, device_type="cuda", compiled=True, wide_grad=False
        )
        is None
    )


def test_the_dense_kernel_takes_its_ce_shortcut_at_temperatures_one_and_two():
    """chunk.with_kernel: the CE's probabilities come from the soft ones (triton_chunk.ce_power)
    for the dense kernel with a CE at T = 1 and 2 only."""
    assert [chunk.with_kernel(_spec("forward_kl"), "cuda", t).ce_power for t in (1.0, 2.0, 3.0)] == [1, 2, 0]
    assert chunk.with_kernel(_spec("jsd"), "cuda", 2.0).ce_power == 2
    assert chunk.with_kernel(_spec("forward_kl", has_ce=False), "cuda", 2.0).ce_power == 0
    assert chunk.with_kernel(_spec("topk_forward_kl_bucket"), "cuda", 2.0).ce_power == 0
    assert chunk.with_kernel(_spec("forward_kl"), "cpu", 2.0) == _spec("forward_kl")
