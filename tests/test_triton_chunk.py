"""The hand-written Triton chunk kernel against the generic torch.func path it replaces.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU),
so CI checks the very kernel source the GPU runs: every divergence it implements, with and
without CE and softcap, masked teacher entries, ignored rows, arbitrary row weights, loss-only
mode, and vocabulary sizes that do not divide the block.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import divergences as D
from kdfuse import fused

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
    inv_t=st.sampled_from([0.25, 1.0, 2.0]),
    masked=st.booleans(),
    with_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_torch_func(tc, div, rows, vocab, has_ce, softcap, inv_t, masked, with_grad, seed):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=g) * 4).to(DEVICE)
    teacher = (torch.randn(rows, vocab, generator=g) * 4).to(DEVICE)
    if masked and vocab > 1:  # masked vocabulary on the teacher side, never the whole row
        teacher[0, : vocab // 2] = float("-inf")
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[0] = -100
    valid = labels != -100
    weights = (torch.rand(rows, generator=g).to(DEVICE) + 0.5) * valid
    kernel, params = fused._kernel_of(div)
    scalars = torch.tensor([inv_t, 0.7, 0.4 if has_ce else 0.0, softcap or 1.0, *params], device=DEVICE)
    spec = fused._Spec(kernel, len(params), has_ce, softcap is not None, -100, torch.float32, with_grad, False)

    got_grad, got = tc.chunk_step(
        kernel, has_ce, softcap is not None, -100, student, teacher, labels, valid, weights if with_grad else None, scalars
    )
    if with_grad:
        want_grad, want = fused._loss_and_grad(spec, student, (teacher,), labels, valid, weights, scalars)
        # float32 throughout on both sides, summed in different orders. Reverse KL / JSD gradients
        # are p_s·(log p_s − log p_t − KL): a difference of O(|log p|) terms that cancels near its
        # zero crossing, so an element's error is float32 rounding of the row's largest gradient,
        # not of the element itself.
        scale = want_grad.abs().amax().item()
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6 + 4e-6 * scale)
    else:
        assert got_grad is None
        want = fused._row_losses(spec, student, (teacher,), labels, valid, scalars)
    for name, a, b in zip(("loss", "soft", "hard"), got, want):
        # Masked reverse-KL terms are ~1e4 · mass: compare relative to the row's magnitude.
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_supported_only_for_builtins_on_cuda(tc):
    assert tc.supported(D._forward_kl, torch.float32, torch.device("cuda"))
    assert not tc.supported(D._forward_kl, torch.float64, torch.device("cuda"))
    assert not tc.supported(D._forward_kl, torch.float32, torch.device("cpu"))
    assert not tc.supported(D._tvd, torch.float32, torch.device("cuda"))
