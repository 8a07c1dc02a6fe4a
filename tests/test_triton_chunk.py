"""The hand-written Triton chunk kernel against the generic torch.func path it replaces.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU),
so CI checks the very kernel source the GPU runs: every divergence it implements, with and
without CE, the student's and the teacher's softcaps and the student's entropy, masked teacher
entries, ignored rows (also with an all -inf teacher row), arbitrary row weights, loss-only mode,
vocabulary sizes that do not divide the block, and rows whose maximum lies far above pass 1's
fixed shift (swept again with running maxima).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import INF, grid, wide_grid
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import chunk, registry
from kdfuse import divergences as D

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tc():
    """kdfuse.triton_chunk; without a GPU conftest.py has put Triton in interpreter mode."""
    return importlib.import_module("kdfuse.triton_chunk")


DIVERGENCES = [D.forward_kl, D.soft_ce, D.reverse_kl, D.jsd(0.3), D.jsd(1e-6), D.jsd(1 - 1e-6)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@given(
    div=st.sampled_from(DIVERGENCES),
    rows=st.integers(1, 4),
    vocab=st.sampled_from([1, 7, 97, 300, 4099]),
    has_ce=st.booleans(),
    softcap=st.sampled_from([None, 5.0]),
    teacher_cap=st.sampled_from([None, 3.0]),
    entropy=st.booleans(),
    inv_t=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    ce_shortcut=st.booleans(),
    with_grad=st.booleans(),
    data=st.data(),
)
def test_kernel_matches_torch_func(
    tc, div, rows, vocab, has_ce, softcap, teacher_cap, entropy, inv_t, ce_shortcut, with_grad, data
):
    # Logits in [-8, 8] on a grid of 1/2 (wide_grid: every entry drawn up to 97 columns, a tiled
    # drawn block with drawn offsets beyond), labels and row weights in [0.5, 1.5] drawn too.
    student = data.draw(wide_grid(rows, vocab, -16, 16, 0.5), label="student").to(DEVICE)
    teacher = data.draw(wide_grid(rows, vocab, -16, 16, 0.5), label="teacher").to(DEVICE)
    # Masked vocabulary on the teacher side (a drawn prefix of a drawn row), never the whole row.
    masked_row = data.draw(st.integers(0, rows - 1), label="masked row")
    teacher[masked_row, : data.draw(st.integers(0, vocab - 1), label="masked entries")] = -INF
    labels = data.draw(grid((rows,), 0, vocab - 1, dtype=torch.int64), label="labels").to(DEVICE)
    labels[0] = -100
    valid = labels != -100
    weights = data.draw(grid((rows,), 2, 6, 0.25, torch.float32), label="row weights").to(DEVICE) * valid
    ce_power = tc.ce_power(1.0 / inv_t) if ce_shortcut else 0
    _check_kernel(
        tc,
        div,
        student,
        teacher,
        labels,
        valid,
        weights,
        has_ce,
        (softcap, teacher_cap),
        inv_t,
        ce_power,
        entropy,
        with_grad,
    )


def _check_kernel(tc, div, student, teacher, labels, valid, weights, has_ce, caps, inv_t, ce_power, entropy, with_grad):
    """The kernel's loss parts and logit gradient against the generic path's on the same rows."""
    softcap, teacher_cap = caps
    kernel, params = registry.entry_of(div.fn).kernel, div.args
    hard_w = 0.4 if has_ce else 0.0
    scalars = torch.tensor([inv_t, 0.7, hard_w, softcap or 1.0, teacher_cap or 1.0, *params], device=DEVICE)
    spec = chunk.ChunkSpec(
        div.fn,
        len(params),
        False,
        has_ce,
        softcap is not None,
        -100,
        torch.float32,
        with_grad,
        False,
        teacher_softcap=teacher_cap is not None,
        entropy=entropy,
    )

    got_grad, got = tc.chunk_step(
        kernel,
        has_ce,
        (softcap is not None, teacher_cap is not None),
        -100,
        student,
        teacher,
        labels,
        valid,
        weights if with_grad else None,
        scalars,
        ce_power=ce_power,
        entropy=entropy,
    )
    if with_grad:
        want_grad, want = chunk.loss_and_grad(spec, student, (teacher,), labels, valid, weights, scalars)
        # float32 throughout on both sides, summed in different orders: an element's error is
        # float32 rounding of the terms that make it up, which cancel (see _gradient_terms).
        bound = (
            1e-6
            + 1e-5 * want_grad.abs()
            + 8
            * torch.finfo(torch.float32).eps
            * _gradient_terms(
                kernel, params, student, teacher, (softcap, teacher_cap), inv_t, 0.7, hard_w, weights, want[1]
            )
        )
        err = (got_grad - want_grad).abs()
        assert (err <= bound).all(), f"worst error {err.max().item():.3g}, {(err / bound).max().item():.3g} x its bound"
    else:
        assert got_grad is None
        want = chunk.row_losses(spec, student, (teacher,), labels, valid, scalars)
    for name, a, b in zip(("loss", "soft", "hard", "entropy"), got, want):
        # Masked reverse-KL terms are ~1e4 · mass: compare relative to the row's magnitude.
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("div", [D.forward_kl, D.reverse_kl, D.jsd(0.5)])
@pytest.mark.parametrize("inv_t", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("has_ce", [False, True])
def test_rows_whose_maximum_lies_far_above_the_first_block(tc, div, inv_t, has_ce):
    """Pass 1 first sums each row's terms relative to a fixed shift (the first block's maximum or
    the label's logit) and sweeps again with running maxima where those sums grow past 2^64.
    Rows here: the maximum 40 logits above the shift (2^58 at T = 1: kept; 2^115 at T = 0.5:
    swept again), 200 above (overflows float32 at every T), a teacher whose first block and label
    are −inf (no finite shift), and an ordinary row. Each must match the generic path."""
    vocab = 3 * 1024 + 5  # three full blocks of the kernel's 1024 and a tail
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, vocab, generator=gen)
    teacher = torch.randn(4, vocab, generator=gen)
    for row, gap in ((1, 40.0), (2, 200.0)):
        for x in (student, teacher):
            x[row, :1024] -= gap / 2
            x[row, 2000 + row] = gap / 2
    teacher[3, :1500] = -INF
    labels = torch.tensor([7, 100, -100, 1200])  # row 3's label is masked on the teacher side
    valid = labels != -100
    weights = torch.tensor([1.0, 0.5, 0.0, 1.5]) * valid
    student, teacher, labels, valid, weights = (t.to(DEVICE) for t in (student, teacher, labels, valid, weights))
    for ce_power in {0, tc.ce_power(1.0 / inv_t)}:
        _check_kernel(
            tc, div, student, teacher, labels, valid, weights, has_ce, (None, None), inv_t, ce_power, True, True
        )


def _gradient_terms(kernel, params, student, teacher, caps, inv_t, soft_w, hard_w, weights, soft) -> torch.Tensor:
    """(C, V) the size of the terms each element of the logit gradient is a difference of.

    Forward KL / soft CE: p_s − p_t. Reverse KL: p_s·(log p_s − log p_t − D); JSD(β):
    (1−β)·p_s·(log p_s − log m − KL(P_s‖M)) with (1−β)·KL(P_s‖M) ≤ D. Their terms, of size |log p|
    and D, cancel near the element's zero crossing (at T = 0.5 a row's log-probs and KL reach ~20,
    so an element of 0.04 carries float32 rounding of numbers ~20 times larger; D's rounding grows
    with the log of the vocabulary it is summed over). All times w·τ·sw;
    CE adds softmax − onehot, at most 1. Log-probs are floored as the kernels floor them (|log p|
    ≤ 1e4 next to a masked teacher entry, where reverse KL's gradient is that large too)."""

    def logprobs(x, cap):
        x = x.double() if cap is None else cap * torch.tanh(x.double() / cap)
        return (x * inv_t).log_softmax(-1).clamp_min(-1e4)

    ls, lt = logprobs(student, caps[0]), logprobs(teacher, caps[1])
    # D is a sum over the vocabulary: its float32 error grows with the depth of that reduction
    # (measured on CPU: reverse KL's worst case is at the longest vocabulary, 4099).
    ps, row = ls.exp(), soft.double().abs()[:, None] * max(1.0, math.log2(student.shape[-1]))
    if kernel == "reverse_kl":
        terms = ps * (ls.abs() + lt.abs() + row)
    elif kernel == "jsd":
        _, one_m_beta, log_beta, log_1m_beta = params
        lm = torch.logaddexp(log_beta + lt, log_1m_beta + ls).clamp_min(-1e4)
        terms = one_m_beta * ps * (ls.abs() + lm.abs()) + ps * row
    else:
        terms = ps + lt.exp()
    return weights.double()[:, None] * (inv_t * soft_w * terms + hard_w)


def test_ce_power_only_at_temperatures_one_and_two(tc):
    assert [tc.ce_power(t) for t in (1.0, 2.0, 0.5, 3.0, 1.0000001)] == [1, 2, 0, 0, 0]


def test_every_dense_kernel_the_registry_names_exists(tc):
    named = {e.kernel for e in registry.ENTRIES.values() if e.kernel and not e.sparse}
    assert named == set(tc.KERNELS)


def test_ignored_row_with_fully_masked_teacher(tc):
    """An ignored row's nan logit gradient (its teacher row all -inf, e.g. padding) must not
    survive its row weight of 0."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, generator=gen).to(DEVICE)
    teacher = torch.randn(3, 7, generator=gen).to(DEVICE)
    teacher[1] = -INF
    labels = torch.tensor([1, -100, 2], device=DEVICE)
    valid = labels != -100
    weights = valid.float()
    scalars = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0], device=DEVICE)
    dlogits, (loss, *_) = tc.chunk_step(
        "forward_kl", True, (False, False), -100, student, teacher, labels, valid, weights, scalars
    )
    assert torch.isfinite(loss).all()
    assert torch.isfinite(dlogits).all()
