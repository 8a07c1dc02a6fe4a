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
from helpers import grid, wide_grid
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
    data=st.data(),
)
def test_chunk_step_matches_torch_func(
    tt, div, rows, vocab, k_frac, padding, repeat, label_in_topk, has_ce, inv_t, with_grad, dtype, data
):
    k = max(1, min(vocab, round(k_frac * vocab), 9)) if k_frac < 1 else vocab
    padding = min(padding, k - 1)
    # The teacher: the top-k of drawn logits in [-6, 6] (wide_grid: every entry drawn up to 97
    # columns, a tiled drawn block with drawn offsets beyond), the last ``padding`` entries
    # padding (log-prob -inf) with id 0 or (``repeat``) the row's first real id.
    lp = data.draw(wide_grid(rows, vocab, -24, 24, 0.25), label="teacher logits").log_softmax(-1)
    logprobs, ids = lp.topk(k, dim=-1)
    if padding:
        logprobs[:, k - padding :] = float("-inf")
        ids[:, k - padding :] = ids[:, :1] if repeat else 0
    student = data.draw(wide_grid(rows, vocab, -16, 16, 0.5), label="student").to(dtype)
    drawn_labels = data.draw(grid((rows,), 0, vocab - 1, dtype=torch.int64), label="labels")
    labels = ids[:, 0].clone() if label_in_topk else drawn_labels
    labels[0] = -100  # an ignored row, with an all-padding teacher row
    logprobs[0] = float("-inf")
    valid = labels != -100
    weights = data.draw(grid((rows,), 2, 6, 0.25, torch.float32), label="row weights") * valid
    scalars = torch.tensor([inv_t, 0.7, 0.4 if has_ce else 0.0, 1.0, 1.0])  # caps unread
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
