"""A long batch on the GPU: N = 131072 rows within a memory bound, and the float64 reference's result.

One step of bf16 forward KL + cross-entropy at Hs = 256, Ht = 512, V = 32000 with
``chunk_size="auto"`` (tuned in process into a private cache dir) through the compiled path (the
Triton kernel), then:

* memory: the peak allocation during the measured step (after a warm-up step that tunes and
  compiles) stays below a bound derived from the chosen chunk size, and below 25% of what a
  full-logits step would hold at the very least (student logits, teacher logits and their
  gradient, in bf16: 3 * N * V * 2 bytes = 25.2 GB);
* values: the loss, grad_hidden and grad_weight against the float64 reference computed block by
  block over all rows (it fits at any N that way), and the per-row losses of
  ``reduction="none"`` on 512 random rows against the reference run on those rows alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LOW_PRECISION_BOUNDS, assert_low_precision_close, rel_err

from kdfuse import fused_linear_distill, fused_linear_distill_ref, tuning
from kdfuse.tuning import estimate_bytes

N, HS, HT, V = 131072, 256, 512, 32000
DTYPE = torch.bfloat16
KWARGS = dict(divergence="forward_kl", hard_weight=0.5, soft_weight=1.0, temperature=2.0)
MiB = 2**20


def _inputs(device):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(DTYPE)

    # Logits of standard deviation ~3 (the regime helpers.LOW_PRECISION_BOUNDS' bf16 bounds were derived for).
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[torch.rand(N, generator=gen, device=device) < 0.1] = -100
    return dict(
        student_hidden=randn(N, HS),
        student_weight=randn(V, HS, scale=3 / HS**0.5),
        teacher_hidden=randn(N, HT),
        teacher_weight=randn(V, HT, scale=3 / HT**0.5),
        labels=labels,
    )


def _step(t, **kwargs):
    h = t["student_hidden"].detach().requires_grad_()
    w = t["student_weight"].detach().requires_grad_()
    loss = fused_linear_distill(
        h,
        w,
        t["teacher_hidden"],
        t["teacher_weight"],
        labels=t["labels"],
        chunk_size="auto",
        impl="compile",
        **KWARGS,
        **kwargs,
    )
    return loss, torch.autograd.grad(loss, (h, w))


def _reference_blockwise(t, block=4096):
    """The float64 reference over all rows, ``block`` rows at a time ("sum" per block, divided by
    the number of valid rows at the end): loss, grad_hidden (N, Hs), grad_weight (V, Hs)."""
    w = t["student_weight"].to(torch.float64).requires_grad_()
    tw = t["teacher_weight"].to(torch.float64)
    n_valid = (t["labels"] != -100).sum().item()
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    grad_h = torch.empty(N, HS, dtype=torch.float64, device=w.device)
    grad_w = torch.zeros(V, HS, dtype=torch.float64, device=w.device)
    for start in range(0, N, block):
        rows = slice(start, start + block)
        h = t["student_hidden"][rows].to(torch.float64).requires_grad_()
        out = fused_linear_distill_ref(
            h, w, t["teacher_hidden"][rows].to(torch.float64), tw, labels=t["labels"][rows], reduction="sum", **KWARGS
        )
        gh, gw = torch.autograd.grad(out, (h, w))
        loss += out.detach()
        grad_h[rows] = gh
        grad_w += gw
    return loss / n_valid, grad_h / n_valid, grad_w / n_valid


@pytest.mark.gpu
def test_131072_rows_bf16_within_memory_and_exact(tmp_path, tuning_env):
    device = torch.device("cuda")  # tuning_env (conftest): KDFUSE_CACHE_DIR=tmp_path/cache, default knobs
    t = _inputs(device)

    # Warm-up: tunes the chunk size (<= 10 s of measuring, saved to tmp_path) and compiles.
    _step(t)
    assert list((tmp_path / "cache").glob("*.json")), "chunk_size='auto' did not tune into KDFUSE_CACHE_DIR"
    chunk = tuning.resolve_chunk_size(
        "auto",
        rows=N,
        vocab=V,
        student_hidden=HS,
        teacher="hidden",
        teacher_dim=HT,
        dtype=DTYPE,
        device=device,
        divergence=KWARGS["divergence"],
        with_ce=True,
        with_grad=True,
    )

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, (grad_h, grad_w) = _step(t)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before

    # The bound: one chunk's working set as kdfuse.tuning.estimate_bytes counts it (student and
    # teacher logits, logit gradient, float32 copies, the (V, Hs) float32 grad_weight
    # accumulator), plus what lives across chunks: grad_hidden in float32 and its bf16 result,
    # grad_weight's bf16 result, the per-row loss/soft/hard (float32), the flattened labels
    # (int64) and validity mask, and 64 MiB for the allocator's rounding and small tensors.
    chunk_bytes = estimate_bytes(chunk, V, HS, DTYPE, with_grad=True)
    across = N * HS * (4 + 2) + V * HS * 2 + N * (3 * 4 + 8 + 1)
    bound = chunk_bytes + across + 64 * MiB
    full_logits = 3 * N * V * DTYPE.itemsize
    print(
        f"chunk={chunk} peak={peak / MiB:.0f} MiB bound={bound / MiB:.0f} MiB full-logits={full_logits / MiB:.0f} MiB"
    )
    assert peak < bound, (chunk, peak / MiB, bound / MiB)
    assert peak < 0.25 * full_logits, (chunk, peak / MiB)

    for x in (loss, grad_h, grad_w):
        assert torch.isfinite(x).all()
    ref_loss, ref_h, ref_w = _reference_blockwise(t)
    # bf16 inputs, float32 compute, float64 reference on the same (rounded) inputs: the bounds of
    # helpers.py (loss 2.5u, gradients 6u + the rounding of the exact gradient to bf16).
    assert_low_precision_close(
        loss.detach(),
        {"student_hidden": grad_h, "student_weight": grad_w},
        ref_loss,
        {"student_hidden": ref_h, "student_weight": ref_w},
        DTYPE,
    )

    # reduction="none" at full N (forward only), 512 random rows against the reference on those rows.
    with torch.no_grad():
        per_row = fused_linear_distill(
            t["student_hidden"],
            t["student_weight"],
            t["teacher_hidden"],
            t["teacher_weight"],
            labels=t["labels"],
            reduction="none",
            chunk_size="auto",
            impl="compile",
            **KWARGS,
        )
    assert per_row.shape == (N,) and torch.isfinite(per_row).all()
    assert (per_row[t["labels"] == -100] == 0).all()
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:512].to(device)
    ref_rows = fused_linear_distill_ref(
        t["student_hidden"][idx],
        t["student_weight"],
        t["teacher_hidden"][idx],
        t["teacher_weight"],
        labels=t["labels"][idx],
        reduction="none",
        **KWARGS,
    )
    assert rel_err(per_row[idx], ref_rows) < LOW_PRECISION_BOUNDS[DTYPE][0]
    # The mean of the per-row losses is the scalar loss of the training step.
    n_valid = (t["labels"] != -100).sum()
    assert rel_err(per_row.double().sum() / n_valid, loss.double()) < 1e-5
